"""Shared pytest fixtures: the tiny LaVIT checkpoint and the original implementation's reference outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "lavit-tiny-original"


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
