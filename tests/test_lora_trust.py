"""LoRA loading says what is wrong before anything changes, and `unload_lora_weights` after `fuse_lora` gives the
base weights back (docs/safety.md, docs/training.md)."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from lavit_pipelines import LavitText2ImagePipeline
from lavit_pipelines.tiny import build_tiny_components


@pytest.fixture
def pipe():
    pipe = LavitText2ImagePipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_layers(model: torch.nn.Module, suffixes: tuple[str, ...], rank: int = 4, extra_input: int = 0) -> dict:
    """Random peft-format LoRA weights for the Linear layers of `model` whose names end in `suffixes` (inputs wider
    by `extra_input`: an adapter for another model size)."""
    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(suffixes):
            layers[f"{name}.lora_A.weight"] = (
                torch.randn(rank, module.in_features + extra_input, generator=generator) / 4
            )
            layers[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) / 4
    return layers


def saved_lora(pipe, folder: Path, **kwargs) -> Path:
    LavitText2ImagePipeline.save_lora_weights(folder, **kwargs)
    return folder


def logits(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.language_model(torch.tensor([[5, 6, 7, 8]])).logits


def images(pipe) -> np.ndarray:
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe(visual_token_ids=[torch.arange(3, 40)], latents=latents, num_inference_steps=2, output_type="np").images


@pytest.mark.parametrize("path", ["./no-such-lora", "/no/such/lora", "no-such-lora.safetensors", "a/b/c"])
def test_a_missing_local_path_is_reported_as_missing(pipe, path):
    with pytest.raises(FileNotFoundError, match=f"`lora`: no such file or folder {path!r}"):
        pipe.load_lora_weights(path)


def test_an_adapter_for_another_model_size_names_the_dimension(pipe, tmp_path):
    before = logits(pipe)
    layers = lora_layers(pipe.language_model, ("self_attn.q_proj",), extra_input=8)
    folder = saved_lora(pipe, tmp_path, language_model_lora_layers=layers)
    hidden = pipe.language_model.config.hidden_size
    with pytest.raises(
        ValueError,
        match=rf"another model size: .*q_proj.lora_A.weight has input dimension {hidden + 8}, "
        rf"`language_model.model.layers.0.self_attn.q_proj` has {hidden}",
    ):
        pipe.load_lora_weights(folder)
    assert torch.equal(logits(pipe), before) and pipe.get_list_adapters() == {}


def test_a_file_that_is_not_a_lora_is_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"is not a LoRA: every parameter name must contain 'lora'"):
        pipe.load_lora_weights(tmp_path / "model" / "unet", weight_name="diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("lora", ["not-a-lora", "missing"])
def test_cli_checks_the_lora_before_loading_the_model(pipe, tmp_path, capsys, lora):
    """`--model` does not exist: the LoRA's error comes first, so it was checked before any model loaded."""
    from lavit_pipelines.cli import main

    pipe.save_pretrained(tmp_path / "model")
    image = tmp_path / "image.png"
    PIL.Image.new("RGB", (64, 64)).save(image)
    path = {"not-a-lora": tmp_path / "model" / "language_model" / "model.safetensors", "missing": tmp_path / "nothing"}[
        lora
    ]
    capsys.readouterr()
    assert main(["caption", str(image), "--model", str(tmp_path / "absent"), "--lora", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lavit caption: error: `lora`") and err.count("\n") == 1, err


@pytest.mark.parametrize("component", ["unet", "language_model"])
def test_unload_after_fuse_restores_the_base_weights(pipe, tmp_path, component):
    base = {name: p.detach().clone() for name, p in getattr(pipe, component).named_parameters()}
    expected_images, expected_logits = images(pipe), logits(pipe)
    suffixes = ("attn1.to_q", "attn2.to_v") if component == "unet" else ("self_attn.q_proj", "self_attn.v_proj")
    folder = saved_lora(pipe, tmp_path, **{f"{component}_lora_layers": lora_layers(getattr(pipe, component), suffixes)})
    pipe.load_lora_weights(folder)
    changed = images(pipe) if component == "unet" else logits(pipe)
    assert (
        np.abs(np.asarray(changed) - np.asarray(expected_images if component == "unet" else expected_logits)).max()
        > 1e-3
    )
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    after = dict(getattr(pipe, component).named_parameters())
    assert after.keys() == base.keys()
    assert max((after[name] - base[name]).abs().max().item() for name in base) < 1e-5
    assert np.abs(images(pipe) - expected_images).max() < 1e-4
    torch.testing.assert_close(logits(pipe), expected_logits, atol=1e-5, rtol=0)
