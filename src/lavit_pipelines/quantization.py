"""Quantized loading: the `diffusers.PipelineQuantizationConfig` that `lavit ... --quantize int8|int4|nf4` stands for.

The two large components are quantized weight-only: the language model (13.75 of LaVIT-7B's 20 GB in bfloat16)
through transformers' quantizer and the UNet (5.1 GB) through diffusers'. Only `nn.Linear` layers are converted;
kept in the loading dtype: the language model's token embeddings and output head (the quantizers' default; the
head's logits are what visual tokens are sampled from), every norm and convolution, and the visual tokenizer and
pixel decoder, whose codebook lookups are nearest-neighbour searches (small: 3.6 and 0.8 GB at full size).

| scheme | backend      | language model                         | UNet                         | devices     |
|--------|--------------|----------------------------------------|------------------------------|-------------|
| int8   | torchao      | `Int8WeightOnlyConfig` (per row)       | `Int8WeightOnlyConfig`       | CPU, CUDA   |
| int4   | torchao      | `Int4WeightOnlyConfig` (groups of 128) | `Int8WeightOnlyConfig`       | CUDA        |
| nf4    | bitsandbytes | 4-bit NF4, bfloat16 compute            | 4-bit NF4, bfloat16 compute  | CUDA        |

On the CPU, torchao 0.18 has no int4 weight-only kernel and diffusers' bitsandbytes quantizer refuses to run
without a GPU, so int4 and nf4 are refused there before anything is loaded.
"""

from __future__ import annotations

import importlib

QUANTIZATION_SCHEMES = ("int8", "int4", "nf4")
QUANTIZED_COMPONENTS = ("language_model", "unet")
BACKENDS = {"int8": "torchao", "int4": "torchao", "nf4": "bitsandbytes"}


def check_quantization(scheme: str, device="cpu") -> None:
    """Before anything is loaded: ValueError for an unknown scheme or one whose kernels do not run on `device`,
    ImportError naming the backend package when it is not installed."""
    if scheme not in QUANTIZATION_SCHEMES:
        raise ValueError(f"`quantize` must be one of {', '.join(QUANTIZATION_SCHEMES)}, got {scheme!r}.")
    import torch

    backend = BACKENDS[scheme]
    if scheme in ("int4", "nf4") and torch.device(device).type != "cuda":
        raise ValueError(
            f"quantize={scheme!r} ({backend}) runs on CUDA GPUs only, not on the device {str(device)!r}: "
            f"use int8 (torchao) there."
        )
    try:
        importlib.import_module(backend)
    except ImportError as error:
        raise ImportError(
            f"quantize={scheme!r} needs the {backend} package, which is not installed: "
            f"pip install 'lavit-pipelines[quantization]'."
        ) from error


def component_quantization_configs(scheme: str, components, device="cuda") -> dict:
    """Component name -> the transformers or diffusers quantization config of `scheme`, for those of `components`
    (a pipeline's component names) that are quantized; checked first (`check_quantization`)."""
    check_quantization(scheme, device)
    import diffusers
    import torch
    import transformers

    if BACKENDS[scheme] == "bitsandbytes":
        nf4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}
        configs = {
            "language_model": transformers.BitsAndBytesConfig(**nf4),
            "unet": diffusers.BitsAndBytesConfig(**nf4),
        }
    else:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        language_model = (
            Int8WeightOnlyConfig()
            if scheme == "int8"
            else Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        )
        configs = {
            "language_model": transformers.TorchAoConfig(quant_type=language_model),
            "unet": diffusers.TorchAoConfig(quant_type=Int8WeightOnlyConfig()),
        }
    return {name: configs[name] for name in QUANTIZED_COMPONENTS if name in components}


def pipeline_quantization_config(scheme: str, components, device="cuda"):
    """The `diffusers.PipelineQuantizationConfig` of `scheme` for a pipeline with `components`, for
    `from_pretrained(..., quantization_config=...)` (`component_quantization_configs` as its `quant_mapping`)."""
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping=component_quantization_configs(scheme, components, device))
