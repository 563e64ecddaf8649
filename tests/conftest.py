"""Shared pytest fixtures: the tiny LaVIT checkpoint and the original implementation's reference outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURE = REPO_ROOT.parent / "shared" / "fixtures" / "lavit-tiny-original"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """Folder of the tiny checkpoint (`original_checkpoint/`, `reference/`).

    Found through `LAVIT_TINY_FIXTURE`, else `<repo>/../shared/fixtures/lavit-tiny-original`. Missing:
    a failure under CI (CI=true), a skip elsewhere.
    """
    path = Path(os.environ.get("LAVIT_TINY_FIXTURE", DEFAULT_FIXTURE))
    if not (path / "original_checkpoint").is_dir() or not (path / "reference").is_dir():
        message = f"tiny LaVIT fixture not found at {path} (set LAVIT_TINY_FIXTURE)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


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
