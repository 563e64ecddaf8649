"""diffusers' generic `PipelineTesterMixin` (tests/pipelines/test_pipelines_common.py of diffusers 0.42) on both
LaVIT pipelines, built from the in-code tiny components.

Each of the mixin's tests is in `MIXIN_TESTS`: either the project test that performs its check here (this module or
another one), or the reason it does not apply. The tests below are the save/load ones: what `save_pretrained`
writes (safetensors or `.bin`, with or without a variant), `from_pretrained` loads, in the dtypes asked.
"""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline
from lavit_pipelines.tiny import build_tiny_components

TESTS = Path(__file__).parent
PIPELINES = [LavitText2ImagePipeline, LavitUnderstandingPipeline]
UNDERSTANDING = ("tokenizer", "language_model", "visual_tokenizer")

# The mixin's tests -> "module::test" doing its check in this project, or "n/a: reason".
MIXIN_TESTS = {
    "test_save_load_local": "test_pipeline_tester_mixin.py::test_save_load_local",
    "test_pipeline_call_signature": "test_diffusers_conventions.py::test_callback_signature_and_last_latents",
    "test_inference_batch_consistent": "test_diffusers_conventions.py::test_num_images_per_prompt_multiplies_the_batch",
    "test_inference_batch_single_identical": "test_diffusers_conventions.py::test_batch_equals_single",
    "test_dict_tuple_outputs_equivalent": "test_diffusers_conventions.py::test_dict_and_tuple_outputs_are_equivalent",
    "test_components_function": "test_diffusers_conventions.py::test_components_are_the_init_arguments",
    "test_float16_inference": "n/a: needs a CUDA or XPU device (skipped by diffusers without one); the CPU CI has none",
    "test_save_load_float16": "test_pipeline_tester_mixin.py::test_save_load_in_half_precision",
    "test_save_load_optional_components": "test_diffusers_conventions.py::test_save_load_with_optional_components_none",
    "test_to_device": "test_diffusers_conventions.py::test_to_dtype_and_device",
    "test_to_dtype": "test_diffusers_conventions.py::test_to_dtype_and_device",
    "test_attention_slicing_forward_pass": "test_diffusers_conventions.py::test_attention_slicing_keeps_the_result",
    "test_sequential_cpu_offload_forward_pass": "test_speed_paths.py::test_vision_components_compute_the_same_under_per_module_offload_hooks",
    "test_model_cpu_offload_forward_pass": "test_text2image_pipeline.py::test_model_cpu_offload_hooks",
    "test_cpu_offload_forward_pass_twice": "n/a: needs an accelerator (diffusers' @require_accelerator); offload moves "
    "weights between CPU and that device",
    "test_sequential_offload_forward_pass_twice": "n/a: needs an accelerator (diffusers' @require_accelerator)",
    "test_xformers_attention_forwardGenerator_pass": "n/a: xformers runs on CUDA only",
    "test_num_images_per_prompt": "test_diffusers_conventions.py::test_num_images_per_prompt_multiplies_the_batch",
    "test_cfg": "test_diffusers_conventions.py::test_callback_changes_guidance_every_step",
    "test_callback_inputs": "test_diffusers_conventions.py::test_callback_signature_and_last_latents",
    "test_callback_cfg": "test_diffusers_conventions.py::test_callback_changes_guidance_every_step",
    "test_serialization_with_variants": "test_pipeline_tester_mixin.py::test_serialization_with_variants",
    "test_loading_with_variants": "test_pipeline_tester_mixin.py::test_loading_with_variants",
    "test_loading_with_incorrect_variants_raises_error": "test_pipeline_tester_mixin.py::test_loading_with_incorrect_variants_raises_error",
    "test_encode_prompt_works_in_isolation": "n/a: the LaVIT pipelines take no `prompt_embeds`; `encode_prompt` (the "
    "prompt's ids) is compared with the original in test_text2image_pipeline",
    "test_StableDiffusionMixin_component": "test_diffusers_conventions.py::test_stable_diffusion_mixin",
    "test_layerwise_casting_inference": "test_pipeline_tester_mixin.py::test_layerwise_casting_inference",
    "test_group_offloading_inference": "n/a: needs an accelerator (diffusers' @require_torch_accelerator)",
    "test_dtype_dict": "test_pipeline_tester_mixin.py::test_dtype_dict",
    "test_dtype_alias": "test_pipeline_tester_mixin.py::test_dtype_alias",
    "test_pipeline_with_accelerator_device_map": "test_pipeline_tester_mixin.py::test_device_map_loads_the_same",
    "test_pipeline_level_group_offloading_sanity_checks": "n/a: needs an accelerator (@require_torch_accelerator)",
    "test_pipeline_level_group_offloading_inference": "n/a: needs an accelerator (@require_torch_accelerator)",
}


@pytest.mark.parametrize("name, where", MIXIN_TESTS.items())
def test_each_mixin_test_is_done_here_or_has_a_reason(name, where):
    if where.startswith("n/a: "):
        assert len(where) > 20, f"{name}: give the reason it does not apply"
        return
    module, test = where.split("::")
    assert f"def {test}(" in (TESTS / module).read_text(), f"{name}: {where} does not exist"


def build(pipeline_cls):
    components = build_tiny_components()
    if pipeline_cls is LavitUnderstandingPipeline:
        components = {name: components[name] for name in UNDERSTANDING}
    pipe = pipeline_cls(**components)
    for model in models(pipe).values():
        model.eval()  # as from_pretrained leaves them
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe) -> np.ndarray:
    """Images (text-to-image from fixed codes and latents) or generated ids (understanding, greedy)."""
    if isinstance(pipe, LavitText2ImagePipeline):
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return pipe(
            visual_token_ids=[torch.arange(3, 40)],
            latents=latents.to(pipe.unet.dtype),
            num_inference_steps=2,
            output_type="np",
        ).images
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    return pipe(
        image, prompt="a photo of", max_new_tokens=5, min_new_tokens=5, generator=torch.Generator().manual_seed(0)
    ).sequences.numpy()


def models(pipe) -> dict:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


@pytest.mark.parametrize("safe_serialization", [True, False])
@pytest.mark.parametrize("pipeline_cls", PIPELINES)
def test_save_load_local(pipeline_cls, safe_serialization, tmp_path):
    pipe = build(pipeline_cls)
    pipe.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    loaded = pipeline_cls.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(run(loaded).astype(np.float64) - run(pipe)).max() < 5e-4


@pytest.mark.parametrize("pipeline_cls", PIPELINES)
def test_save_load_in_half_precision(pipeline_cls, tmp_path):
    """The mixin's float16 test, in bfloat16 (what CPUs compute): every component keeps the dtype it was asked."""
    pipe = build(pipeline_cls)
    pipe.save_pretrained(tmp_path)
    loaded = pipeline_cls.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {name: m.dtype for name, m in models(loaded).items()} == {name: torch.bfloat16 for name in models(pipe)}
    loaded.set_progress_bar_config(disable=True)
    assert np.isfinite(run(loaded)).all()


@pytest.mark.parametrize("pipeline_cls", PIPELINES)
def test_serialization_with_variants(pipeline_cls, tmp_path):
    pipe = build(pipeline_cls)
    pipe.save_pretrained(tmp_path, variant="fp16", safe_serialization=False)
    for name in models(pipe):
        assert any(file.split(".")[1] == "fp16" for file in os.listdir(tmp_path / name)), name


@pytest.mark.parametrize("safe_serialization", [True, False])
@pytest.mark.parametrize("pipeline_cls", PIPELINES)
def test_loading_with_variants(pipeline_cls, safe_serialization, tmp_path):
    pipe = build(pipeline_cls)
    pipe.save_pretrained(tmp_path, variant="fp16", safe_serialization=safe_serialization)
    loaded = pipeline_cls.from_pretrained(tmp_path, variant="fp16")
    for name, model in models(pipe).items():
        reloaded = dict(models(loaded)[name].named_parameters())
        for key, value in model.named_parameters():
            assert torch.equal(value, reloaded[key]), f"{name}.{key}"


@pytest.mark.parametrize("pipeline_cls", PIPELINES)
def test_loading_with_incorrect_variants_raises_error(pipeline_cls, tmp_path):
    build(pipeline_cls).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="You are trying to load the model files of the `variant=fp16`"):
        pipeline_cls.from_pretrained(tmp_path, variant="fp16")


@pytest.mark.parametrize("pipeline_cls", PIPELINES)
def test_dtype_dict(pipeline_cls, tmp_path):
    pipe = build(pipeline_cls)
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    first = next(iter(models(pipe)))
    dtypes = {first: torch.bfloat16, "default": torch.float16}
    loaded = pipeline_cls.from_pretrained(tmp_path, dtype=dtypes)
    assert {name: m.dtype for name, m in models(loaded).items()} == {
        name: dtypes.get(name, torch.float16) for name in models(pipe)
    }


@pytest.mark.parametrize("pipeline_cls", PIPELINES)
def test_dtype_alias(pipeline_cls, tmp_path):
    """`torch_dtype` (the older name) and `dtype` load the same dtypes."""
    build(pipeline_cls).save_pretrained(tmp_path, safe_serialization=False)
    for keyword in ("dtype", "torch_dtype"):
        loaded = pipeline_cls.from_pretrained(tmp_path, **{keyword: torch.float16})
        assert {m.dtype for m in models(loaded).values()} == {torch.float16}, keyword


@pytest.mark.parametrize("pipeline_cls", PIPELINES)
def test_device_map_loads_the_same(pipeline_cls, tmp_path):
    pipe = build(pipeline_cls)
    pipe.save_pretrained(tmp_path)
    loaded = pipeline_cls.from_pretrained(tmp_path, device_map="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(run(loaded).astype(np.float64) - run(pipe)).max() < 1e-4


def test_layerwise_casting_inference():
    pipe = build(LavitText2ImagePipeline)
    pipe.to(dtype=torch.bfloat16)
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert np.isfinite(run(pipe)).all()


class WritesAFile:
    """Unpickled without `weights_only`, this would create the file `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("component", ["visual_tokenizer", "pixel_decoder", "unet", "vae"])
def test_a_bin_pickle_that_would_run_code_is_refused_and_never_runs(component, tmp_path):
    pipe = build(LavitText2ImagePipeline)
    pipe.save_pretrained(tmp_path / "model", safe_serialization=False)
    weights = tmp_path / "model" / component / "diffusion_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "payload": WritesAFile(tmp_path / "ran")}, weights)
    with pytest.raises(ValueError) as raised:
        LavitText2ImagePipeline.from_pretrained(tmp_path / "model")
    message = str(raised.value)
    assert f"`{component}`" in message and str(weights) in message and "nothing in it was executed" in message
    assert "\n" not in message
    assert not (tmp_path / "ran").exists()
    with pytest.raises(pickle.UnpicklingError):  # what torch itself says: weights_only refuses the object
        torch.load(weights, weights_only=True)
    assert not (tmp_path / "ran").exists()


def test_a_truncated_bin_is_named(tmp_path):
    build(LavitText2ImagePipeline).save_pretrained(tmp_path, safe_serialization=False)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"`unet`: .*diffusion_pytorch_model.bin is not a readable weight file"):
        LavitText2ImagePipeline.from_pretrained(tmp_path)


def test_bin_weights_are_checked_against_the_config(tmp_path):
    """The same shape checks as for safetensors, from the `.bin` (read onto the meta device)."""
    build(LavitText2ImagePipeline).save_pretrained(tmp_path, safe_serialization=False)
    config = tmp_path / "pixel_decoder" / "config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "num_layers": settings["num_layers"] + 1}))
    with pytest.raises(ValueError, match="`pixel_decoder` does not match its config in .*lack"):
        LavitText2ImagePipeline.from_pretrained(tmp_path)
