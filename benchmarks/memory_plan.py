"""Peak GPU memory of full-size LaVIT per configuration, computed (not measured) from the parameter counts of the
release's components, built on the meta device from their real configs (no weights, no GPU needed):

    python benchmarks/memory_plan.py

Weights: every parameter in bfloat16 (2 bytes; the VAE in float32, as it upcasts to decode), except the `nn.Linear`
weights that `lavit_pipelines.quantization` quantizes (the language model's but its output head, the UNet's):
int8 1 byte + a 3-byte scale/zero point per row, int4 0.5 byte + 4 bytes per group of 128, nf4 0.5 byte + a
4-byte absmax per block of 64. Activations: allowances per stage, not measurements (ACTIVATIONS below).
Without offload every loaded component stays on the GPU; with `enable_model_cpu_offload()` only the running
one, so the peak is the largest stage (its component's weights plus its activations).
"""

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights

GIB = 1024**3
RELEASE_CONFIGS = Path(__file__).resolve().parent / "release-configs"
# GiB of activations while each stage runs (batch 1): the language model's KV cache for 2 CFG rows of 300
# positions is 0.3; the SDXL UNet with CFG at 1024² 2-3 (DESIGN §8); the float32 VAE decode at 1024² about 2.5
# (a few 128-channel 1024² float32 maps of 0.5 each); the visual tokenizer at 224² well under 0.5.
ACTIVATIONS = {"language_model": 0.5, "visual_tokenizer": 0.5, "pixel_decoder": 0.2, "unet": 3.0, "vae": 2.5}
LINEAR_BYTES = {  # scheme -> (bytes per weight, bytes per row, group size, bytes per group)
    "int8": (1.0, 3, None, 0),
    "int4": (0.5, 0, 128, 4),
    "nf4": (0.5, 0, 64, 4),
}
UNET_SCHEME = {"int8": "int8", "int4": "int8", "nf4": "nf4"}


def release_components() -> dict:
    """The full-size components on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lavit_pipelines import (
        LavitForCausalLM,
        LavitPixelDecoder,
        LavitVisualTokenizer,
    )
    from lavit_pipelines.models.language_model import LavitConfig

    def config(name: str) -> dict:
        return {k: v for k, v in json.loads((RELEASE_CONFIGS / name).read_text()).items() if not k.startswith("_")}

    with init_empty_weights():
        return {
            "language_model": LavitForCausalLM(LavitConfig()),
            "visual_tokenizer": LavitVisualTokenizer(),
            "pixel_decoder": LavitPixelDecoder(variant="highres"),
            "unet": UNet2DConditionModel(**config("sdxl_unet.json")),
            "vae": AutoencoderKL(**config("sdxl_vae.json")),
        }


def weight_gib(name: str, model: torch.nn.Module, scheme: str | None) -> float:
    """GiB of `model`'s weights with `scheme` applied to the Linear layers that it quantizes (None: bfloat16)."""
    scheme = {"language_model": scheme, "unet": UNET_SCHEME.get(scheme)}.get(name)
    per_param = 4 if name == "vae" else 2
    quantized = {}
    if scheme:
        skipped = {"lm_head"} if name == "language_model" else set()
        quantized = {
            f"{m}.weight": mod
            for m, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and m not in skipped
        }
    total = 0.0
    for key, param in model.named_parameters():
        if key in quantized:
            per_weight, per_row, group, per_group = LINEAR_BYTES[scheme]
            rows = param.shape[0]
            total += param.numel() * per_weight + rows * per_row + (param.numel() // group * per_group if group else 0)
        else:
            total += param.numel() * per_param
    return total / GIB


def peak(weights: dict, stages: list[str], offload: bool) -> float:
    """Peak GiB of a run through `stages` (component names, in order), all loaded components resident or offloaded."""
    if offload:
        return max(weights[s] + ACTIVATIONS[s] for s in stages)
    return sum(weights[s] for s in stages) + max(ACTIVATIONS[s] for s in stages)


def main() -> None:
    components = release_components()
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in components.items()}
    print("| component | parameters | bf16 GiB | int8 GiB | int4 GiB | nf4 GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    weights = {
        scheme: {name: weight_gib(name, m, scheme) for name, m in components.items()}
        for scheme in (None, "int8", "int4", "nf4")
    }
    for name in components:
        cells = " | ".join(f"{weights[s][name]:.2f}" for s in weights)
        print(f"| {name} | {params[name] / 1e9:.3f} B | {cells} |")
    tasks = {
        "text-to-image 1024², text prompt": ["language_model", "pixel_decoder", "unet", "vae"],
        "text-to-image 1024², image prompts": ["visual_tokenizer", "language_model", "pixel_decoder", "unet", "vae"],
        "understanding (caption / VQA)": ["visual_tokenizer", "language_model"],
    }
    print("\n| configuration (`--quantize`) | " + " | ".join(f"{t}: resident / offload" for t in tasks) + " |")
    print("|---|" + "---:|" * len(tasks))
    labels = {
        None: "bf16",
        "int8": "int8 (LLM int8, UNet int8)",
        "int4": "int4 (LLM int4, UNet int8)",
        "nf4": "nf4 (LLM nf4, UNet nf4)",
    }
    for scheme, label in labels.items():
        cells = [
            f"{peak(weights[scheme], s, False):.1f} / {peak(weights[scheme], s, True):.1f}" for s in tasks.values()
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
