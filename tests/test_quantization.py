"""Quantized loading without a backend at work: the checks that run before anything is loaded (schemes that cannot
run on the device, a backend that is not installed) and `torch_dtype`, still accepted beside `dtype`. The loading
itself (torchao int8 on the tiny fixture and the demo model, saving) is in test_quantized_loading.py."""

import sys

import pytest
import torch

from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline
from lavit_pipelines.cli import main
from lavit_pipelines.demo import default_model_path
from lavit_pipelines.quantization import (
    check_quantization,
    pipeline_quantization_config,
)


def test_torch_dtype_is_still_accepted():
    pipe = LavitUnderstandingPipeline.from_pretrained(default_model_path(), torch_dtype=torch.bfloat16)
    assert pipe.language_model.dtype == torch.bfloat16 and pipe.visual_tokenizer.dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_gpu_only_schemes_are_refused_on_the_cpu_before_loading(scheme):
    backend = {"int4": "torchao", "nf4": "bitsandbytes"}[scheme]
    with pytest.raises(
        ValueError, match=rf"quantize='{scheme}' \({backend}\) runs on CUDA GPUs only, not on the device 'cpu'"
    ):
        pipeline_quantization_config(scheme, LavitText2ImagePipeline.component_names(), "cpu")


@pytest.mark.parametrize(("scheme", "device", "backend"), [("int8", "cpu", "torchao"), ("nf4", "cuda", "bitsandbytes")])
def test_unknown_scheme_and_missing_backend(monkeypatch, scheme, device, backend):
    with pytest.raises(ValueError, match="`quantize` must be one of int8, int4, nf4, got 'int2'"):
        check_quantization("int2")
    monkeypatch.setitem(sys.modules, backend, None)  # not installed (an import of it fails)
    with pytest.raises(
        ImportError, match=rf"quantize='{scheme}' needs the {backend} package.*lavit-pipelines\[quantization\]"
    ):
        check_quantization(scheme, device)


def test_cli_names_a_missing_backend_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    assert main(["caption", str(tmp_path / "x.png"), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantize='int8' needs the torchao package" in err[0]


@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_cli_refuses_gpu_only_schemes_on_the_cpu(tmp_path, capsys, scheme):
    assert (
        main(["generate", "a duck", "--output", str(tmp_path / "x.png"), "--device", "cpu", "--quantize", scheme]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs on CUDA GPUs only" in err[0] and not (tmp_path / "x.png").exists()
