"""Quality of a (demo) LaVIT on the shapes world: runs `evaluate_shapes` and prints its accuracies, and draws a grid
of the generated images (real outputs, upscaled with nearest-neighbour) with the prompt under each.

    python benchmarks/demo_quality.py [--model FOLDER] --grid grid.png [--output OUT] [--num-prompts 60] ...

Without --model, the shipped demo weights (`lavit_pipelines.default_model_path()`) when present.
"""

import argparse
import json
import tempfile
import textwrap
import time
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from lavit_pipelines.evaluation.shapes import evaluate_shapes
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
    args = parser.parse_args()
    if args.model is None:
        parser.error("--model is required: no shipped demo model in this installation")

    print(describe_machine())
    with tempfile.TemporaryDirectory() as scratch:
        output = args.output or Path(scratch)
        start = time.perf_counter()
        metrics = evaluate_shapes(
            args.model, output=output, num_prompts=args.num_prompts, num_scenes=args.num_scenes, seed=args.seed,
            batch_size=args.batch_size, generation_kwargs={"num_inference_steps": args.steps},
        )
        print(f"model {args.model}: evaluated in {time.perf_counter() - start:.1f} s")
        print(json.dumps(metrics, indent=1))
        records = json.loads((output / "predictions.json").read_text())["generation"][: args.grid_images]
        draw_grid(output, records, args.columns).save(args.grid)
    print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
