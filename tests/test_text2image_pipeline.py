"""LavitText2ImagePipeline: parity with the original's references and diffusers conventions."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from diffusers.callbacks import PipelineCallback, SDCFGCutoffCallback, SDXLCFGCutoffCallback

from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline

VISUAL_OFFSET = 32002


def as_list(value):
    """reference.json stores some long id lists as JSON strings."""
    return json.loads(value) if isinstance(value, str) else value


def codes_of(ids: list[int]) -> torch.Tensor:
    """LLM ids (with the leading start id) -> visual codes."""
    ids = torch.tensor(ids)
    return ids[ids >= VISUAL_OFFSET] - VISUAL_OFFSET


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pipe(converted_dir):
    pipe = LavitText2ImagePipeline.from_pretrained(converted_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref(reference):
    return reference


@pytest.fixture
def small(ref):
    """Arguments for a fast decode at the fixture's size."""
    decode = ref[0]["t2i_decode"]
    return dict(height=decode["height"], width=decode["width"], num_inference_steps=2)


# ------------------------------------------------------------------ parity with the original


def test_greedy_tokens_match_original(pipe, ref):
    data, _ = ref
    codes = pipe.generate_visual_tokens(data["t2i_prompt"], do_sample=False, max_new_tokens=40)
    assert torch.equal(codes[0], codes_of(data["t2i_greedy_token_ids"][0]))


def test_sampled_tokens_match_original_seed(pipe, ref):
    data, _ = ref
    expected = codes_of(data["t2i_sampled_token_ids"][0])
    torch.manual_seed(data["t2i_sampled_seed"])
    global_rng = pipe.generate_visual_tokens(data["t2i_prompt"], max_new_tokens=40)
    generator = torch.Generator().manual_seed(data["t2i_sampled_seed"])
    own_rng = pipe.generate_visual_tokens(data["t2i_prompt"], max_new_tokens=40, generator=generator)
    assert torch.equal(global_rng[0], expected)
    assert torch.equal(own_rng[0], expected)


def test_prompt_ids_have_no_bos(pipe, ref):
    data, _ = ref
    encoded = pipe.encode_prompt([data["t2i_prompt"]], [[]])
    assert encoded[0].tolist() == data["t2i_prompt_ids"] + [32000]


def test_image_text_prompt_matches_original(pipe, ref, fixture_dir):
    data, _ = ref
    dog = PIL.Image.open(fixture_dir / "reference" / "image_0.png")
    torch.manual_seed(data["seed"] + 5)
    encoded = pipe.encode_prompt(["<image> It is running in the snow"], [[dog]])
    assert encoded[0].tolist() == as_list(data["mm_prompt_token_ids"]) + [32000]
    torch.manual_seed(data["seed"] + 5)
    codes = pipe.generate_visual_tokens(
        "<image>It is running in the snow", image=dog, do_sample=False, max_new_tokens=30
    )
    expected = torch.tensor(as_list(data["mm_greedy_token_ids"])[0][1:31]) - VISUAL_OFFSET
    assert torch.equal(codes[0], expected)


def test_image_from_tokens_and_latents_matches_original(pipe, ref):
    data, tensors = ref
    decode = data["t2i_decode"]
    out = pipe(
        visual_token_ids=[codes_of(data["t2i_greedy_token_ids"][0])],
        latents=tensors["t2i_latents"],
        height=decode["height"],
        width=decode["width"],
        num_inference_steps=decode["num_inference_steps"],
        guidance_scale=decode["guidance_scale"],
        output_type="np",
    )
    diff = np.abs(to_uint8(out.images[0]).astype(int) - tensors["t2i_image"].numpy().astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_lowres_image_matches_original(converted_lowres_dir, ref):
    data, tensors = ref
    pipe = LavitText2ImagePipeline.from_pretrained(converted_lowres_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.pixel_decoder.config.variant == "lowres"
    torch.manual_seed(data["seed"] + 6)
    latents = torch.randn((1, 4, 8, 8))
    out = pipe(
        visual_token_ids=[codes_of(data["t2i_greedy_token_ids"][0])],
        latents=latents,
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="np",
    )
    assert out.images.shape == (1, 64, 64, 3)  # the low-res UNet's native size in the tiny fixture
    diff = np.abs(to_uint8(out.images[0]).astype(int) - tensors["lowres_image"].numpy().astype(int))
    assert diff.max() <= 1


# ------------------------------------------------------------------ diffusers conventions


def test_batched_prompts_match_single_prompts(pipe):
    prompts = ["a duck", "a sculpture of a duck made of wool on a table"]
    batched = pipe.generate_visual_tokens(prompts, do_sample=False, max_new_tokens=25)
    for prompt, codes in zip(prompts, batched):
        assert torch.equal(codes, pipe.generate_visual_tokens(prompt, do_sample=False, max_new_tokens=25)[0])


def test_token_limits(pipe):
    codes = pipe.generate_visual_tokens("a duck", do_sample=False, min_new_tokens=5, max_new_tokens=12)
    assert 5 <= len(codes[0]) <= 12
    assert codes[0].min() >= 0 and codes[0].max() < pipe.pixel_decoder.config.codebook_size


def test_num_images_per_prompt_and_generator_determinism(pipe, small):
    def run(seed):
        return pipe(
            ["a duck", "a cat"],
            num_images_per_prompt=2,
            max_new_tokens=22,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            **small,
        )

    first, second = run(0), run(0)
    assert first.images.shape == (4, 64, 64, 3) and len(first.visual_token_ids) == 4
    assert np.array_equal(first.images, second.images)
    assert all(torch.equal(a, b) for a, b in zip(first.visual_token_ids, second.visual_token_ids))
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    listed = pipe(
        ["a duck", "a cat"], num_images_per_prompt=2, max_new_tokens=22, generator=generators, output_type="np", **small
    )
    assert listed.images.shape == (4, 64, 64, 3)


@pytest.mark.parametrize(
    "output_type, shape", [("np", (1, 64, 64, 3)), ("pt", (1, 3, 64, 64)), ("latent", (1, 4, 8, 8))]
)
def test_output_types(pipe, small, output_type, shape):
    out = pipe(visual_token_ids=[torch.arange(30)], output_type=output_type, **small)
    assert tuple(out.images.shape) == shape


def test_pil_output_and_tuple_return(pipe, small):
    images, codes = pipe(visual_token_ids=[torch.arange(30)], return_dict=False, **small)
    assert isinstance(images[0], PIL.Image.Image) and images[0].size == (64, 64)
    assert torch.equal(codes[0], torch.arange(30))


def test_callback_on_step_end_sees_and_replaces_latents(pipe, small):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = pipe(
        visual_token_ids=[torch.arange(30)],
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        output_type="latent",
        **small,
    )
    assert [s[0] for s in seen] == [0, 1] and seen[0][1] == (1, 4, 8, 8) and seen[0][2][0] == 2
    assert torch.count_nonzero(out.images) == 0


def test_pipeline_callback_object_changes_guidance(pipe, small):
    class LowerGuidance(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            pipeline._guidance_scale = 1.0
            return callback_kwargs

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(visual_token_ids=[torch.arange(30)], latents=latents, output_type="latent", **small)
    changed = pipe(callback_on_step_end=LowerGuidance(), **kwargs).images
    assert pipe.guidance_scale == 1.0
    assert not torch.allclose(changed, pipe(**kwargs).images)


def test_save_pretrained_round_trip(pipe, small, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = LavitText2ImagePipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(visual_token_ids=[torch.arange(40)], latents=latents, output_type="np", **small)
    assert np.array_equal(pipe(**kwargs).images, reloaded(**kwargs).images)
    assert reloaded.visual_tokenizer is not None


def test_every_component_loads_and_saving_keeps_it(converted_dir, tmp_path):
    pipe = LavitText2ImagePipeline.from_pretrained(converted_dir)
    assert pipe.visual_tokenizer is not None
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["visual_tokenizer"][1] == "LavitVisualTokenizer"
    understanding = LavitUnderstandingPipeline.from_pretrained(tmp_path / "saved")
    assert understanding.visual_tokenizer is not None


def test_default_guidance_scale_is_a_setting_of_the_folder(pipe, small, tmp_path):
    """`default_guidance_scale` travels in model_index.json, is what a call without `guidance_scale` uses, does
    not stop the understanding pipeline from loading the folder, and a bad value is refused before loading."""
    assert pipe.config.default_guidance_scale == 7.0  # LaVIT's, for folders that do not say
    LavitText2ImagePipeline(**pipe.components, default_guidance_scale=2.5).save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["default_guidance_scale"] == 2.5
    reloaded = LavitText2ImagePipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(visual_token_ids=[torch.arange(40)], latents=latents, output_type="np", **small)
    default = reloaded(**kwargs).images
    assert np.array_equal(default, reloaded(**kwargs, guidance_scale=2.5).images)
    assert not np.array_equal(default, reloaded(**kwargs, guidance_scale=7.0).images)
    assert LavitUnderstandingPipeline.from_pretrained(tmp_path / "saved").visual_tokenizer is not None
    index_path = tmp_path / "saved" / "model_index.json"
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "default_guidance_scale": -1}))
    with pytest.raises(ValueError, match="default_guidance_scale"):
        LavitText2ImagePipeline.from_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="`default_guidance_scale` must be a finite number"):
        LavitText2ImagePipeline(**pipe.components, default_guidance_scale=float("nan"))


def test_visual_tokenizer_skipped_only_when_passed_none(converted_dir):
    pipe = LavitText2ImagePipeline.from_pretrained(converted_dir, visual_tokenizer=None)
    assert pipe.visual_tokenizer is None
    with pytest.raises(ValueError, match="visual_tokenizer=None"):
        pipe("<image> in the snow", image=PIL.Image.new("RGB", (32, 32)))


def test_understanding_from_pipe_shares_components(pipe, fixture_dir):
    understanding = LavitUnderstandingPipeline.from_pipe(pipe)
    assert understanding.language_model is pipe.language_model
    assert understanding.visual_tokenizer is pipe.visual_tokenizer
    understanding.set_progress_bar_config(disable=True)
    image = PIL.Image.open(fixture_dir / "reference" / "image_0.png")
    assert len(understanding(image, max_new_tokens=3).text) == 1


def euler_leading(pipe) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")


def sdxl_from(pipe, scheduler) -> StableDiffusionXLPipeline:
    sdxl = StableDiffusionXLPipeline(
        vae=pipe.vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=pipe.unet,
        scheduler=scheduler,
    )
    sdxl.set_progress_bar_config(disable=True)
    return sdxl


def run_sdxl(sdxl, cond, latents, **kwargs):
    return sdxl(
        prompt_embeds=cond.prompt_embeds,
        pooled_prompt_embeds=cond.pooled_prompt_embeds,
        negative_prompt_embeds=cond.negative_prompt_embeds,
        negative_pooled_prompt_embeds=cond.negative_pooled_prompt_embeds,
        latents=latents,
        **kwargs,
    ).images


def test_euler_scheduler_matches_sdxl_and_repeats(pipe, small):
    """Euler's `init_noise_sigma` depends on the timesteps: they must be set before the latents are scaled."""
    codes = [torch.arange(5, 60)]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    original = pipe.scheduler
    try:
        pipe.scheduler = euler_leading(pipe)
        ours = [pipe(visual_token_ids=codes, latents=latents, output_type="np", **small).images for _ in range(2)]
    finally:
        pipe.scheduler = original
    theirs = run_sdxl(
        sdxl_from(pipe, euler_leading(pipe)),
        pipe.encode_visual_tokens(codes),
        latents,
        guidance_scale=7.0,
        output_type="np",
        **small,
    )
    assert np.array_equal(ours[0], ours[1])
    assert np.abs(ours[0] - theirs).max() < 1e-5


def test_custom_timesteps_and_sigmas_match_sdxl(pipe):
    codes = [torch.arange(5, 60)]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = pipe.encode_visual_tokens(codes)
    original = pipe.scheduler
    for schedule in (dict(timesteps=[999, 500, 20]), dict(sigmas=[14.0, 3.0, 0.5])):
        try:
            pipe.scheduler = euler_leading(pipe)
            ours = pipe(
                visual_token_ids=codes, latents=latents, output_type="np", height=64, width=64, **schedule
            ).images
        finally:
            pipe.scheduler = original
        theirs = run_sdxl(
            sdxl_from(pipe, euler_leading(pipe)),
            cond,
            latents,
            output_type="np",
            height=64,
            width=64,
            guidance_scale=7.0,
            **schedule,
        )
        assert np.abs(ours - theirs).max() < 1e-5


def test_custom_timesteps_refused_by_a_scheduler_without_them(pipe, small):
    with pytest.raises(ValueError, match="custom"):
        pipe(visual_token_ids=[torch.arange(30)], timesteps=[999, 500], **small)


@pytest.mark.parametrize("callback_cls", [SDCFGCutoffCallback, SDXLCFGCutoffCallback])
@pytest.mark.parametrize("variant", ["highres", "lowres"])
def test_diffusers_cfg_cutoff_callbacks(callback_cls, variant, pipe, converted_lowres_dir, small):
    """Guidance off from step 1: the same as guidance on for step 0 only (negatives cut away by the callback)."""
    if variant == "lowres":
        pipe = LavitText2ImagePipeline.from_pretrained(converted_lowres_dir)
        pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(visual_token_ids=[torch.arange(30)], latents=latents, output_type="latent", **small)
    cut = pipe(callback_on_step_end=callback_cls(cutoff_step_ratio=None, cutoff_step_index=0), **kwargs).images
    assert pipe.guidance_scale == 0.0

    def switch_off(pipeline, step, timestep, tensors):
        pipeline._guidance_scale = 0.0
        return {}

    assert torch.allclose(
        cut, pipe(callback_on_step_end=switch_off, callback_on_step_end_tensor_inputs=[], **kwargs).images, atol=1e-6
    )
    assert not torch.allclose(cut, pipe(**kwargs).images)


def test_callback_sees_every_tensor_input(pipe, small):
    """diffusers' generic test: every name in `_callback_tensor_inputs` reaches the callback."""
    seen = {}

    def callback(pipeline, step, timestep, tensors):
        seen.update({k: tuple(v.shape) for k, v in tensors.items()})
        return tensors

    pipe(
        visual_token_ids=[torch.arange(30)],
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
        **small,
    )
    queries, width = pipe.pixel_decoder.config.num_queries, pipe.unet.config.cross_attention_dim
    assert seen == {
        "latents": (1, 4, 8, 8),
        "prompt_embeds": (2, queries, width),
        "add_text_embeds": (2, 48),
        "add_time_ids": (2, 6),
    }


def test_encode_visual_tokens_composes_with_sdxl_pipeline(pipe, small):
    codes = [torch.arange(5, 60)]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = pipe(visual_token_ids=codes, latents=latents, guidance_scale=7.0, output_type="np", **small).images
    theirs = run_sdxl(
        sdxl_from(pipe, pipe.scheduler),
        pipe.encode_visual_tokens(codes),
        latents,
        guidance_scale=7.0,
        output_type="np",
        **small,
    )
    assert np.abs(ours - theirs).max() < 1e-5


def test_reconstruct_uses_stage1_tokens(pipe, ref, small, fixture_dir):
    data, tensors = ref
    image = PIL.Image.open(fixture_dir / "reference" / "image_0.png")
    torch.manual_seed(data["seed"] + 1)
    expected = pipe.visual_tokenizer.tokenize(tensors["pixel_values"])[0]
    out = pipe.reconstruct(image, generator=torch.Generator().manual_seed(data["seed"] + 1), output_type="np", **small)
    assert out.images.shape == (1, 64, 64, 3)
    assert torch.equal(out.visual_token_ids[0], expected)


def test_model_cpu_offload_hooks(converted_dir, small):
    pipe = LavitText2ImagePipeline.from_pretrained(converted_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    out = pipe("a duck", max_new_tokens=21, generator=torch.Generator().manual_seed(0), output_type="np", **small)
    assert out.images.shape == (1, 64, 64, 3)
    assert all(hasattr(m, "_hf_hook") for m in (pipe.language_model, pipe.pixel_decoder, pipe.unet, pipe.vae))
