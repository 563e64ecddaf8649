"""The recipe that rebuilds the embedded demo model from nothing: `python -m lavit_pipelines.demo.recipe --output DIR`.

Stages, each in its own folder of DIR (a finished stage is skipped when the recipe is run again, so an
interrupted run continues where it stopped):

1. `data`: the shapes world's training scenes (`worlds.shapes.write_dataset`), and `data-vqa`: the same
   images with one `Question: {q} Answer: {a}` text per question.
2. `base`: the demo tokenizer; a ViT trained contrastively on the captions (EVA-CLIP's stand-in); a small
   KL autoencoder; everything else untrained. A complete pipeline folder.
3. `visual-tokenizer`, `pixel-decoder`, `language-model`: LaVIT's three stages with `lavit_pipelines.training`,
   each starting from the previous folder.
4. `model`: the last stage's pipeline, the folder that ships as `lavit_pipelines.default_model_path()`.

Everything is seeded: the same recipe on the same software gives the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..image_processor import LavitImageProcessor
from ..pipelines.text2image import LavitText2ImagePipeline
from ..worlds.shapes import write_dataset
from .components import build_components
from .pretraining import load_images_and_captions, train_vae, train_vision_encoder

DONE = "stage.json"


@dataclass(frozen=True)
class Recipe:
    """Every number of the recipe. `scaled(f)` keeps a fraction of the data and of every stage's steps."""

    seed: int = 0
    num_scenes: int = 4000
    vision_steps: int = 300
    vision_batch_size: int = 64
    vision_learning_rate: float = 1e-3
    vae_steps: int = 300
    vae_batch_size: int = 16
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-6
    tokenizer_steps: int = 300
    tokenizer_batch_size: int = 32
    tokenizer_learning_rate: float = 1e-3
    decoder_steps: int = 600
    decoder_batch_size: int = 32
    decoder_learning_rate: float = 5e-4
    language_steps: int = 600
    language_batch_size: int = 32
    language_learning_rate: float = 1e-3

    def scaled(self, fraction: float) -> Recipe:
        """The same recipe with `fraction` of the scenes (at least 16) and of every stage's steps (at least 1)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
        changes = {f.name: max(1, round(getattr(self, f.name) * fraction)) for f in dataclasses.fields(self) if f.name.endswith("_steps")}
        return dataclasses.replace(self, num_scenes=max(16, round(self.num_scenes * fraction)), **changes)


class RecipeRun:
    """One run of a `Recipe` into `output`, stage by stage, each logged with its time to `output/recipe.jsonl`."""

    def __init__(self, recipe: Recipe, output: str | Path):
        self.recipe = recipe
        self.output = Path(output)

    def log(self, record: dict) -> None:
        print(json.dumps(record), flush=True)
        with open(self.output / "recipe.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def stage(self, name: str, build) -> Path:
        """`build(folder)` fills `output/name`, unless a previous run finished it with the same recipe."""
        folder = self.output / name
        marker = folder / DONE
        recipe = dataclasses.asdict(self.recipe)
        if marker.is_file() and json.loads(marker.read_text())["recipe"] == recipe:
            self.log({"stage": name, "status": "already done"})
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        self.log({"stage": name, "status": "start"})
        start = time.time()
        build(folder)
        seconds = round(time.time() - start, 1)
        marker.write_text(json.dumps({"recipe": recipe, "seconds": seconds}))
        self.log({"stage": name, "status": "done", "seconds": seconds})
        return folder

    def run(self) -> Path:
        """All stages; returns the final pipeline folder `output/model`."""
        self.output.mkdir(parents=True, exist_ok=True)
        r = self.recipe
        data = self.stage("data", lambda folder: write_dataset(folder, r.num_scenes, seed=r.seed))
        vqa = self.stage("data-vqa", lambda folder: write_vqa_dataset(data, folder))
        base = self.stage("base", lambda folder: self.build_base(data, folder))
        from ..training import TrainingConfig, train

        def lavit_stage(name, model, dataset, steps, batch_size, learning_rate, **options):
            config = TrainingConfig(
                stage=name, model=str(model), data=str(dataset), output=str(self.output / name), max_steps=steps,
                batch_size=batch_size, learning_rate=learning_rate, seed=r.seed, lr_warmup_steps=max(1, steps // 20),
                lr_scheduler="cosine", logging_steps=10, checkpointing_steps=steps, **options,
            )
            return self.stage(name, lambda folder: train(config))

        tokenizer = lavit_stage("visual-tokenizer", base, data, r.tokenizer_steps, r.tokenizer_batch_size, r.tokenizer_learning_rate)
        decoder = lavit_stage(
            "pixel-decoder", tokenizer, data, r.decoder_steps, r.decoder_batch_size, r.decoder_learning_rate, train_unet=True
        )
        # The demo's understanding head starts from the stage-1 predictor and merger (it was never trained).
        language = lavit_stage(
            "language-model", decoder, vqa, r.language_steps, r.language_batch_size, r.language_learning_rate,
            init_understanding_head=True,
        )
        return self.stage("model", lambda folder: export(language, folder))

    def build_base(self, data: Path, folder: Path) -> None:
        """The untrained demo pipeline with the contrastively trained ViT and the trained autoencoder."""
        r = self.recipe
        components = build_components(r.seed)
        images, captions = load_images_and_captions(data)
        tokenizer = components["visual_tokenizer"]
        processor = LavitImageProcessor(**{k: tokenizer.config[k] for k in ("image_size", "image_mean", "image_std")})
        train_vision_encoder(
            tokenizer.encoder, processor, components["tokenizer"], images, captions, r.vision_steps,
            r.vision_batch_size, r.vision_learning_rate, r.seed, log=self.log,
        )
        train_vae(components["vae"], images, r.vae_steps, r.vae_batch_size, r.vae_learning_rate, r.vae_kl_weight, r.seed, log=self.log)
        LavitText2ImagePipeline(**components).save_pretrained(folder)


def write_vqa_dataset(data: Path, folder: Path) -> Path:
    """`data`'s images with each caption and each question as `Question: {q} Answer: {a}`: one image file (a
    hard link where the file system allows) and one `metadata.jsonl` line per text."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in map(json.loads, (data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()):
        texts = [row["text"]] + [f"Question: {q} Answer: {a}" for q, a in row["questions"]]
        for i, text in enumerate(texts):
            name = f"{Path(row['file_name']).stem}-{i}.png"
            try:
                os.link(data / row["file_name"], folder / name)
            except OSError:
                shutil.copyfile(data / row["file_name"], folder / name)
            lines.append(json.dumps({"file_name": name, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def export(trained: Path, folder: Path) -> None:
    """The final pipeline (with its visual tokenizer) saved as safetensors."""
    pipe = LavitText2ImagePipeline.from_pretrained(trained, load_visual_tokenizer=True, dtype=torch.float32)
    pipe.save_pretrained(folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavit_pipelines.demo.recipe", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for the stages; the model lands in OUTPUT/model")
    parser.add_argument("--fraction", type=float, default=1.0, help="fraction of the data and steps (for a quick check)")
    args = parser.parse_args(argv)
    print(RecipeRun(Recipe().scaled(args.fraction), args.output).run())


if __name__ == "__main__":
    main()
