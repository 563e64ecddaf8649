"""Configs whose sizes disagree with the weights they ship are refused before their model is built (docs/safety.md)."""

import json

import pytest
import torch

from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline
from lavit_pipelines.tiny import build_tiny_components


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sizes") / "model"
    LavitText2ImagePipeline(**build_tiny_components()).save_pretrained(folder)
    return folder


def copy_with(saved, tmp_path, component: str, **settings):
    """A copy of `saved` (weights linked) whose `component/config.json` has `settings`."""
    folder = tmp_path / "model"
    for path in saved.rglob("*"):
        target = folder / path.relative_to(saved)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.name != "config.json" or path.parent.name != component:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    config = json.loads((saved / component / "config.json").read_text())
    (folder / component / "config.json").write_text(json.dumps({**config, **settings}))
    return folder


ABSURD = [
    ("language_model", {"num_hidden_layers": 10**9}, LavitUnderstandingPipeline),
    ("language_model", {"hidden_size": 10**8, "head_dim": 10**6}, LavitText2ImagePipeline),
    ("pixel_decoder", {"num_layers": 10**9}, LavitText2ImagePipeline),
    ("pixel_decoder", {"hidden_size": 88 * 10**6}, LavitText2ImagePipeline),
    ("visual_tokenizer", {"encoder_layers": 10**9}, LavitUnderstandingPipeline),
    ("unet", {"layers_per_block": 10**9}, LavitText2ImagePipeline),
]


@pytest.mark.parametrize("component, settings, pipeline_cls", ABSURD)
def test_a_config_far_larger_than_its_weights_is_refused_before_it_is_built(
    saved, tmp_path, component, settings, pipeline_cls
):
    folder = copy_with(saved, tmp_path, component, **settings)
    with pytest.raises(ValueError) as raised:
        pipeline_cls.from_pretrained(folder)
    message = str(raised.value)
    assert f"`{component}`" in message and "far more than its weights hold" in message and "\n" not in message


def test_an_image_size_that_cannot_fit_memory_is_refused_before_any_model_runs(saved):
    """65536² on a model that draws 64²: refused with the estimate and what is available, before the pixel decoder,
    the UNet or the VAE run (or the latents are allocated)."""

    def ran(module, _):
        raise AssertionError(f"{type(module).__name__} ran")

    pipe = LavitText2ImagePipeline.from_pretrained(saved)
    for model in (pipe.pixel_decoder, pipe.unet, pipe.vae):
        model.register_forward_pre_hook(ran)
    with pytest.raises(ValueError) as raised:
        pipe(visual_token_ids=[torch.arange(3, 40)], height=65536, width=65536, num_inference_steps=2)
    message = str(raised.value)
    assert message.startswith("`height`×`width` 65536×65536: decoding one image needs at least")
    assert "GiB is available" in message and "draws 64×64 by default" in message
