"""What a training run shows while it runs and leaves behind: its trackers (accelerate's `log_with`, e.g.
TensorBoard), the validation grids (OUT/validation/step-N.png) and the loss curves (OUT/loss.png)."""

import json
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

LOSS_PLOT = "loss.png"
CELL = 192  # pixels per grid image
CAPTION_LINES = 3


def tracker_config(config: dict) -> dict:
    """The settings a tracker can store as hyperparameters (TensorBoard takes numbers, strings and booleans)."""
    return {key: value for key, value in config.items() if isinstance(value, (bool, int, float, str))}


def caption_grid(images: list[PIL.Image.Image], captions: list[str], columns: int = 4) -> PIL.Image.Image:
    """`images` resized to CELL×CELL in rows of `columns`, each with its caption (wrapped) underneath."""
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    line_height = 12
    height = CELL + CAPTION_LINES * line_height + 4
    grid = PIL.Image.new("RGB", (columns * CELL, rows * height), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * CELL, (i // columns) * height
        grid.paste(image.convert("RGB").resize((CELL, CELL), PIL.Image.BICUBIC), (x, y))
        lines = textwrap.wrap(caption, width=CELL // 6)[:CAPTION_LINES]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + CELL + 2 + j * line_height), line, fill="black")
    return grid


def log_images(accelerator, name: str, image: PIL.Image.Image, step: int) -> None:
    """`image` to every tracker of the run that takes images."""
    for tracker in accelerator.trackers:
        kwargs = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
        tracker.log_images({name: np.asarray(image)[None]}, step=step, **kwargs)  # (1, H, W, 3)


def plot_losses(logs: Path, path: Path) -> None:
    """The losses of logs.jsonl (every key holding "loss") against the step, as a PNG (log scale when all are
    positive)."""
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in logs.read_text().splitlines() if line]
    names = sorted(
        {key for row in rows for key, value in row.items() if "loss" in key and isinstance(value, (int, float))}
    )
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    for name in names:
        points = [(row["step"], row[name]) for row in rows if name in row]
        axes.plot(*zip(*points), marker="o" if name.startswith("validation") else None, markersize=3, label=name)
    values = [row[name] for row in rows for name in names if name in row]
    if values and min(values) > 0:
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if names:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
