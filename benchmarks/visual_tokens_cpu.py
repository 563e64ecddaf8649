"""Visual-token stage on CPU: `sample_visual_tokens` (cond + uncond rows in one forward per token) against the
original LaVIT's method (transformers `generate(..., guidance_scale=g, negative_prompt_ids=...)`, whose
unbatched CFG processor runs a second forward per token), same process, same random weights.

    python benchmarks/visual_tokens_cpu.py [--threads 1] [--tokens 64] [--repeats 5] [--hidden 512 --layers 8 ...]
    python benchmarks/visual_tokens_cpu.py --low-precision     # + bf16 and int8, eager and compiled
    python benchmarks/visual_tokens_cpu.py --kernels           # only the fp32 / bf16 / int8 kernel table

Both produce exactly `--tokens` tokens (min_new_tokens = max_new_tokens) and the script checks that greedy
decoding gives identical tokens on both paths before timing.

With `--low-precision`, ours also runs on bfloat16 and torchao int8 weight-only copies of the model (bfloat16
activations; the output head and embeddings stay bfloat16, as transformers' torchao quantizer keeps them), eager
and with the compiled static-cache step, and the matrix-product ops of one decoding step of each are printed
(which kernel ran: `aten::mm`, or `aten::_weight_int8pack_mm` where inductor rewrites torchao's int8 product).
"""

import argparse
import copy
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from lavit_pipelines.models.visual_sampling import sample_visual_tokens
from machine import describe_machine

IMG, END_IMG, PAD = 32000, 32001, 2


def build_model(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=2048,
        pad_token_id=PAD,
        bos_token_id=IMG,
        eos_token_id=END_IMG,
    )
    model = LlamaForCausalLM(config).eval()
    for param in model.parameters():  # a sharper output distribution than the default init, like a trained head
        param.data.normal_(0, 0.05)
    return model


def sampling_args(tokens: int, do_sample: bool) -> dict:
    return dict(min_new_tokens=tokens, max_new_tokens=tokens, do_sample=do_sample, top_k=50, top_p=1.0)


def run_original(model, prompt: torch.Tensor, guidance_scale: float, tokens: int, do_sample: bool) -> torch.Tensor:
    """LaVIT's `generate_image` call: inputs_embeds + transformers' unbatched CFG (two forwards per token)."""
    embeds = model.get_input_embeddings()(prompt[None])
    return model.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones_like(prompt[None]),
        guidance_scale=guidance_scale,
        negative_prompt_ids=torch.tensor([[IMG]]),
        suppress_tokens=list(range(3, 32000)),
        bos_token_id=IMG,
        eos_token_id=END_IMG,
        pad_token_id=PAD,
        **sampling_args(tokens, do_sample),
    )


def run_ours(
    model, prompt: torch.Tensor, guidance_scale: float, tokens: int, do_sample: bool, **kwargs
) -> torch.Tensor:
    return sample_visual_tokens(
        model,
        [prompt],
        guidance_scale=guidance_scale,
        unconditional_prompt=[IMG],
        suppress_ids=range(3, 32000),
        eos_token_id=END_IMG,
        pad_token_id=PAD,
        temperature=1.0,
        **sampling_args(tokens, do_sample),
        **kwargs,
    )


def interleaved_medians(fns: list, repeats: int, warmup: int = 1) -> list[float]:
    """Median seconds per function; the functions take turns in every round, so that a change of machine load
    (other processes on a shared machine) hits all of them alike. The first `warmup` rounds are not timed."""
    times = [[] for _ in fns]
    for round_ in range(warmup + repeats):
        for fn, spent in zip(fns, times):
            torch.manual_seed(round_)
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def low_precision_models(model) -> dict:
    """bfloat16 and torchao int8 weight-only (Linear layers but the head) copies of `model`."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    int8 = copy.deepcopy(bf16)
    quantize_(
        int8, Int8WeightOnlyConfig(), filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name != "lm_head"
    )
    return {"bf16": bf16, "int8": int8}


def step_ops(fn) -> str:
    """The matrix-product ops (with call counts) that `fn` runs."""
    with torch.profiler.profile() as profile:
        fn()
    names = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm")
    return ", ".join(f"{e.key.removeprefix('aten::')} x{e.count}" for e in profile.key_averages() if e.key in names)


def kernel_table(dim: int, layers: int, rows: int, repeats: int) -> None:
    """ms for `layers` bias-free dim x dim products at `rows` rows (a decoding step's weight reads), per kernel path,
    each beside fp32 and bf16, with the matrix-product ops each path ran."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    base = torch.nn.Sequential(*[torch.nn.Linear(dim, dim, bias=False) for _ in range(layers)]).eval()
    x32 = torch.randn(rows, dim)
    int8 = [(w, (w.abs().amax(1) / 127).clamp(min=1e-8)) for w in (lin.weight.detach() for lin in base)]
    int8 = [((w / s[:, None]).round().clamp(-128, 127).to(torch.int8), s.bfloat16()) for w, s in int8]

    def int8pack(x):
        for q, s in int8:
            x = torch._weight_int8pack_mm(x, q, s)
        return x

    paths = {
        "fp32 F.linear": (base, x32),
        "bf16 F.linear": (copy.deepcopy(base).bfloat16(), x32.bfloat16()),
        "torch._weight_int8pack_mm, bf16 activations": (int8pack, x32.bfloat16()),
    }
    for dtype, x in ((torch.float32, x32), (torch.bfloat16, x32.bfloat16())):
        quantized = copy.deepcopy(base).to(dtype)
        quantize_(quantized, Int8WeightOnlyConfig())
        name = "torchao Int8WeightOnlyConfig, " + str(dtype).removeprefix("torch.") + " activations"
        paths[name + ", eager"] = (quantized, x)
        paths[name + ", torch.compile"] = (torch.compile(quantized), x)
    with torch.no_grad():
        for fn, x in paths.values():
            fn(x)  # compiles
        medians = interleaved_medians([lambda fn=fn, x=x: fn(x) for fn, x in paths.values()], repeats)
        ops = [step_ops(lambda fn=fn, x=x: fn(x)) for fn, x in paths.values()]
    fp32, bf16 = medians[0], medians[1]
    print(f"\n{layers} layers of {dim}x{dim} at {rows} rows, median of {repeats} interleaved runs")
    print("| path | ms | x fp32 | x bf16 | ops |")
    print("|---|---:|---:|---:|---|")
    for name, median, op in zip(paths, medians, ops):
        print(f"| {name} | {median * 1e3:.1f} | {median / fp32:.3f} | {median / bf16:.3f} | {op} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=48386)
    parser.add_argument("--prompt-length", type=int, default=16, help="text tokens before [IMG]")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--greedy", action="store_true", help="time greedy decoding instead of top-k sampling")
    parser.add_argument("--static", action="store_true", help="also time the static-cache path")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--low-precision", action="store_true", help="also bfloat16 and int8, eager and compiled")
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="only the kernel table: 8 layers of 4096x4096 at 2 rows per fp32 / bf16 / int8 path",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        print(describe_machine())
        return kernel_table(4096, 8, 2, args.repeats)

    model = build_model(args.hidden, args.layers, args.heads, args.intermediate, args.vocab)
    prompt = torch.cat(
        [
            torch.randint(3, 32000, (args.prompt_length,), generator=torch.Generator().manual_seed(1)),
            torch.tensor([IMG]),
        ]
    )
    g, n = args.guidance_scale, args.tokens

    # Same tokens on both paths (greedy, and seeded sampling) before timing anything.
    original = run_original(model, prompt, g, n, do_sample=False)
    ours = run_ours(model, prompt, g, n, do_sample=False)
    assert original.shape == (1, n) and torch.equal(original, ours), "greedy tokens differ between the two paths"
    torch.manual_seed(7)
    original = run_original(model, prompt, g, n, do_sample=True)
    torch.manual_seed(7)
    ours = run_ours(model, prompt, g, n, do_sample=True)
    assert torch.equal(original, ours), "seeded sampled tokens differ between the two paths"

    do_sample = not args.greedy
    rows = [
        (
            "original: generate(guidance_scale=...), 2 forwards/token",
            lambda: run_original(model, prompt, g, n, do_sample),
        ),
        ("ours: sample_visual_tokens, batched CFG, DynamicCache", lambda: run_ours(model, prompt, g, n, do_sample)),
    ]
    if args.static:
        rows.append(
            (
                "ours: sample_visual_tokens, StaticCache",
                lambda: run_ours(model, prompt, g, n, do_sample, cache_implementation="static"),
            )
        )
    kernels = {}
    if args.low_precision:
        for label, copy_ in low_precision_models(model).items():
            for compiled in (False, True):
                kwargs = {"cache_implementation": "static", "compile": True} if compiled else {}
                name = f"ours, {label}{', compiled static step' if compiled else ''}"
                run_ours(copy_, prompt, g, n, do_sample, **kwargs)  # compiles
                kernels[name] = step_ops(lambda m=copy_, k=kwargs: run_ours(m, prompt, g, 2, do_sample, **k))
                rows.append((name, lambda m=copy_, k=kwargs: run_ours(m, prompt, g, n, do_sample, **k)))
    medians = interleaved_medians([fn for _, fn in rows], args.repeats)
    results = [(name, median) for (name, _), median in zip(rows, medians)]

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{describe_machine()}, transformers {transformers.__version__}")
    print(
        f"LLM: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate {args.intermediate}, "
        f"vocab {args.vocab} ({params:.1f}M params, fp32); prompt {args.prompt_length + 1} tokens; "
        f"{n} tokens; guidance {g}; {'greedy' if args.greedy else 'top-k 50 sampling'}; "
        f"median of {args.repeats} interleaved runs after 1 warm-up"
    )
    base = results[0][1]
    print(f"| {'path':<58} | ms/token | total s | ratio |")
    print(f"|{'-' * 60}|---------:|--------:|------:|")
    for name, median in results:
        print(f"| {name:<58} | {median / n * 1e3:8.2f} | {median:7.3f} | {median / base:5.3f} |")
    bf16 = dict(results).get("ours, bf16")
    for name, ops in kernels.items():
        vs_bf16 = f"; {dict(results)[name] / bf16:.3f}x ours bf16 eager" if bf16 else ""
        print(f"{name}: prefill + 1 step ran {ops}{vs_bf16}")


if __name__ == "__main__":
    main()
