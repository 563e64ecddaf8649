"""A LaVIT-7B-shaped language model on the CPU: load time, peak RSS and ms per visual token, bfloat16 against
torchao int8 weight-only, each configuration in its own child process.

    python benchmarks/full_size_cpu.py --folder /tmp/lavit-7b-random        # ~13.8 GB of disk, >= 17 GB of RAM
    python benchmarks/full_size_cpu.py --folder /tmp/lavit-small --small    # the same logic, scaled down

The release's language-model geometry (hidden 4096, intermediate 11008, 32 layers, 32 heads, 48386 ids) with
random weights (normal, std 0.02) is written once as sharded safetensors (bfloat16, shards of at most 2 GB, an
index), tensor by tensor, so that writing never holds the model. Each child then loads it with
`LavitForCausalLM.from_pretrained(folder, dtype=torch.bfloat16[, quantization_config=TorchAoConfig(...)])` and
samples 16 visual tokens with LaVIT's batched classifier-free guidance (`LavitForCausalLM.sample_visual_tokens`,
top-k 50): a first run (compiling where asked), one token (the prefill), then a timed run; the time per
decoding step is (timed run - prefill) / (tokens - 1), and the configurations are compared by it (the prefill
runs eager in every configuration). Peak RSS is the child's `getrusage` maximum; it counts the pages of
the memory-mapped weight files that were read (transformers maps safetensors files and keeps bfloat16 tensors in
the mapping), so the anonymous RSS (the process' own memory) is printed too. The folder is deleted at the end
unless `--keep`.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from machine import describe_machine

SHARD_BYTES = 2 * 1024**3
CONFIGURATIONS = {  # name -> (quantized, compiled decoding step)
    "bf16": (False, False),
    "bf16 compiled": (False, True),
    "int8": (True, False),
    "int8 compiled": (True, True),
}
IMG, PAD = 32000, 2


def language_model_config(small: bool):
    from lavit_pipelines.models.language_model import LavitConfig

    if small:
        return LavitConfig(
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        )
    return LavitConfig()  # its defaults are the release's geometry


def write_random_model(folder: Path, small: bool) -> int:
    """Random bfloat16 weights of the model as sharded safetensors + index + config; returns the weight bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    from lavit_pipelines import LavitForCausalLM

    config = language_model_config(small)
    with init_empty_weights():
        shapes = {key: tensor.shape for key, tensor in LavitForCausalLM(config).state_dict().items()}
    shards, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, keys in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key in keys:
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shapes[key], dtype=torch.bfloat16)
            else:
                tensors[key] = torch.empty(shapes[key], dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(2 * shape.numel() for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(folder)
    return total


def rss_gib(field: str = "VmRSS") -> float:
    """This process' resident memory now, from /proc/self/status: all of it (`VmRSS`), or the part that is its own
    (`RssAnon`), without the pages of the memory-mapped safetensors files (`RssFile`, the page cache's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def run_child(folder: Path, configuration: str, tokens: int) -> dict:
    """Load, then sample `tokens` visual tokens twice (the second run timed); the numbers as a dict."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    from lavit_pipelines import LavitForCausalLM

    quantized, compiled = CONFIGURATIONS[configuration]
    extra = {"quantization_config": TorchAoConfig(quant_type=Int8WeightOnlyConfig())} if quantized else {}
    start = time.perf_counter()
    model = LavitForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **extra).eval()
    load_s = time.perf_counter() - start
    result = {
        "load s": load_s,
        "RSS after load GiB": rss_gib(),
        "anonymous RSS after load GiB": rss_gib("RssAnon"),
        "peak RSS while loading GiB": peak_rss_gib(),
        "weights GiB": stored_bytes(model) / 1024**3,
    }
    prompt = torch.cat(
        [torch.randint(3, 32000, (16,), generator=torch.Generator().manual_seed(1)), torch.tensor([IMG])]
    )
    sampling = dict(
        guidance_scale=4.0,
        pad_token_id=PAD,
        min_new_tokens=tokens,
        max_new_tokens=tokens,
        do_sample=True,
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        cache_implementation="static" if compiled else "dynamic",
        compile=compiled,
    )
    seconds = {}
    for run, count in [("first run s", tokens), ("prefill s", 1), ("timed run s", tokens)]:
        start = time.perf_counter()
        ids = model.sample_visual_tokens(
            [prompt],
            generator=torch.Generator().manual_seed(0),
            **{**sampling, "min_new_tokens": count, "max_new_tokens": count},
        )
        seconds[run] = time.perf_counter() - start
    result.update(
        {
            "first run s": seconds["first run s"],
            "prefill s": seconds["prefill s"],
            "ms/token": seconds["timed run s"] / ids.shape[1] * 1e3,
            "ms/step": (seconds["timed run s"] - seconds["prefill s"]) / (tokens - 1) * 1e3,
            "peak RSS GiB": peak_rss_gib(),
            "anonymous RSS after generating GiB": rss_gib("RssAnon"),
        }
    )
    with torch.profiler.profile() as profile:  # prefill (eager) + 2 decoding steps
        model.sample_visual_tokens([prompt], **{**sampling, "min_new_tokens": 3, "max_new_tokens": 3})
    result["ops"] = matmul_ops(profile)
    return result


def stored_bytes(model) -> int:
    """Bytes of the model's parameters as stored: a torchao tensor counts its int8 data and scales."""
    total = 0
    for param in model.parameters():
        parts = [getattr(param, name) for name in getattr(param, "tensor_data_names", ())] or [param]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


def matmul_ops(profile) -> str:
    """The matrix-product ops a profile saw, with their call counts (which kernel ran)."""
    names = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_to_copy", "aten::_weight_int8pack_mm")
    return ", ".join(f"{e.key} x{e.count}" for e in profile.key_averages() if e.key in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="where to write the random model (must not exist)")
    parser.add_argument("--small", action="store_true", help="hidden 512, 4 layers: a quick check of the script")
    parser.add_argument("--tokens", type=int, default=16, help="visual tokens per timed run (at least 2)")
    parser.add_argument("--configurations", nargs="+", choices=CONFIGURATIONS, default=list(CONFIGURATIONS))
    parser.add_argument("--keep", action="store_true", help="keep the folder")
    parser.add_argument("--child", choices=CONFIGURATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error(f"--tokens must be at least 2 (the prefill is timed apart), got {args.tokens}")
    folder = Path(args.folder)
    if args.child:
        print(json.dumps(run_child(folder, args.child, args.tokens)))
        return
    if folder.exists():
        raise SystemExit(f"--folder {folder} exists; give a new folder (the script deletes it at the end)")
    print(describe_machine())
    try:
        start = time.perf_counter()
        weight_bytes = write_random_model(folder, args.small)
        print(
            f"wrote {weight_bytes / 1024**3:.2f} GiB of bfloat16 weights in {time.perf_counter() - start:.0f} s "
            f"({'small' if args.small else 'LaVIT-7B'} geometry)"
        )
        results = {}
        for configuration in args.configurations:
            command = [
                sys.executable,
                __file__,
                "--folder",
                str(folder),
                "--child",
                configuration,
                "--tokens",
                str(args.tokens),
            ]
            child = subprocess.run(command, capture_output=True, text=True, check=False)
            if child.returncode:
                print(f"{configuration}: failed\n{child.stderr[-2000:]}")
                continue
            results[configuration] = json.loads(child.stdout.strip().splitlines()[-1])
            print(configuration, results[configuration], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print_table(results, weight_bytes, args.tokens)


def print_table(results: dict, weight_bytes: int, tokens: int) -> None:
    weights = weight_bytes / 1024**3
    base = (results.get("bf16") or results.get("bf16 compiled") or {}).get("ms/step")
    print(
        f"\n{tokens} visual tokens with CFG (2 rows per step), the run after the first; bf16 weights {weights:.2f} GiB"
    )
    print(
        "| configuration | load s | peak RSS loading GiB (x bf16 weights) | weights GiB | peak RSS GiB "
        "| anonymous RSS GiB | prefill s | ms/step | x bf16 (eager if run, else compiled) | ms/token "
        "| matrix ops of prefill + 2 steps |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        ratio = f"{r['ms/step'] / base:.3f}" if base else "-"
        print(
            f"| {name} | {r['load s']:.1f} | {r['peak RSS while loading GiB']:.2f} "
            f"({r['peak RSS while loading GiB'] / weights:.2f}) | {r['weights GiB']:.2f} | "
            f"{r['peak RSS GiB']:.2f} | {r['anonymous RSS after generating GiB']:.2f} | {r['prefill s']:.1f} | "
            f"{r['ms/step']:.1f} | {ratio} | {r['ms/token']:.1f} | "
            f"{r['ops']} |"
        )


if __name__ == "__main__":
    main()
