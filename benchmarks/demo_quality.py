"""Quality of a (demo) LaVIT on the shapes world: runs `evaluate_shapes` and prints its accuracies, and draws a grid
of the generated images (real outputs, upscaled with nearest-neighbour) with the prompt under each.

    python benchmarks/demo_quality.py [--model FOLDER] --grid grid.png [--output OUT] [--num-prompts 60] ...
    python benchmarks/demo_quality.py --grid grid.png --quantize int8 [int4 nf4]

Without --model, the shipped demo weights (`lavit_pipelines.default_model_path()`) when present.
With --quantize, the same evaluation also runs on the model loaded with each scheme
(`lavit_pipelines.quantization`, bfloat16, saved to a temporary folder and loaded back from it), and on the
model in bfloat16 unquantized; one table shows every metric per model with its difference to the unquantized
float32 model, then the agreement of greedy visual tokens (the generation prompts, `do_sample=False`) of each
model with float32's: the share of positions with the same token, and of prompts with the same sequence.
"""

import argparse
import json
import tempfile
import textwrap
import time
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch

from lavit_pipelines import LavitText2ImagePipeline
from lavit_pipelines.evaluation.shapes import evaluate_shapes, generation_scenes
from lavit_pipelines.quantization import (
    QUANTIZATION_SCHEMES,
    pipeline_quantization_config,
)
from machine import describe_machine

CELL, TEXT_HEIGHT, LINE = 128, 44, 14


def default_model() -> Path | None:
    try:
        from lavit_pipelines import default_model_path
    except ImportError:  # no demo weights in this installation
        return None
    path = Path(default_model_path())
    return path if path.exists() else None


def draw_grid(output: Path, records: list[dict], columns: int) -> PIL.Image.Image:
    """The generated images of `records` in rows of `columns`, each prompt written under its image."""
    rows = -(-len(records) // columns)
    grid = PIL.Image.new("RGB", (columns * CELL, rows * (CELL + TEXT_HEIGHT)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for i, record in enumerate(records):
        x, y = (i % columns) * CELL, (i // columns) * (CELL + TEXT_HEIGHT)
        image = PIL.Image.open(output / record["image"]).convert("RGB").resize((CELL, CELL), PIL.Image.NEAREST)
        grid.paste(image, (x, y))
        for j, line in enumerate(textwrap.wrap(record["prompt"], 21)[:3]):
            draw.text((x + 2, y + CELL + 1 + j * LINE), line, fill="black")
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model())
    parser.add_argument("--grid", type=Path, required=True, help="the picture to write (.png)")
    parser.add_argument("--output", type=Path, help="evaluation folder (default: a temporary folder)")
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--num-scenes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grid-images", type=int, default=16)
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument(
        "--quantize",
        nargs="+",
        default=[],
        choices=QUANTIZATION_SCHEMES,
        help="also evaluate the model quantized with these schemes (and in bfloat16)",
    )
    args = parser.parse_args()
    if args.model is None:
        parser.error("--model is required: no shipped demo model in this installation")
    if args.quantize:
        return compare_quantized(args)

    print(describe_machine())
    with tempfile.TemporaryDirectory() as scratch:
        output = args.output or Path(scratch)
        start = time.perf_counter()
        metrics = evaluate_shapes(
            args.model,
            output=output,
            num_prompts=args.num_prompts,
            num_scenes=args.num_scenes,
            seed=args.seed,
            batch_size=args.batch_size,
            generation_kwargs={"num_inference_steps": args.steps},
        )
        print(f"model {args.model}: evaluated in {time.perf_counter() - start:.1f} s")
        print(json.dumps(metrics, indent=1))
        records = json.loads((output / "predictions.json").read_text())["generation"][: args.grid_images]
        draw_grid(output, records, args.columns).save(args.grid)
    print(f"grid: {args.grid}")


def save_quantized(model: Path, scheme: str, folder: Path) -> Path:
    """The text-to-image pipeline of `model` loaded with `scheme` in bfloat16, saved to `folder`."""
    config = pipeline_quantization_config(scheme, LavitText2ImagePipeline.component_names(), "cpu")
    LavitText2ImagePipeline.from_pretrained(model, quantization_config=config, dtype=torch.bfloat16).save_pretrained(
        folder
    )
    return folder


def greedy_visual_tokens(model: Path, dtype: torch.dtype, prompts: list[str]) -> list[torch.Tensor]:
    pipe = LavitText2ImagePipeline.from_pretrained(model, dtype=dtype, visual_tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return [pipe.generate_visual_tokens(prompt, do_sample=False)[0] for prompt in prompts]


def agreement(tokens: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """(share of positions with the same token, over the reference's lengths; share of identical sequences), %."""
    same = sum(int((t[: len(r)] == r[: len(t)]).sum()) for t, r in zip(tokens, reference))
    identical = sum(torch.equal(t, r) for t, r in zip(tokens, reference))
    return 100 * same / sum(len(r) for r in reference), 100 * identical / len(reference)


def compare_quantized(args) -> None:
    """Every metric of the model in float32, in bfloat16 and under each scheme, in one table."""
    print(describe_machine())
    prompts = [scene.caption for scene in generation_scenes(args.num_prompts, args.seed)]
    results, tokens = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        models = {"float32": (args.model, torch.float32), "bfloat16": (args.model, torch.bfloat16)}
        for scheme in args.quantize:
            models[f"{scheme} (bfloat16)"] = (
                save_quantized(args.model, scheme, Path(scratch) / scheme),
                torch.bfloat16,
            )
        for name, (model, dtype) in models.items():
            start = time.perf_counter()
            results[name] = evaluate_shapes(
                model,
                output=Path(scratch) / f"evaluation-{name.split()[0]}",
                num_prompts=args.num_prompts,
                num_scenes=args.num_scenes,
                seed=args.seed,
                batch_size=args.batch_size,
                dtype=dtype,
                generation_kwargs={"num_inference_steps": args.steps},
            )
            tokens[name] = greedy_visual_tokens(model, dtype, prompts)
            print(f"{name}: evaluated in {time.perf_counter() - start:.1f} s", flush=True)
    print(f"\n| metric | {' | '.join(results)} |")
    print(f"|---|{'---:|' * len(results)}")
    reference = results["float32"]
    for metric, value in reference.items():
        if metric.startswith("num_"):
            continue
        cells = [f"{value:.1f}"] + [f"{r[metric]:.1f} ({r[metric] - value:+.1f})" for r in list(results.values())[1:]]
        print(f"| {metric} | {' | '.join(cells)} |")
    rows = [agreement(t, tokens["float32"]) for t in tokens.values()]
    print(
        f"| greedy visual tokens = float32's: positions / sequences ({len(prompts)} prompts) | "
        + " | ".join(f"{p:.1f} / {q:.1f}" for p, q in rows)
        + " |"
    )


if __name__ == "__main__":
    main()
