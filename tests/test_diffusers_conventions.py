"""The generic behaviours that diffusers' own `PipelineTesterMixin` checks, on the in-code tiny model:
components, optional components through save/load, dtype and device moves, dict/tuple outputs, batches,
callbacks with every tensor input and changing guidance, progress bars, attention slicing and
`StableDiffusionMixin`'s conveniences."""

import inspect
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionMixin

from lavit_pipelines import LavitText2ImagePipeline
from lavit_pipelines.tiny import build_tiny_components

CODES = [torch.arange(3, 40), torch.arange(100, 130)]


@pytest.fixture(scope="module")
def pipe():
    pipe = LavitText2ImagePipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(batch: int = 1, **overrides) -> dict:
    latents = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return dict(visual_token_ids=CODES[:batch], latents=latents, num_inference_steps=2, output_type="np", **overrides)


def test_components_are_the_init_arguments(pipe):
    init = set(inspect.signature(LavitText2ImagePipeline.__init__).parameters) - {"self"}
    assert set(pipe.components) == init - {"default_guidance_scale"}  # a setting, as diffusers' own test leaves out
    rebuilt = LavitText2ImagePipeline(**pipe.components)
    rebuilt.set_progress_bar_config(disable=True)
    assert np.array_equal(rebuilt(**inputs()).images, pipe(**inputs()).images)


def test_save_load_with_optional_components_none(pipe, tmp_path):
    components = {**pipe.components, **{name: None for name in pipe._optional_components}}
    bare = LavitText2ImagePipeline(**components)
    bare.set_progress_bar_config(disable=True)
    bare.save_pretrained(tmp_path)
    loaded = LavitText2ImagePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert all(getattr(loaded, name) is None for name in pipe._optional_components)
    assert np.abs(loaded(**inputs()).images - bare(**inputs()).images).max() < 1e-4


def test_to_dtype_and_device(pipe):
    copy = LavitText2ImagePipeline(**build_tiny_components())
    models = [c for c in copy.components.values() if isinstance(c, torch.nn.Module)]
    assert {m.dtype for m in models} == {torch.float32}
    copy.to(dtype=torch.bfloat16)
    assert {m.dtype for m in models} == {torch.bfloat16}
    copy.to("cpu")
    assert {m.device.type for m in models} == {"cpu"}


def test_dict_and_tuple_outputs_are_equivalent(pipe):
    images, codes = pipe(**inputs(), return_dict=False)
    assert np.array_equal(images, pipe(**inputs()).images)


def test_batch_equals_single(pipe):
    batched = pipe(**inputs(batch=2)).images
    for row in range(2):
        single = pipe(
            visual_token_ids=[CODES[row]],
            latents=inputs(batch=2)["latents"][row : row + 1],
            num_inference_steps=2,
            output_type="np",
        ).images
        assert np.abs(batched[row] - single[0]).max() < 1e-4


def test_num_images_per_prompt_multiplies_the_batch(pipe):
    out = pipe(visual_token_ids=CODES, num_images_per_prompt=3, num_inference_steps=2, output_type="latent")
    assert out.images.shape[0] == 6 and len(out.visual_token_ids) == 6


def test_callback_signature_and_last_latents(pipe):
    parameters = inspect.signature(pipe.__call__).parameters
    assert "callback_on_step_end" in parameters and "callback_on_step_end_tensor_inputs" in parameters

    def zero_last(pipeline, step, timestep, tensors):
        assert set(tensors) == set(pipeline._callback_tensor_inputs)
        if step == pipeline.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    out = pipe(
        **{**inputs(), "output_type": "latent"},
        callback_on_step_end=zero_last,
        callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
    )
    assert out.images.abs().sum() == 0


def test_callback_changes_guidance_every_step(pipe):
    def raise_guidance(pipeline, step, timestep, tensors):
        pipeline._guidance_scale += 1.0
        return tensors

    pipe(
        **inputs(guidance_scale=2.0),
        callback_on_step_end=raise_guidance,
        callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
    )
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps


def test_progress_bars_are_labelled_and_end_full(capsys):
    pipe = LavitText2ImagePipeline(**build_tiny_components())
    pipe(
        "a duck",
        max_new_tokens=30,
        min_new_tokens=2,
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    err = capsys.readouterr().err
    tokens = re.findall(r"visual tokens: 100%\S* *(\d+)/(\d+)", err)
    assert tokens and tokens[-1][0] == tokens[-1][1]
    assert re.search(r"denoising: 100%\S* *2/2", err)
    pipe.set_progress_bar_config(disable=True)
    pipe(**inputs())
    assert capsys.readouterr().err == ""


def test_attention_slicing_keeps_the_result(pipe):
    expected = pipe(**inputs()).images
    pipe.enable_attention_slicing(slice_size=1)
    try:
        assert np.abs(pipe(**inputs()).images - expected).max() < 1e-4
    finally:
        pipe.disable_attention_slicing()


def test_stable_diffusion_mixin(pipe):
    assert isinstance(pipe, StableDiffusionMixin)
    expected = pipe(**inputs()).images
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert np.abs(pipe(**inputs()).images - expected).max() > 1e-3
    pipe.disable_freeu()
    assert np.abs(pipe(**inputs()).images - expected).max() < 1e-6

    pipe.fuse_qkv_projections()
    try:
        assert pipe.unet.original_attn_processors is not None
        assert np.abs(pipe(**inputs()).images - expected).max() < 1e-4
    finally:
        pipe.unfuse_qkv_projections()


def test_a_pipeline_saved_with_fused_projections_loads_and_draws_the_same(tmp_path):
    """diffusers keeps the fused layers after unfusing and saves them beside to_q/to_k/to_v; they are copies, so
    loading such a folder works, as with diffusers' own loader, and gives the same images."""
    fused = LavitText2ImagePipeline(**build_tiny_components())
    fused.set_progress_bar_config(disable=True)
    expected = fused(**inputs()).images
    fused.fuse_qkv_projections()
    fused.save_pretrained(tmp_path)
    loaded = LavitText2ImagePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(loaded(**inputs()).images - expected).max() < 1e-5


def test_vae_slicing_keeps_the_result(pipe):
    """diffusers 0.42 moved VAE slicing/tiling from the pipelines to the VAE (`pipe.vae.enable_slicing()`)."""
    expected = pipe(**inputs(batch=2)).images
    pipe.vae.enable_slicing()
    try:
        assert np.abs(pipe(**inputs(batch=2)).images - expected).max() < 1e-5
    finally:
        pipe.vae.disable_slicing()


def test_generic_diffusion_pipeline_loader_runs_nothing_from_the_folder(tmp_path):
    """docs/loading.md: diffusers 0.42 looks `_class_name` up in `diffusers` only; a converted folder holds no
    Python file and a plain `_class_name`, so neither loader imports code from it."""
    import json

    from diffusers import DiffusionPipeline

    LavitText2ImagePipeline(**build_tiny_components()).save_pretrained(
        tmp_path
    )  # fresh: `pipe` may hold fused qkv layers
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "LavitText2ImagePipeline" and not list(tmp_path.rglob("*.py"))
    with pytest.raises(AttributeError, match="LavitText2ImagePipeline"):
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(LavitText2ImagePipeline.from_pretrained(tmp_path)) is LavitText2ImagePipeline


@pytest.mark.parametrize("source", ["visual_token_ids", "prompt"])
def test_many_images_run_in_batches_with_the_same_results(source, capsys):
    """`max_batch_size` (by default what the memory available holds) splits the images into batches, each with its
    progress bars; with one generator per image, the visual tokens and images do not depend on the batches."""
    pipe = LavitText2ImagePipeline(**build_tiny_components())
    given = (
        {"visual_token_ids": [CODES[0]]}
        if source == "visual_token_ids"
        else {"prompt": "a duck", "max_new_tokens": 30, "min_new_tokens": 2}
    )

    def run(max_batch_size):
        generators = [torch.Generator().manual_seed(i) for i in range(5)]
        return pipe(
            **given,
            num_images_per_prompt=5,
            generator=generators,
            num_inference_steps=2,
            output_type="np",
            max_batch_size=max_batch_size,
        )

    whole = run(None)
    capsys.readouterr()
    for max_batch_size in (1, 2):
        batched = run(max_batch_size)
        assert np.abs(batched.images - whole.images).max() < 1e-4 and batched.images.shape == (5, 64, 64, 3)
        assert all(torch.equal(a, b) for a, b in zip(batched.visual_token_ids, whole.visual_token_ids))
        assert capsys.readouterr().err.count("| 0/2 [") == -(-5 // max_batch_size)  # one denoising bar per batch
