"""Teach a LaVIT a new subject from a handful of images: `lavit train subject` (docs/subject.md).

DreamBooth and textual inversion, as options of the language-model stage (no loop of its own): the images are
captioned with a new word (`token`, added after LaVIT's whole vocabulary and started from `class_word`),
class examples (captions with `class_word` instead of the token, drawn by the base model, or given) keep what
the model knew about the class (prior preservation), and the language model learns to write the subject's
visual tokens (`understanding_ratio` 0: only the generation direction trains; the understanding head stays).
With `decoder`, the pixel-decoder stage then adapts the UNet to the subject's look (LoRA on its cross-attention
keys and values, as Custom Diffusion; the class examples weighted along).

    from lavit_pipelines.training.subject import SubjectConfig, train_subject
    model = train_subject(SubjectConfig(model="base", images="my-subject", token="sks", class_word="triangle",
                                        output="out"))   # -> out/model, a pipeline folder that knows "sks"
"""

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import METADATA, MIXED_PRECISIONS, TrainingConfig, setting

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INSTANCE_DATA, CLASS_DATA, MODEL, LANGUAGE_MODEL = "instance-data", "class-data", "model", "language-model"
DECODER_LORA_TARGETS = ["attn2.to_k", "attn2.to_v"]  # the UNet's cross-attention keys and values


@dataclass
class SubjectConfig:
    """One subject fine-tune.

    `images`: a folder of the subject's images, either with a `metadata.jsonl` whose every text holds `token`
    (e.g. "a sks on the left"), or plain images, each then captioned `caption` ("{token}" filled in).
    `class_word`: what the subject is (its embedding starts the new word's, unless `initializer_word`; and the
    class prompts are the captions with `class_word` in place of the token). `class_images`: a folder of class
    examples (`metadata.jsonl` layout) instead of drawing `num_class_images` (default: as many as the subject's
    images) with the base model; `prior_preservation=False` trains without them. `lora=False` (default) trains
    the word's embedding alone (textual inversion: prompts without the word are unchanged, and class examples,
    whose loss does not depend on that embedding, are neither drawn nor trained); `lora=True` adds LoRA
    adapters of `lora_rank` to the language model, and then the class examples keep the class. `decoder=True` then
    trains a LoRA of `lora_rank` on the UNet's cross-attention keys and values (`decoder_steps`,
    `decoder_learning_rate`) with the class examples; the language-model stage's folder goes to `language-model/`.
    The defaults of `max_steps` and `learning_rate` are those measured on the demo model
    (benchmarks/subject_quality.py, docs/subject.md). `output` receives `instance-data/` (when captions were
    written), `class-data/` and `model/`, the trained pipeline folder. `mixed_precision` and
    `gradient_checkpointing` as in `TrainingConfig` (for LaVIT-7B: "bf16" and True). No resumable checkpoint is
    left in `model/` unless `keep_checkpoint`.
    """

    model: str = setting(help="BASE pipeline folder")
    images: str = setting(
        help="the subject's images: a folder with metadata.jsonl (texts holding the token) or plain images"
    )
    token: str = setting(help="the new word, e.g. sks")
    class_word: str = setting(help="what the subject is, e.g. triangle: starts the word's embedding; class prompts")
    output: str = setting(help="OUT folder (new or empty): instance-data/, class-data/, model/")
    initializer_word: str | None = setting(
        None, "the word(s) that start the new word's embedding (default: class_word)"
    )
    caption: str = setting("a {token}", "caption of plain images ({token} is filled in)")
    class_images: str | None = setting(None, "class examples (metadata.jsonl folder) instead of drawing them with BASE")
    num_class_images: int | None = setting(None, "class examples to draw (default: as many as the subject's images)")
    prior_preservation: bool = setting(
        True, "with --lora: train class examples along (DreamBooth's prior preservation)"
    )
    prior_loss_weight: float = setting(1.0, "the weight of the class examples' tokens in the loss")
    lora: bool = setting(False, "LoRA adapters on the language model besides the word (off: the word alone)")
    lora_rank: int = setting(8, "LoRA rank")
    max_steps: int = setting(300, "optimizer steps")
    learning_rate: float = setting(2e-2, "learning rate")
    decoder: bool = setting(
        False,
        "then adapt the UNet to the subject's look: LoRA on its cross-attention keys and values, trained by the "
        "pixel-decoder stage on the images and the class examples (old prompts' pictures change too)",
    )
    decoder_steps: int = setting(300, "with --decoder: optimizer steps of the UNet's LoRA")
    decoder_learning_rate: float = setting(3e-4, "with --decoder: learning rate of the UNet's LoRA")
    batch_size: int = setting(8, "examples per batch")
    seed: int = setting(0, "seed of the class examples, the data order and every random draw")
    mixed_precision: str = setting("no", f"one of {', '.join(MIXED_PRECISIONS)} (LaVIT-7B: bf16)")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (LaVIT-7B: on)")
    keep_checkpoint: bool = setting(
        False, "keep OUT/model/checkpoint-<steps>, the resumable state (frozen weights included; LaVIT-7B: ~17 GB)"
    )

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """ValueError / FileNotFoundError naming the first bad setting; reads no model."""
        if not (Path(self.model) / "model_index.json").is_file():
            raise FileNotFoundError(f"`model`: {self.model!r} is not a pipeline folder (no model_index.json).")
        if not re.fullmatch(r"\S+", self.token):
            raise ValueError(f"`token` must be one word without spaces, got {self.token!r}.")
        if not self.class_word.strip():
            raise ValueError("`class_word` must name what the subject is (e.g. 'triangle'), got an empty text.")
        if "{token}" not in self.caption:
            raise ValueError(f"`caption` must contain '{{token}}', got {self.caption!r}.")
        for name in ("lora_rank", "max_steps", "batch_size", "decoder_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.num_class_images is not None and self.num_class_images < 1:
            raise ValueError(f"`num_class_images` must be a positive integer, got {self.num_class_images!r}.")
        for name in ("learning_rate", "decoder_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)!r}.")
        if not self.prior_loss_weight >= 0:
            raise ValueError(f"`prior_loss_weight` must be >= 0, got {self.prior_loss_weight!r}.")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"`mixed_precision` must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}.")
        if self.class_images is not None:
            from .data import read_metadata

            read_metadata(Path(self.class_images))
        subject_captions(Path(self.images), self.token, self.caption)
        output = Path(self.output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise ValueError(f"`output`: {output} already exists and is not an empty folder; choose a new one.")


def subject_captions(images: Path, token: str, caption: str) -> list[tuple[str, str]]:
    """(file name, caption) of every subject image; ValueError when there is none or a caption lacks `token`."""
    if not images.is_dir():
        raise FileNotFoundError(f"`images`: {str(images)!r} is not a folder.")
    if (images / METADATA).is_file():
        from .data import read_metadata

        read_metadata(images)
        records = [
            json.loads(line) for line in (images / METADATA).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        pairs = [(record["file_name"], record["text"]) for record in records]
        for number, (_, text) in enumerate(pairs, start=1):
            if token not in text.split():
                raise ValueError(
                    f"`images`: {images / METADATA}:{number}: the caption {text!r} does not contain the word {token!r}."
                )
        return pairs
    names = sorted(p.name for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise ValueError(f"`images`: {str(images)!r} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
    return [(name, caption.format(token=token)) for name in names]


def write_metadata(folder: Path, pairs: list[tuple[str, str]]) -> None:
    lines = [json.dumps({"file_name": name, "text": text}) for name, text in pairs]
    (folder / METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")


def class_prompts(captions: list[str], token: str, class_word: str, count: int) -> list[str]:
    """The subject's captions with `class_word` in place of `token`, cycled to `count` prompts."""
    replaced = [" ".join(class_word if word == token else word for word in text.split()) for text in captions]
    return [replaced[i % len(replaced)] for i in range(count)]


def draw_class_examples(model: str, prompts: list[str], folder: Path, seed: int) -> None:
    """The base model's pictures of `prompts` (image i seeded `seed + i`) into `folder` with metadata.jsonl."""
    import torch

    from ..pipelines.text2image import LavitText2ImagePipeline

    pipe = LavitText2ImagePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    folder.mkdir(parents=True)
    pairs = []
    for start in range(0, len(prompts), 8):
        batch = prompts[start : start + 8]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        for i, (prompt, image) in enumerate(zip(batch, pipe(batch, generator=generators).images)):
            name = f"{start + i:05d}.png"
            image.save(folder / name)
            pairs.append((name, prompt))
    write_metadata(folder, pairs)


def prepare_subject_data(config: SubjectConfig) -> tuple[Path, Path | None]:
    """Write OUT/instance-data (for plain images) and OUT/class-data (class examples drawn by the base model);
    returns the data folder and the class-data folder (None without prior preservation, or for the word alone)."""
    output, images = Path(config.output), Path(config.images)
    pairs = subject_captions(images, config.token, config.caption)
    output.mkdir(parents=True, exist_ok=True)
    data = images
    if not (images / METADATA).is_file():
        data = output / INSTANCE_DATA
        data.mkdir()
        for name, _ in pairs:
            shutil.copy2(images / name, data / name)
        write_metadata(data, pairs)
    if not (config.prior_preservation and (config.lora or config.decoder)):  # the word alone: they change nothing
        return data, None
    if config.class_images is not None:
        return data, Path(config.class_images)
    prompts = class_prompts(
        [text for _, text in pairs], config.token, config.class_word, config.num_class_images or len(pairs)
    )
    draw_class_examples(config.model, prompts, output / CLASS_DATA, config.seed)
    return data, output / CLASS_DATA


def stage_config(config: SubjectConfig, data: Path, class_data: Path | None) -> TrainingConfig:
    """The language-model stage's settings for this subject (into OUT/model, or OUT/language-model before the
    decoder step)."""
    return TrainingConfig(
        stage="language-model",
        model=config.model,
        data=str(data),
        output=str(Path(config.output) / (LANGUAGE_MODEL if config.decoder else MODEL)),
        class_data=None if class_data is None or not config.lora else str(class_data),
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        seed=config.seed,
        lora=config.lora,
        lora_rank=config.lora_rank,
        textual_inversion=not config.lora,
        placeholder_token=config.token,
        initializer_token=config.initializer_word or config.class_word,
        prior_loss_weight=config.prior_loss_weight,
        understanding_ratio=0.0,
        train_understanding_head=False,
        checkpointing_steps=config.max_steps,
        checkpoints_total_limit=1 if config.keep_checkpoint else 0,
        mixed_precision=config.mixed_precision,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def decoder_config(config: SubjectConfig, model: Path, data: Path, class_data: Path | None) -> TrainingConfig:
    """The pixel-decoder stage's settings of the decoder step: from the language-model stage's folder `model` into
    OUT/model, the UNet's cross-attention LoRA alone (the pixel decoder stays), no condition dropout."""
    return TrainingConfig(
        stage="pixel-decoder",
        model=str(model),
        data=str(data),
        output=str(Path(config.output) / MODEL),
        max_steps=config.decoder_steps,
        learning_rate=config.decoder_learning_rate,
        batch_size=config.batch_size,
        seed=config.seed,
        lora=True,
        lora_rank=config.lora_rank,
        unet_lora_target_modules=DECODER_LORA_TARGETS,
        train_pixel_decoder=False,
        condition_dropout=0.0,
        cache_latents=True,
        class_data=None if class_data is None else str(class_data),
        prior_loss_weight=config.prior_loss_weight,
        checkpointing_steps=config.decoder_steps,
        checkpoints_total_limit=1 if config.keep_checkpoint else 0,
        mixed_precision=config.mixed_precision,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def check_new_word(config: SubjectConfig) -> None:
    """The token must be new to the base model's tokenizer (read alone, no model)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(config.model, "tokenizer"))
    if config.token in tokenizer.get_vocab():
        raise ValueError(
            f"`token`: {config.token!r} is already a word of {config.model!r}; choose a new word (e.g. 'sks')."
        )


def train_subject(config: SubjectConfig) -> Path:
    """Prepare the data and class examples, then run the language-model stage (and with `decoder` the pixel-decoder
    stage after it, whose folder gets the word's learned_embeds.safetensors too); returns OUT/model."""
    check_new_word(config)
    data, class_data = prepare_subject_data(config)
    from . import train

    model = train(stage_config(config, data, class_data))
    if not config.decoder:
        return model
    from ..pipelines.textual_inversion import LEARNED_EMBEDS

    output = train(decoder_config(config, model, data, class_data))
    shutil.copy2(model / LEARNED_EMBEDS, output / LEARNED_EMBEDS)
    return output
