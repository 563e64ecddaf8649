"""Zero-shot text-to-image (COCO FID) as in LaVIT's `evaluate_text2img.py`: per caption 4 images (50 steps, top-k
300, LLM guidance 1.5, decoder guidance 1.5), the best kept by a CLIP (ViT-L/14 in the paper) re-ranking, FID with
torchmetrics against the real images resized to 512² (bicubic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..pipelines.validation import check_token_limits
from .metrics import fid_metric, frechet_distance
from .runner import (
    check_entries,
    check_output_folder,
    file_digest,
    folder_identity,
    load_text2image,
    read_json,
    run_sharded,
    start_run,
    write_json,
)

PROTOCOL = {
    "num_inference_steps": 50,
    "guidance_scale": 1.5,
    "llm_guidance_scale": 1.5,
    "top_k": 300,
    "top_p": 1.0,
    "temperature": 1.0,
    "min_new_tokens": 20,
    "max_new_tokens": 200,
}
NUM_IMAGES = 4
FID_RESOLUTION = 512


class ClipRanker:
    """A transformers CLIP from a local folder, preprocessing as the original: resize to the model's square input
    size (bicubic, no crop), the folder's mean/std (CLIP's by default)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--clip: {folder} is not a transformers CLIP folder (no config.json)")
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor_config = folder / "preprocessor_config.json"
        processor = json.loads(processor_config.read_text()) if processor_config.is_file() else {}
        self.mean = np.array(processor.get("image_mean", OPENAI_CLIP_MEAN), dtype=np.float32)
        self.std = np.array(processor.get("image_std", OPENAI_CLIP_STD), dtype=np.float32)
        self.size = self.model.config.vision_config.image_size

    def pixel_values(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """(B, 3, size, size) normalised pixels."""
        arrays = [
            np.asarray(i.convert("RGB").resize((self.size, self.size), PIL.Image.BICUBIC), np.float32) / 255
            for i in images
        ]
        return torch.from_numpy((np.stack(arrays) - self.mean) / self.std).permute(0, 3, 1, 2)

    @torch.no_grad()
    def similarity(self, images: list[PIL.Image.Image], text: str) -> torch.Tensor:
        """(B,) cosine similarity of each image with `text`."""
        device = self.model.device
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer([text], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        text_features = self.model.get_text_features(**tokens.to(device)).pooler_output
        image_features = self.model.get_image_features(pixel_values=self.pixel_values(images).to(device)).pooler_output
        return torch.nn.functional.cosine_similarity(image_features, text_features).cpu()


def load_t2i_items(annotations: str | Path, images: str | Path | None, need_images: bool) -> list[dict]:
    """`[{"caption" (or "text"), "image"?}]` -> `[{"index", "caption", "path"?}]`, checked (real images: with `need_images`)."""
    entries = read_json(annotations, "--annotations")
    check_entries(entries, {}, annotations)
    for index, entry in enumerate(entries):
        if not isinstance(entry.get("caption", entry.get("text")), str):
            raise ValueError(
                f"{annotations}: entry {index}: 'caption' (or 'text') must be a str, got "  # noqa: TRY004 - file content
                f"{json.dumps(entry.get('caption', entry.get('text')))[:80]}"
            )
    if need_images:
        if images is None:
            raise ValueError("FID needs the real images: pass --images (the folder of the annotations' 'image' paths)")
        check_entries(entries, {"image": str}, annotations, Path(images))
    return [
        {
            "index": index,
            "caption": entry.get("caption", entry.get("text")),
            "path": str(Path(images) / entry["image"]) if need_images else None,
        }
        for index, entry in enumerate(entries)
    ]


def image_tensor(image: PIL.Image.Image, size: int | None = None) -> torch.Tensor:
    """(3, H, W) float in [0, 1]; resized to size² (bicubic) when `size` is given."""
    image = image.convert("RGB")
    if size is not None:
        image = image.resize((size, size), PIL.Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)


def _image_batches(paths: list[str], size: int | None, batch_size: int = 32):
    for start in range(0, len(paths), batch_size):
        yield torch.stack([image_tensor(PIL.Image.open(p), size) for p in paths[start : start + batch_size]])


def evaluate_text_to_image(
    model_path: str | Path,
    *,
    annotations: str | Path,
    output: str | Path,
    images: str | Path | None = None,
    clip: str | Path | None = None,
    fid_feature: torch.nn.Module | str | Path | None = None,
    num_images: int = NUM_IMAGES,
    resolution: int = FID_RESOLUTION,
    batch_size: int = 1,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    limit: int | None = None,
    generation_kwargs: dict | None = None,
) -> dict | None:
    """Generate `num_images` images per caption of `annotations` (the first `limit`), keep the one the CLIP in the
    folder `clip` ranks best, save it as `output/images/{index:05d}.png`; write `output/predictions.json` and
    `output/metrics.json` (`fid` when `fid_feature` is given: a feature module or the Inception weights file;
    `clip_score`, 100·max(cos, 0) averaged, when `clip` is given). Image j of caption i is seeded with
    `seed + i * num_images + j`. `generation_kwargs` override `PROTOCOL`. Returns the metrics on the main process."""
    check_output_folder(
        output,
        {
            "--annotations": annotations,
            "--images": images,
            "--clip": clip,
            "--inception-weights": fid_feature if isinstance(fid_feature, (str, Path)) else None,
        },
    )
    if num_images > 1 and clip is None:
        raise ValueError(f"choosing the best of {num_images} images needs a CLIP folder (--clip), or num_images=1")
    kwargs = {**PROTOCOL, **(generation_kwargs or {})}
    check_token_limits(kwargs["min_new_tokens"], kwargs["max_new_tokens"])
    items = load_t2i_items(annotations, images, need_images=fid_feature is not None)[:limit]
    fid = fid_metric(fid_feature).to(device) if fid_feature is not None else None
    ranker = ClipRanker(clip, device) if clip is not None else None
    config = {
        "task": "t2i",
        "model": folder_identity(model_path),
        "annotations": file_digest(annotations),
        "clip": folder_identity(clip),
        "num_images": num_images,
        "seed": seed,
        "dtype": str(dtype),
        "batch_size": batch_size,
        **kwargs,
    }
    output = start_run(output, config)
    (output / "images").mkdir(exist_ok=True)
    pipe = load_text2image(model_path, device, dtype)
    pipe.set_progress_bar_config(disable=True)

    def predict(batch: list[dict], start: int) -> list[dict]:
        generators = [
            torch.Generator().manual_seed(seed + item["index"] * num_images + j)
            for item in batch
            for j in range(num_images)
        ]
        generated = pipe(
            [item["caption"] for item in batch], num_images_per_prompt=num_images, generator=generators, **kwargs
        ).images
        records = []
        for k, item in enumerate(batch):
            candidates = generated[k * num_images : (k + 1) * num_images]
            scores = ranker.similarity(candidates, item["caption"]) if ranker is not None else torch.zeros(1)
            best = int(scores.argmax())
            name = f"images/{item['index']:05d}.png"
            candidates[best].save(output / name)
            clip_score = 100 * max(float(scores[best]), 0.0) if ranker is not None else None
            records.append(
                {"index": item["index"], "caption": item["caption"], "image": name, "clip_score": clip_score}
            )
        return records

    records = run_sharded(items, "index", predict, output, batch_size)
    if records is None:
        return None
    write_json(output / "predictions.json", records)
    metrics = {"num_prompts": len(records), "num_images_per_prompt": num_images}
    if ranker is not None:
        metrics["clip_score"] = sum(r["clip_score"] for r in records) / len(records)
    if fid is not None:
        real = _image_batches([item["path"] for item in items], resolution)
        fake = _image_batches([str(output / r["image"]) for r in records], None)
        metrics["fid"] = frechet_distance(fid, real, fake)
    write_json(output / "metrics.json", metrics)
    return metrics
