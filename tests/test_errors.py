"""Bad input fails fast with an error naming the argument; odd but valid input works; loading names the culprit."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from lavit_pipelines import LavitText2ImagePipeline


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(prompt="a", height=60), ValueError, "`height` must be a positive multiple of 8"),
        (dict(prompt="a", width=-64), ValueError, "`width`"),
        (dict(prompt="a", num_inference_steps=0), ValueError, "`num_inference_steps`"),
        (dict(prompt="a", guidance_scale=-1.0), ValueError, "`guidance_scale`"),
        (dict(prompt="a", llm_guidance_scale=0), ValueError, "`llm_guidance_scale`"),
        (dict(prompt="a", top_k=-3), ValueError, "`top_k`"),
        (dict(prompt="a", top_p=1.5), ValueError, "`top_p`"),
        (dict(prompt="a", temperature=0.0), ValueError, "`temperature`"),
        (dict(prompt="a", min_new_tokens=50, max_new_tokens=10), ValueError, "`min_new_tokens`"),
        (dict(prompt="a", max_new_tokens=0), ValueError, "`max_new_tokens`"),
        (dict(prompt="a", max_new_tokens=10**6), ValueError, "leave room for the prompt"),
        (dict(prompt="a", num_images_per_prompt=0), ValueError, "`num_images_per_prompt`"),
        (dict(prompt=7), TypeError, "`prompt` must be a string"),
        (dict(prompt=[]), TypeError, "`prompt`"),
        (dict(), ValueError, "exactly one of `prompt` and `visual_token_ids`"),
        (dict(prompt="<image> <image> x", image=[PIL.Image.new("RGB", (8, 8))]), ValueError, "placeholders"),
        (dict(prompt="x", image=PIL.Image.new("RGB", (8, 8))), ValueError, "placeholders"),
        (dict(prompt=["<image> a", "<image> b"], image=[[PIL.Image.new("RGB", (8, 8))]]), ValueError, "placeholders"),
        (dict(prompt="<image> x", image="/no/such/dog.jpg"), FileNotFoundError, "/no/such/dog.jpg"),
        (dict(prompt="<image> x", image=3.5), TypeError, "`image`"),
        (dict(visual_token_ids=[]), TypeError, "`visual_token_ids`"),
        (dict(visual_token_ids=[torch.tensor([], dtype=torch.long)]), ValueError, "`visual_token_ids[0]`"),
        (dict(visual_token_ids=[torch.tensor([1, -2])]), ValueError, "codebook indices"),
        (dict(visual_token_ids=[torch.tensor([1, 16384])]), ValueError, "codebook indices"),
        (dict(visual_token_ids=[torch.arange(300)]), ValueError, "1 to 256 codes"),
        (dict(visual_token_ids=[torch.rand(5)]), TypeError, "integer tensor"),
        (
            dict(visual_token_ids=[torch.arange(9)], latents=torch.zeros(1, 4, 4, 4), height=64, width=64),
            ValueError,
            "`latents`",
        ),
        (dict(visual_token_ids=[torch.arange(9)], generator=[torch.Generator()] * 3), ValueError, "`generator`"),
        (dict(visual_token_ids=[torch.arange(9)], output_type="jpeg"), ValueError, "`output_type`"),
        (dict(visual_token_ids=[torch.arange(9)], generator=42), TypeError, "`generator`"),
        (
            dict(visual_token_ids=[torch.arange(9)], callback_on_step_end_tensor_inputs=["noise"]),
            ValueError,
            "callback",
        ),
    ],
)
def test_text2image_rejects_bad_input_before_any_model_runs(guarded_t2i, kwargs, error, words):
    with pytest.raises(error) as raised:
        guarded_t2i(**kwargs)
    assert words in str(raised.value)


def test_the_guard_stops_the_first_model_that_runs(guarded_t2i, guarded_understanding):
    """What the tests above rely on: valid input reaches a model, and the guard stops it there."""
    with pytest.raises(Exception, match="ForCausalLM") as raised:
        guarded_t2i("a duck", num_inference_steps=1)
    assert type(raised.value).__name__ == "ModelRan"
    with pytest.raises(Exception, match="LavitVisualTokenizer") as raised:
        guarded_understanding(PIL.Image.new("RGB", (16, 16)))
    assert type(raised.value).__name__ == "ModelRan"


def test_generate_visual_tokens_checks_too(guarded_t2i):
    with pytest.raises(ValueError, match="`top_p`"):
        guarded_t2i.generate_visual_tokens("a duck", top_p=0)


def test_greedy_ignores_sampling_only_arguments(t2i):
    codes = t2i.generate_visual_tokens("a duck", do_sample=False, temperature=0, top_p=0, max_new_tokens=21)
    assert len(codes[0]) > 0


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "1"])
def test_odd_image_modes_work_as_prompts(t2i, mode):
    image = PIL.Image.new("RGB", (37, 23), (120, 40, 200)).convert(mode)
    codes = t2i.generate_visual_tokens("<image> in the snow", image=image, do_sample=False, max_new_tokens=21)
    assert len(codes) == 1 and len(codes[0]) > 0


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (4000, 20)])
def test_tiny_and_very_wide_images_work(t2i, size):
    pixels = t2i.visual_image_processor.preprocess(PIL.Image.new("RGB", size, (10, 200, 30)))
    assert pixels.shape == (1, 3, 224, 224) and torch.isfinite(pixels).all()


def test_uint8_arrays_and_paths(t2i, tmp_path):
    path = tmp_path / "img.png"
    PIL.Image.new("RGB", (20, 20), (1, 2, 3)).save(path)
    array = np.zeros((20, 20, 3), dtype=np.uint8)
    pixels = t2i.visual_image_processor.preprocess([path, array])
    assert pixels.shape == (2, 3, 224, 224)


def test_long_prompt_is_truncated_with_a_warning(t2i, caplog):
    limit = t2i.language_model.config.max_position_embeddings
    prompt = " ".join(["wool"] * (limit + 50))
    with caplog.at_level("WARNING"):
        encoded = t2i.encode_prompt([prompt], [[]], max_new_tokens=20)
    assert len(encoded[0]) == limit - 20
    assert "fit the language model's context" in caplog.text


def test_understanding_rejects_bad_input_before_any_model_runs(guarded_understanding):
    pipe = guarded_understanding
    image = PIL.Image.new("RGB", (16, 16))
    cases = [
        (dict(image=image, num_beams=0), ValueError, "`num_beams`"),
        (dict(image=image, max_new_tokens=0), ValueError, "`max_new_tokens`"),
        (dict(image=image, min_new_tokens=9, max_new_tokens=4), ValueError, "`min_new_tokens`"),
        (dict(image=image, do_sample=True, temperature=-1), ValueError, "`temperature`"),
        (dict(image=image, prompt=3), TypeError, "`prompt`"),
        (dict(image=[image, image], prompt=["a", "b", "c"]), ValueError, "`prompt` has 3 entries"),
        (dict(image="/no/such/file.png"), FileNotFoundError, "/no/such/file.png"),
        (dict(image=torch.zeros(2, 3, 100, 100)), ValueError, "(B, 3, 224, 224)"),
    ]
    for kwargs, error, words in cases:
        with pytest.raises(error) as raised:
            pipe(**kwargs)
        assert words in str(raised.value), kwargs


def test_loading_a_folder_with_a_missing_component_names_it(converted_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(converted_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises((OSError, ValueError)) as raised:
        LavitText2ImagePipeline.from_pretrained(broken)
    assert "unet" in str(raised.value)


def test_loading_mismatched_components_names_them(converted_dir, tmp_path):
    broken = tmp_path / "mismatched"
    shutil.copytree(converted_dir, broken)
    config_path = broken / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 64
    config_path.write_text(json.dumps(config))
    with pytest.raises((ValueError, RuntimeError)) as raised:
        LavitText2ImagePipeline.from_pretrained(broken)
    assert "unet" in str(raised.value).lower() or "cross_attention" in str(raised.value)


def test_incompatible_components_passed_in_are_named(t2i):
    from lavit_pipelines import LavitPixelDecoder

    other = LavitPixelDecoder(
        codebook_size=64,
        codebook_dim=8,
        hidden_size=88,
        num_layers=1,
        mlp_dim=32,
        output_dim=16,
        prompt_embed_dims=(8, 8),
        pooled_embed_dim=8,
    )
    with pytest.raises(ValueError, match="`pixel_decoder`"):
        LavitText2ImagePipeline(**{**t2i.components, "pixel_decoder": other})


def test_interrupted_conversion_leaves_nothing(checkpoint_dir, tmp_path, monkeypatch):
    from lavit_pipelines import conversion

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, "convert_vae", interrupt)
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        conversion.convert(str(checkpoint_dir), str(parent / "lavit"))
    assert list(parent.iterdir()) == []
