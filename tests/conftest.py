"""Shared pytest fixtures: the tiny LaVIT checkpoint and the original implementation's reference outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "lavit-tiny-original"
# Two CPU processes under `accelerate launch`: the tests that check results do not depend on the process count.
TWO_PROCESS_LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


@pytest.fixture
def aot_eager_compile(monkeypatch) -> list[dict]:
    """The sampler's `torch.compile` with the aot_eager backend (inductor's C++ build alone takes ~50 s on 2 cores;
    benchmarks/gpu_full_size.py runs the real mode): the list of each call's keyword arguments."""
    import torch

    from lavit_pipelines.models import visual_sampling

    compiled, real_compile = [], torch.compile

    def compile_with_aot_eager(fn, **kwargs):
        compiled.append(kwargs)
        return real_compile(fn, backend="aot_eager", fullgraph=True)

    monkeypatch.setattr(visual_sampling.torch, "compile", compile_with_aot_eager)
    return compiled


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """Folder of the tiny checkpoint in the release layout (`original_checkpoint/`) and what the original
    implementation computed from it (`reference/`), shipped in `tests/fixtures/` (see its README)."""
    return FIXTURE


@pytest.fixture(scope="session")
def checkpoint_dir(fixture_dir: Path) -> Path:
    return fixture_dir / "original_checkpoint"


@pytest.fixture(scope="session")
def reference(fixture_dir: Path):
    """`(reference.json as a dict, reference.safetensors as a dict of tensors)`."""
    from safetensors.torch import load_file

    with open(fixture_dir / "reference" / "reference.json", encoding="utf-8") as handle:
        reference_json = json.load(handle)
    tensors = load_file(str(fixture_dir / "reference" / "reference.safetensors"))
    return reference_json, tensors


@pytest.fixture(scope="session")
def converted_dir(checkpoint_dir: Path, tmp_path_factory) -> Path:
    """The tiny checkpoint converted with the high-res pixel decoder (float32, as the source)."""
    from lavit_pipelines.conversion import convert

    return convert(str(checkpoint_dir), str(tmp_path_factory.mktemp("converted") / "lavit-tiny"))


@pytest.fixture(scope="session")
def converted_lowres_dir(checkpoint_dir: Path, tmp_path_factory) -> Path:
    """The tiny checkpoint converted with the low-res (SD-1.5) pixel decoder."""
    from lavit_pipelines.conversion import convert

    return convert(str(checkpoint_dir), str(tmp_path_factory.mktemp("converted") / "lavit-tiny-lowres"), "lowres")


@pytest.fixture(scope="session")
def training_base(tmp_path_factory) -> Path:
    """A tiny pipeline folder for training tests: the tiny components with a smaller visual tokenizer
    (56² images, 16 patches, width 88)."""
    import torch

    from lavit_pipelines import LavitText2ImagePipeline, LavitVisualTokenizer
    from lavit_pipelines.tiny import CODEBOOK_SIZE, LLM_HIDDEN, build_tiny_components

    components = build_tiny_components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components["visual_tokenizer"] = LavitVisualTokenizer(
            image_size=56,
            hidden_size=88,
            encoder_layers=1,
            encoder_mlp_dim=64,
            merger_layers=1,
            merger_mlp_dim=64,
            codebook_size=CODEBOOK_SIZE,
            codebook_dim=32,
            llm_hidden_size=LLM_HIDDEN,
        )
    components["pixel_decoder"].codebook.weight.data.copy_(components["visual_tokenizer"].codebook.weight.data)
    folder = tmp_path_factory.mktemp("training") / "base"
    LavitText2ImagePipeline(**components).save_pretrained(folder)
    return folder


def write_image_folder(folder: Path, count: int = 8, seed: int = 0) -> Path:
    """`count` 64² images (a coloured square on a plain background) and their captions in metadata.jsonl."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        pixels = np.zeros((64, 64, 3), np.uint8)
        pixels[...] = rng.integers(0, 255, 3)
        x, y = rng.integers(0, 40, 2)
        pixels[y : y + 24, x : x + 24] = rng.integers(0, 255, 3)
        PIL.Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of a red car number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def training_data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("training") / "data")


# ------------------------------------------------------------------ converted pipelines, guarded


class ModelRan(Exception):
    """Raised by a guarded model that runs: input checks must fire before any model does."""


def forbid(*modules):
    """Forward pre-hooks that raise ModelRan; returns their handles."""

    def hook(module, _):
        raise ModelRan(type(module).__name__)

    return [module.register_forward_pre_hook(hook) for module in modules]


def forbid_tokenizing(monkeypatch, visual_tokenizer) -> None:
    """The visual tokenizer's entry points (methods, not `forward`, so hooks do not see them) raise too."""

    def run(*_, **__):
        raise ModelRan("LavitVisualTokenizer")

    for method in ("tokenize", "encode_features"):
        monkeypatch.setattr(visual_tokenizer, method, run)


def loaded(pipeline_cls, folder: Path):
    pipe = pipeline_cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guarded(pipe, monkeypatch, model_names: tuple[str, ...]):
    """Yields `pipe` with the named models (and the visual tokenizer's entry points) raising ModelRan."""
    handles = forbid(*(getattr(pipe, name) for name in model_names))
    forbid_tokenizing(monkeypatch, pipe.visual_tokenizer)
    yield pipe
    for handle in handles:
        handle.remove()


@pytest.fixture(scope="module")
def t2i(converted_dir):
    """The converted tiny checkpoint's text-to-image pipeline (one per test module)."""
    from lavit_pipelines import LavitText2ImagePipeline

    return loaded(LavitText2ImagePipeline, converted_dir)


@pytest.fixture
def guarded_t2i(t2i, monkeypatch):
    """`t2i` whose models raise ModelRan if they run."""
    yield from guarded(t2i, monkeypatch, ("language_model", "visual_tokenizer", "pixel_decoder", "unet", "vae"))


@pytest.fixture(scope="module")
def understanding(converted_dir):
    """The converted tiny checkpoint's understanding pipeline (one per test module)."""
    from lavit_pipelines import LavitUnderstandingPipeline

    return loaded(LavitUnderstandingPipeline, converted_dir)


@pytest.fixture
def guarded_understanding(understanding, monkeypatch):
    """`understanding` whose models raise ModelRan if they run."""
    yield from guarded(understanding, monkeypatch, ("language_model", "visual_tokenizer"))
