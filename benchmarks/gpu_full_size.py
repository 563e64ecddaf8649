"""Full-size LaVIT text-to-image on one GPU with random bf16 weights: ms per visual token, ms per UNet step at
1024², seconds per 1024² image (25 steps), peak GPU memory, each beside its floor (DESIGN §6, one H100).

    python benchmarks/gpu_full_size.py                 # needs CUDA; ~20 GB of GPU memory
    python benchmarks/gpu_full_size.py --static --compile-llm --compile-unet
    python benchmarks/gpu_full_size.py --tiny          # the same logic with tiny dims on CPU (a smoke test)
    python benchmarks/gpu_full_size.py --quantize nf4 --cpu-offload     # the low-memory configurations (docs/memory.md)

With --quantize, the language model and the UNet are saved and loaded back through transformers' and diffusers'
quantizers (`lavit_pipelines.quantization`); with --cpu-offload, `enable_model_cpu_offload()` instead of `.to("cuda")`.

Components: LLaMA-2-7B dims with LaVIT's 48386-entry vocabulary, the high-res pixel decoder (width 1408, 12 blocks,
256 queries) and the SDXL UNet / VAE configs from benchmarks/release-configs/ (the release's own configs).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import describe_machine

RELEASE_CONFIGS = Path(__file__).resolve().parent / "release-configs"
# DESIGN.md §6 floors (one H100) and the targets of issue 5.
FLOORS = {"ms/token": 4.0, "ms/UNet step": 14.0, "s/image": 1.2, "peak GB": 20.0}
TARGETS = {"ms/token": 5.0, "ms/UNet step": None, "s/image": 2.0, "peak GB": 22.0}


def load_config(name: str) -> dict:
    with open(RELEASE_CONFIGS / name, encoding="utf-8") as handle:
        return {k: v for k, v in json.load(handle).items() if not k.startswith("_")}


def build_pipeline(tiny: bool, dtype: torch.dtype, device: str):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from lavit_pipelines import LavitText2ImagePipeline
    from lavit_pipelines.models.language_model import LavitConfig, LavitForCausalLM
    from lavit_pipelines.models.pixel_decoder import LavitPixelDecoder

    unet_config, vae_config = load_config("sdxl_unet.json"), load_config("sdxl_vae.json")
    if tiny:
        llm_config = LavitConfig(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
        unet_config.update(
            block_out_channels=[32, 64],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 1],
            attention_head_dim=[2, 4],
            cross_attention_dim=64,
            layers_per_block=1,
            norm_num_groups=8,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            sample_size=8,
        )
        vae_config.update(
            block_out_channels=[16, 16],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
        )
        decoder = LavitPixelDecoder(
            variant="highres",
            hidden_size=88,
            num_layers=2,
            mlp_dim=176,
            num_queries=32,
            output_dim=88,
            prompt_embed_dims=(32, 32),
            pooled_embed_dim=32,
        )
    else:
        llm_config = LavitConfig()  # its defaults are the release's geometry
        decoder = LavitPixelDecoder(variant="highres")
    with torch.device(device):
        language_model = LavitForCausalLM(llm_config).to(dtype)
        unet = UNet2DConditionModel(**unet_config).to(dtype)
        vae = AutoencoderKL(**vae_config).to(dtype)
    decoder = decoder.to(device, dtype)
    scheduler = DDIMScheduler.from_config(load_config("sdxl_sched.json"))
    tokenizer = _byte_tokenizer()
    return LavitText2ImagePipeline(
        tokenizer=tokenizer,
        language_model=language_model,
        pixel_decoder=decoder,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
    )


def quantize(pipe, scheme: str, dtype: torch.dtype, device: str) -> None:
    """The pipeline's language model and UNet replaced by themselves saved and loaded back with `scheme`."""
    from lavit_pipelines.quantization import component_quantization_configs

    with tempfile.TemporaryDirectory() as folder:
        for name, config in component_quantization_configs(scheme, pipe.components, device).items():
            model = getattr(pipe, name)
            model.save_pretrained(f"{folder}/{name}")
            pipe.register_modules(
                **{name: type(model).from_pretrained(f"{folder}/{name}", dtype=dtype, quantization_config=config)}
            )


def _byte_tokenizer():
    """A stand-in tokenizer (random weights make the prompt's meaning irrelevant): one id per byte."""

    class ByteTokenizer:
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": [3 + b for b in text.encode()]})()

    return ByteTokenizer()


def cuda_sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        cuda_sync(device)
        start = time.perf_counter()
        fn()
        cuda_sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny dims on CPU: checks the script's logic only")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--static", action="store_true", help="static KV cache for the visual tokens")
    parser.add_argument("--compile-llm", action="store_true", help="torch.compile the decoding step (implies --static)")
    parser.add_argument("--compile-unet", action="store_true", help="channels_last + torch.compile of the UNet")
    parser.add_argument("--quantize", choices=("int8", "int4", "nf4"), help="quantize the language model and the UNet")
    parser.add_argument(
        "--cpu-offload", action="store_true", help="enable_model_cpu_offload() (weights built on the CPU)"
    )
    args = parser.parse_args()

    if args.tiny:
        device, dtype, size = "cpu", torch.float32, 64
        args.tokens, args.steps = min(args.tokens, 24), min(args.steps, 3)  # the tiny decoder has 32 queries
    else:
        if not torch.cuda.is_available():
            sys.exit(
                "gpu_full_size.py needs a CUDA GPU (none found). Run it on a GPU machine, or pass --tiny to check "
                "the script's logic on CPU with tiny dims."
            )
        device, dtype, size = "cuda", torch.bfloat16, 1024
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    staged = args.quantize or args.cpu_offload
    pipe = build_pipeline(args.tiny, dtype, "cpu" if staged else device)
    if args.quantize:
        quantize(pipe, args.quantize, dtype, device)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    elif staged:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.compile_unet:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune" if device == "cuda" else None, fullgraph=True)
    decoding = {
        "cache_implementation": "static" if (args.static or args.compile_llm) else "dynamic",
        "compile": args.compile_llm,
    }
    sampling = dict(
        min_new_tokens=args.tokens, max_new_tokens=args.tokens, generator=torch.Generator(device).manual_seed(0)
    )

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    token_s = timed(lambda: pipe.generate_visual_tokens("a duck", **sampling, **decoding), device, args.repeats)
    codes = pipe.generate_visual_tokens("a duck", **sampling, **decoding)
    decoded = pipe.encode_visual_tokens(codes)
    pipe._guidance_scale = 7.0
    unet_kwargs = pipe.unet_inputs(pipe.prepare_conditioning(decoded, size, size), guided=True, batch_size=1)
    latents = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    step_s = timed(lambda: pipe.unet(latents, t, **unet_kwargs, return_dict=False), device, args.repeats)
    image_s = timed(
        lambda: pipe(
            "a duck",
            height=size,
            width=size,
            num_inference_steps=args.steps,
            output_type="pt",
            llm_decoding_kwargs=decoding,
            **sampling,
        ),
        device,
        args.repeats,
    )
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")

    measured = {
        "ms/token": token_s / args.tokens * 1e3,
        "ms/UNet step": step_s * 1e3,
        "s/image": image_s,
        "peak GB": peak_gb,
    }
    name = "tiny dims on CPU (logic check only; floors do not apply)" if args.tiny else torch.cuda.get_device_name()
    print(
        f"{name}; {dtype}; quantize {args.quantize}; CPU offload {args.cpu_offload}; {args.tokens} visual tokens; "
        f"{args.steps} steps at {size}²; decoding {decoding}; UNet compiled: {args.compile_unet}; medians of {args.repeats}"
    )
    print(describe_machine())
    print("| metric | measured | floor (H100, DESIGN §6) | target |")
    print("|---|---:|---:|---:|")
    for key, value in measured.items():
        target = TARGETS[key]
        print(f"| {key} | {value:.2f} | {FLOORS[key]:.1f} | {'-' if target is None else f'<= {target}'} |")


if __name__ == "__main__":
    main()
