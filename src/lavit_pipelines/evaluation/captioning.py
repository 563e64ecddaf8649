"""Zero-shot captioning (COCO Karpathy test, NoCaps, Flickr30K) as in LaVIT's `evaluate_caption.py`: no prompt,
2 beams, 8–36 new tokens, visual ids suppressed, cut at the first '.' (`LavitUnderstandingPipeline.caption`),
scored with pycocoevalcap against a COCO-format caption file."""

from __future__ import annotations

from pathlib import Path

import torch

from . import runner
from .metrics import CAPTION_METRICS, caption_scores, check_caption_metrics


def image_id_of(entry: dict) -> int:
    """`image_id` (or `img_id`) of a LAVIS annotation entry, else the number after the file name's last '_' (as
    the original: `.../COCO_val2014_000000391895.jpg` -> 391895)."""
    value = entry.get("image_id", entry.get("img_id"))
    return int(value if value is not None else Path(entry["image"]).stem.split("_")[-1])


def load_caption_items(annotations: str | Path, images: str | Path) -> list[dict]:
    """LAVIS-format annotations `[{"image": rel/path, "image_id"?: int}]` -> `[{"image_id", "path"}]`, checked."""
    entries = runner.read_json(annotations, "--annotations")
    runner.check_entries(entries, {"image": str}, annotations, Path(images))
    items = []
    for index, entry in enumerate(entries):
        try:
            items.append({"image_id": image_id_of(entry), "path": str(Path(images) / entry["image"])})
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{annotations}: entry {index}: no integer `image_id`, and its file name ends in no number"
            ) from error
    runner.check_entries(items, {"image_id": int}, annotations, key="image_id")
    return items


def load_references(ground_truth: str | Path, image_ids: list[int]) -> dict[int, list[str]]:
    """image id -> reference captions from a COCO caption file (`{"annotations": [{"image_id", "caption"}]}`);
    ValueError naming the first image id it does not cover."""
    data = runner.read_json(ground_truth, "--ground-truth")
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if annotations is None:
        raise ValueError(f"{ground_truth}: expected a COCO caption file with an 'annotations' list")
    runner.check_entries(annotations, {"image_id": int, "caption": str}, ground_truth)
    references = {}
    for entry in annotations:
        references.setdefault(int(entry["image_id"]), []).append(entry["caption"])
    missing = [i for i in image_ids if i not in references]
    if missing:
        raise ValueError(f"{ground_truth} has no caption for image id {missing[0]} ({len(missing)} ids uncovered)")
    return references


def evaluate_captioning(
    model_path: str | Path,
    *,
    annotations: str | Path,
    images: str | Path,
    ground_truth: str | Path,
    output: str | Path,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    limit: int | None = None,
    metrics: tuple[str, ...] = CAPTION_METRICS,
) -> dict | None:
    """Caption every image of `annotations` (the first `limit`), write `output/predictions.json`
    (`[{"image_id", "caption"}]`) and `output/metrics.json` (pycocoevalcap's keys for `metrics`); returns the
    metrics on the main process, None on the others. The images of a batch share one generator seeded with
    `seed + the batch's first index`."""
    runner.check_output_folder(
        output, {"--annotations": annotations, "--ground-truth": ground_truth, "--images": images}
    )
    items = load_caption_items(annotations, images)[:limit]
    references = load_references(ground_truth, [item["image_id"] for item in items])
    check_caption_metrics(metrics)
    config = runner.understanding_record(
        "caption", model_path, images, annotations, ground_truth, seed, dtype, batch_size
    )
    output = runner.start_run(output, config)
    pipe = runner.load_understanding(model_path, device, dtype)
    pipe.set_progress_bar_config(disable=True)

    def predict(batch: list[dict], start: int) -> list[dict]:
        captions = pipe.caption([item["path"] for item in batch], generator=torch.Generator().manual_seed(seed + start))
        return [{"image_id": item["image_id"], "caption": caption} for item, caption in zip(batch, captions)]

    records = runner.run_sharded(items, "image_id", predict, output, batch_size)
    if records is None:
        return None
    runner.write_json(output / "predictions.json", records)
    scores = caption_scores(references, {r["image_id"]: r["caption"] for r in records}, metrics)
    runner.write_json(output / "metrics.json", scores)
    return scores
