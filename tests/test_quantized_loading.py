"""Quantized loading (`lavit_pipelines.quantization`, `--quantize`) with the backends installed: torchao int8 on the
tiny fixture and the demo model, saving and loading back, what stays unquantized."""

import json

import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torchao.quantization import Int8Tensor

from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline
from lavit_pipelines.cli import main
from lavit_pipelines.demo import default_model_path
from lavit_pipelines.evaluation.shapes import generation_scenes, held_out_scenes
from lavit_pipelines.quantization import (
    pipeline_quantization_config,
)
from lavit_pipelines.worlds.shapes import render


def int8_config(pipeline_cls):
    return pipeline_quantization_config("int8", pipeline_cls.component_names(), "cpu")


def greedy_tokens(pipe, prompts):
    pipe.set_progress_bar_config(disable=True)
    return [pipe.generate_visual_tokens(p, do_sample=False)[0] for p in prompts]


@pytest.fixture(scope="module")
def demo_int8():
    return LavitText2ImagePipeline.from_pretrained(
        default_model_path(), dtype=torch.bfloat16, quantization_config=int8_config(LavitText2ImagePipeline)
    )


def test_int8_quantizes_the_linear_layers_of_the_language_model_and_unet_only(demo_int8):
    llm, unet = demo_int8.language_model, demo_int8.unet
    assert isinstance(llm.model.layers[0].mlp.down_proj.weight, Int8Tensor)
    assert isinstance(unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight, Int8Tensor)
    kept = [
        llm.lm_head.weight,
        llm.model.embed_tokens.weight,
        llm.model.norm.weight,
        unet.conv_in.weight,
        demo_int8.pixel_decoder.codebook.weight,
        *demo_int8.visual_tokenizer.parameters(),
    ]
    assert all(type(p) is torch.nn.Parameter and p.dtype in (torch.bfloat16, torch.float32) for p in kept)


def test_int8_demo_model_generates_the_visual_tokens_of_bfloat16(demo_int8):
    reference = LavitText2ImagePipeline.from_pretrained(
        default_model_path(), dtype=torch.bfloat16, visual_tokenizer=None
    )
    prompts = [scene.caption for scene in generation_scenes(2)]
    quantized, expected = greedy_tokens(demo_int8, prompts), greedy_tokens(reference, prompts)
    # Greedy sequences part at their first different token; RESULTS §10 reports the agreement over more prompts.
    same = sum(int((q[: len(e)] == e[: len(q)]).sum()) for q, e in zip(quantized, expected))
    assert all(q[0] == e[0] for q, e in zip(quantized, expected)), (expected, quantized)
    assert same >= 0.5 * sum(len(e) for e in expected), (same, expected, quantized)
    image = demo_int8(
        "a red circle in the center",
        num_inference_steps=3,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    shape = image[:, image.min(dim=0).values < 0.8]  # (3, pixels) that are not white
    red, green, blue = shape.mean(dim=1).tolist()
    assert shape.shape[1] > 50 and red > green + 0.3 and red > blue + 0.3, (shape.shape, red, green, blue)


def test_int8_demo_model_captions_as_bfloat16():
    kwargs = {"dtype": torch.bfloat16}
    reference = LavitUnderstandingPipeline.from_pretrained(default_model_path(), **kwargs)
    quantized = LavitUnderstandingPipeline.from_pretrained(
        default_model_path(), quantization_config=int8_config(LavitUnderstandingPipeline), **kwargs
    )
    assert isinstance(quantized.language_model.model.layers[0].self_attn.q_proj.weight, Int8Tensor)
    images = [render(scene) for scene in held_out_scenes(4)]
    assert quantized.caption(images) == reference.caption(images)
    assert quantized.answer(images[0], "what color is the shape?") == reference.answer(
        images[0], "what color is the shape?"
    )


def test_int8_tiny_pipelines_follow_the_unquantized_logits(converted_dir):
    reference = LavitText2ImagePipeline.from_pretrained(converted_dir)
    quantized = LavitText2ImagePipeline.from_pretrained(
        converted_dir, quantization_config=int8_config(LavitText2ImagePipeline)
    )
    ids = torch.tensor([[5, 9, 14, 32000]])
    with torch.no_grad():
        expected, got = (p.language_model(ids).logits for p in (reference, quantized))
    assert (got - expected).norm() < 0.05 * expected.norm()  # 3.0 % measured (random weights, 2 layers)
    out = quantized(
        "a duck",
        height=64,
        width=64,
        num_inference_steps=2,
        max_new_tokens=6,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape[-2:] == (64, 64) and torch.isfinite(out.images).all()
    understanding = LavitUnderstandingPipeline.from_pretrained(
        converted_dir, quantization_config=int8_config(LavitUnderstandingPipeline)
    )
    assert len(understanding.caption(PIL.Image.new("RGB", (32, 32), "red"), max_new_tokens=4)) == 1


def test_int8_pipeline_saves_and_loads_back_quantized(demo_int8, tmp_path):
    demo_int8.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "language_model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    loaded = LavitText2ImagePipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    weight = loaded.language_model.model.layers[0].mlp.down_proj.weight
    assert isinstance(weight, Int8Tensor) and torch.equal(
        weight.qdata, demo_int8.language_model.model.layers[0].mlp.down_proj.weight.qdata
    )
    assert isinstance(loaded.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight, Int8Tensor)
    prompts = [scene.caption for scene in generation_scenes(1)]
    assert all(map(torch.equal, greedy_tokens(loaded, prompts), greedy_tokens(demo_int8, prompts)))


def test_saved_quantized_folder_lacking_a_layer_is_refused(demo_int8, tmp_path):
    demo_int8.save_pretrained(tmp_path)
    path = tmp_path / "language_model" / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys() if ".layers.0.mlp.up_proj." not in key}
        metadata = f.metadata()
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=r"`language_model`.*lack 1 tensors \(model.layers.0.mlp.up_proj.weight\)"):
        LavitText2ImagePipeline.from_pretrained(tmp_path)


def test_cli_int8_generate_and_caption(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert (
        main(
            [
                "generate",
                "a red circle in the center",
                "--quantize",
                "int8",
                "--output",
                str(out),
                "--steps",
                "2",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    assert PIL.Image.open(out).size == (64, 64)
    assert main(["caption", str(out), "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.count("\n") == 2  # the image path, then one caption
