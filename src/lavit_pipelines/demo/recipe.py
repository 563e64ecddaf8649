"""The recipe that rebuilds the embedded demo model from nothing: `python -m lavit_pipelines.demo.recipe --output DIR`.

Stages, each in its own folder of DIR (a finished stage is skipped when the recipe is run again, so an
interrupted run continues where it stopped):

1. `data`: the shapes world's training scenes (`worlds.shapes.write_dataset`), and `data-language`: the same
   images with their captions and `Question: {q} Answer: {a}.` texts (`write_language_dataset`).
2. `autoencoder`: a small KL autoencoder (Stable Diffusion's VAE role); `vision-encoder`: a ViT trained
   contrastively on the captions (EVA-CLIP's role); `base`: both in the untrained demo pipeline (tokenizer
   of the world's words, `components.build_components`), a complete pipeline folder.
3. `visual-tokenizer`, `pixel-decoder`, `language-model`: LaVIT's three stages with `lavit_pipelines.training`;
   the last two both start from the first (they are independent) and run side by side.
4. `model`: the language-model stage's text and visual tokenizers and language model with the pixel-decoder
   stage's decoder, UNet and VAE: the folder that ships as `lavit_pipelines.default_model_path()`.

Everything is seeded: the same recipe on the same software gives the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..image_processor import LavitImageProcessor
from ..models.visual_tokenizer import LavitVisualTokenizer
from ..pipelines.text2image import LavitText2ImagePipeline
from ..worlds.shapes import write_dataset
from .components import build_components
from .pretraining import load_images_and_captions, train_vae, train_vision_encoder

DONE = "stage.json"


@dataclass(frozen=True)
class Recipe:
    """Every number of the recipe, named `<stage prefix>_<setting>`. `scaled(f)` keeps a fraction of the
    data and of every stage's steps."""

    seed: int = 0
    data_num_scenes: int = 3000
    data_caption_copies: int = 3
    vae_steps: int = 1000
    vae_batch_size: int = 16
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-6
    vision_steps: int = 1200
    vision_batch_size: int = 64
    vision_learning_rate: float = 1e-3
    vision_pixel_weight: float = 0.0
    tokenizer_steps: int = 3000
    tokenizer_batch_size: int = 32
    tokenizer_learning_rate: float = 1e-3
    tokenizer_keep_ratio: float = 1 / 3
    decoder_steps: int = 14000
    decoder_batch_size: int = 32
    decoder_learning_rate: float = 1e-3
    decoder_snr_gamma: float = 5.0
    language_steps: int = 8000
    language_batch_size: int = 32
    language_learning_rate: float = 1e-3
    language_understanding_ratio: float = 0.3
    # Decoder guidance of the shipped pipeline (`default_guidance_scale`): LaVIT's 7.0 overdrives this small UNet;
    # 2.5 was the best of 1-7 on `demo_quality`'s prompts of seed 0 and held on those of seed 1 (docs/demo-model.md).
    model_guidance_scale: float = 2.5

    def scaled(self, fraction: float) -> Recipe:
        """The same recipe with `fraction` of the scenes (at least 16) and of every stage's steps (at least 1)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
        steps = {
            f.name: max(1, round(getattr(self, f.name) * fraction))
            for f in dataclasses.fields(self)
            if f.name.endswith("_steps")
        }
        return dataclasses.replace(self, data_num_scenes=max(16, round(self.data_num_scenes * fraction)), **steps)

    def settings(self, prefix: str) -> dict:
        """The seed and the settings named `<prefix>_...`."""
        return {"seed": self.seed, **{k: v for k, v in dataclasses.asdict(self).items() if k.startswith(prefix + "_")}}


class RecipeRun:
    """One run of a `Recipe` into `output`, stage by stage, each logged with its time to `output/recipe.jsonl`.

    A stage's key is its settings plus the keys of the stages it reads: a folder whose `stage.json` holds the
    same key is reused, anything else is rebuilt (so an interrupted run goes on where it stopped)."""

    def __init__(self, recipe: Recipe, output: str | Path):
        self.recipe = recipe
        self.output = Path(output)
        self.keys: dict[str, dict] = {}

    def log(self, record: dict) -> None:
        print(json.dumps(record), flush=True)
        with open(self.output / "recipe.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def stage(self, name: str, build, settings: dict, inputs: tuple[str, ...] = ()) -> Path:
        """`build(folder)` fills `output/name`, unless a previous run finished it with the same key."""
        folder = self.output / name
        marker = folder / DONE
        key = {"settings": settings, "inputs": {i: self.keys[i] for i in inputs}}
        self.keys[name] = key
        if marker.is_file() and json.loads(marker.read_text())["key"] == key:
            self.log({"stage": name, "status": "already done"})
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        self.log({"stage": name, "status": "start"})
        start = time.time()
        build(folder)
        seconds = round(time.time() - start, 1)
        marker.write_text(json.dumps({"key": key, "seconds": seconds}))
        self.log({"stage": name, "status": "done", "seconds": seconds})
        return folder

    def run(self) -> Path:
        """All stages; returns the final pipeline folder `output/model`."""
        self.output.mkdir(parents=True, exist_ok=True)
        r = self.recipe
        data = self.stage("data", lambda out: write_dataset(out, r.data_num_scenes, seed=r.seed), r.settings("data"))
        texts = self.stage(
            "data-language", lambda out: write_language_dataset(data, out, r.data_caption_copies), {}, ("data",)
        )
        # Independent stages run in pairs, one thread each: the autoencoder beside the vision encoder, and the
        # pixel decoder beside the language model (both read only the stage-1 visual tokenizer).
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            autoencoder = pool.submit(in_worker, r, self.output, self.keys, "autoencoder_stage", data)
            with single_thread():
                self.stage(
                    "vision-encoder", lambda out: self.train_vision_encoder(data, out), r.settings("vision"), ("data",)
                )
            self.keys.update(autoencoder.result())
            base = self.stage("base", self.assemble_base, {"seed": r.seed}, ("autoencoder", "vision-encoder"))
            # A short run needs a fast codebook EMA and early restarts of unused codes, or the codebook collapses.
            # One thread: on two, the same run gave other weights each time (torch's CPU reductions).
            with single_thread():
                visual_tokenizer = self.lavit_stage(
                    "visual-tokenizer",
                    base,
                    data,
                    "tokenizer",
                    ("base", "data"),
                    codebook_decay=0.9,
                    dead_code_threshold=0.03,
                    target_keep_ratio=r.tokenizer_keep_ratio,
                )
            decoder = pool.submit(in_worker, r, self.output, self.keys, "pixel_decoder_stage", visual_tokenizer, data)
            with single_thread():
                # The demo's understanding head starts from the stage-1 predictor and merger (never trained).
                language = self.lavit_stage(
                    "language-model",
                    visual_tokenizer,
                    texts,
                    "language",
                    ("visual-tokenizer", "data-language"),
                    init_understanding_head=True,
                    understanding_ratio=r.language_understanding_ratio,
                )
            self.keys.update(decoder.result())
        decoder = self.output / "pixel-decoder"
        return self.stage(
            "model",
            lambda out: export(language, decoder, out, r.model_guidance_scale),
            r.settings("model"),
            ("language-model", "pixel-decoder"),
        )

    def autoencoder_stage(self, data: Path) -> Path:
        r = self.recipe
        return self.stage("autoencoder", lambda out: self.train_autoencoder(data, out), r.settings("vae"), ("data",))

    def pixel_decoder_stage(self, visual_tokenizer: Path, data: Path) -> Path:
        # The decoder and the UNet train from scratch on stage 1's codebook (init_decoder_input); the VAE's
        # latents are encoded once (cache_latents): about half of a step's time (benchmarks/decoder_training_step.py).
        return self.lavit_stage(
            "pixel-decoder",
            visual_tokenizer,
            data,
            "decoder",
            ("visual-tokenizer",),
            train_unet=True,
            init_decoder_input=True,
            snr_gamma=self.recipe.decoder_snr_gamma,
            cache_latents=True,
        )

    def lavit_stage(self, stage: str, model: Path, data: Path, prefix: str, inputs: tuple[str, ...], **options) -> Path:
        """One LaVIT stage with `lavit_pipelines.training`, from `model` on `data`, with the `prefix` settings."""
        from ..training import TrainingConfig, train

        settings = self.recipe.settings(prefix)
        steps = settings[f"{prefix}_steps"]
        config = TrainingConfig(
            stage=stage,
            model=str(model),
            data=str(data),
            output=str(self.output / stage),
            max_steps=steps,
            batch_size=settings[f"{prefix}_batch_size"],
            learning_rate=settings[f"{prefix}_learning_rate"],
            seed=self.recipe.seed,
            lr_scheduler="cosine",
            lr_warmup_steps=max(1, steps // 20),
            logging_steps=10,
            checkpointing_steps=steps,
            **options,
        )
        return self.stage(stage, lambda out: train(config), {**settings, **options}, inputs)

    def train_autoencoder(self, data: Path, folder: Path) -> None:
        r = self.recipe
        images, _ = load_images_and_captions(data)
        vae = build_components(r.seed)["vae"]
        train_vae(
            vae, images, r.vae_steps, r.vae_batch_size, r.vae_learning_rate, r.vae_kl_weight, r.seed, log=self.log
        )
        vae.save_pretrained(folder)

    def train_vision_encoder(self, data: Path, folder: Path) -> None:
        """The demo's visual tokenizer, untrained but for its ViT (trained as `pretraining.ContrastiveModel`)."""
        r = self.recipe
        images, captions = load_images_and_captions(data)
        components = build_components(r.seed)
        visual_tokenizer = components["visual_tokenizer"]
        processor = LavitImageProcessor.from_visual_tokenizer_config(visual_tokenizer.config)
        train_vision_encoder(
            visual_tokenizer.encoder,
            processor,
            components["tokenizer"],
            images,
            captions,
            r.vision_steps,
            r.vision_batch_size,
            r.vision_learning_rate,
            r.seed,
            r.vision_pixel_weight,
            log=self.log,
        )
        visual_tokenizer.save_pretrained(folder)

    def assemble_base(self, folder: Path) -> None:
        """The untrained demo pipeline with the trained autoencoder and ViT: the first LaVIT stage's BASE."""
        components = build_components(self.recipe.seed)
        components["vae"] = AutoencoderKL.from_pretrained(self.output / "autoencoder")
        components["visual_tokenizer"] = LavitVisualTokenizer.from_pretrained(self.output / "vision-encoder")
        LavitText2ImagePipeline(**components).save_pretrained(folder)


@contextmanager
def single_thread():
    """torch on one thread inside the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def in_worker(recipe: Recipe, output: Path, keys: dict, method: str, *args) -> dict:
    """`RecipeRun(recipe, output).<method>(*args)` on one thread (in a worker process), knowing the `keys` of
    the stages done so far; returns the keys after it."""
    torch.set_num_threads(1)
    run = RecipeRun(recipe, output)
    run.keys.update(keys)
    getattr(run, method)(*args)
    return run.keys


def write_language_dataset(data: Path, folder: Path, caption_copies: int = 3) -> Path:
    """The language-model stage's data: `data`'s images with texts that teach both directions and the answers.

    Per image: its caption `caption_copies` times (the first as a sentence with a final '.', so that the
    understanding pipeline's minimum caption length ends in a '.' it cuts at, the others as users prompt),
    which the stage mixes into image generation and captioning; and each question as the prompt
    `Question: {q} Answer:` (LaVIT's VQA prompt) of the text `{a}.`, understanding only, the loss on the
    answer. The language-model stage reads one text per image file, so every text gets its own file: a hard
    link where the file system allows."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in map(json.loads, (data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()):
        texts = [("", row["text"] + ".")] + [("", row["text"])] * (caption_copies - 1)
        texts += [(f"Question: {q} Answer:", f"{a}.") for q, a in row["questions"]]
        for i, (prompt, text) in enumerate(texts):
            name = f"{Path(row['file_name']).stem}-{i}.png"
            try:
                os.link(data / row["file_name"], folder / name)
            except OSError:
                shutil.copyfile(data / row["file_name"], folder / name)
            lines.append(json.dumps({"file_name": name, "prompt": prompt, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def export(language: Path, decoder: Path, folder: Path, guidance_scale: float) -> None:
    """The final pipeline (with its visual tokenizer) as safetensors: the tokenizer, language model and visual
    tokenizer of the language-model stage, the pixel decoder, UNet, VAE and scheduler of the pixel-decoder stage;
    `guidance_scale` is its `default_guidance_scale`."""
    readers = LavitText2ImagePipeline.from_pretrained(language, dtype=torch.float32)
    writers = LavitText2ImagePipeline.from_pretrained(decoder, dtype=torch.float32)
    components = {
        **writers.components,
        **{k: readers.components[k] for k in ("tokenizer", "language_model", "visual_tokenizer")},
    }
    LavitText2ImagePipeline(**components, default_guidance_scale=guidance_scale).save_pretrained(folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavit_pipelines.demo.recipe", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for the stages; the model lands in OUTPUT/model")
    parser.add_argument(
        "--fraction", type=float, default=1.0, help="fraction of the data and steps (for a quick check)"
    )
    args = parser.parse_args(argv)
    print(RecipeRun(Recipe().scaled(args.fraction), args.output).run())


if __name__ == "__main__":
    main()
