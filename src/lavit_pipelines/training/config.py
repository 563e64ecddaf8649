"""`TrainingConfig`: every setting of a training run, checked before anything heavy happens."""

import dataclasses
import math
import os
from dataclasses import dataclass, field

STAGES = ("visual-tokenizer", "pixel-decoder", "language-model")
LORA_STAGES = ("pixel-decoder", "language-model")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
METADATA = "metadata.jsonl"  # an image folder's captions (the `datasets` imagefolder convention)
# Settings that are counts: >= 1, or None where the class docstring gives None a meaning.
POSITIVE = (
    "max_steps",
    "batch_size",
    "lora_rank",
    "gradient_accumulation_steps",
    "checkpointing_steps",
    "logging_steps",
    "max_length",
    "reconstruction_layers",
    "validation_inference_steps",
    "kmeans_iters",
)
POSITIVE_OR_NONE = ("validation_steps", "resolution")
NON_NEGATIVE = ("lr_warmup_steps", "quantize_after_steps")
NON_NEGATIVE_OR_NONE = ("checkpoints_total_limit",)
# Float settings: (name, lowest allowed, whether the lowest is allowed, None allowed); each must be finite.
FLOATS = (
    ("learning_rate", 0.0, False, False),
    ("weight_decay", 0.0, True, False),
    ("max_grad_norm", 0.0, True, False),
    ("lora_alpha", 0.0, False, True),
    ("keep_ratio_weight", 0.0, True, False),
    ("commitment_weight", 0.0, True, False),
    ("dead_code_threshold", 0.0, True, False),
    ("gumbel_temperature", 0.0, False, False),
    ("snr_gamma", 0.0, False, True),
)


def setting(default=dataclasses.MISSING, help: str = "", default_factory=dataclasses.MISSING):
    """A `TrainingConfig` field with its help text (the `lavit train` option's help)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help})


@dataclass
class TrainingConfig:
    """One training run of one LaVIT stage; each setting's `help` (field metadata) says what it does, and
    `lavit train --help` shows it. With `mixed_precision` "bf16"/"fp16" the frozen weights are loaded in that dtype
    and the trained ones kept in float32."""

    stage: str = setting(help=f"the stage to train: one of {', '.join(STAGES)}")
    model: str = setting(help="BASE pipeline folder: the components to start from")
    data: str = setting(help="image folder with metadata.jsonl, a saved `datasets` folder or a `datasets` name")
    output: str = setting(help="OUT folder: checkpoints, logs.jsonl, then the trained pipeline folder")
    max_steps: int = setting(100, "optimizer steps")
    learning_rate: float = setting(1e-4, "peak learning rate")
    batch_size: int = setting(4, "examples per batch and process")
    seed: int = setting(0, "seed of the initialisation, the data order and every random draw")
    lora: bool = setting(
        False,
        "peft LoRA adapters on the UNet (pixel decoder) or the language model, saved to OUT in diffusers' LoRA format",
    )
    lora_rank: int = setting(8, "LoRA rank")
    lora_alpha: float | None = setting(None, "LoRA alpha (default: the rank)")
    resume_from_checkpoint: str | None = setting(
        None, "a checkpoint folder to resume from, or 'latest' (the newest in OUT)"
    )
    mixed_precision: str = setting("no", f"one of {', '.join(MIXED_PRECISIONS)}")
    gradient_accumulation_steps: int = setting(1, "batches per optimizer step")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory)")
    checkpointing_steps: int = setting(500, "save a resumable checkpoint every so many steps")
    checkpoints_total_limit: int | None = setting(
        None, "keep at most this many checkpoints (default: all; 0: none, not even the last: no resuming)"
    )
    validation_steps: int | None = setting(
        None,
        "every so many steps (and before the first), the loss on a fixed batch (language model: and a caption) "
        "goes to logs.jsonl, and a grid of the first 4 dataset rows (text-to-image from their texts; visual "
        "tokenizer: their reconstructions) to OUT/validation/step-N.png",
    )
    report_to: str | None = setting(
        None,
        "also send the logged values and validation grids to accelerate's tracker(s): tensorboard, wandb, ... or all",
    )
    validation_inference_steps: int = setting(25, "denoising steps of the validation images")
    logging_steps: int = setting(10, "log the metrics every so many steps")
    lr_scheduler: str = setting("constant_with_warmup", "a diffusers learning-rate schedule name")
    lr_warmup_steps: int = setting(0, "warm-up steps of the schedule")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "gradient clipping norm")
    image_column: str = setting("image", "the dataset column of the images")
    text_column: str = setting("text", "the dataset column of the texts")
    # visual tokenizer
    target_keep_ratio: float = setting(
        1 / 3, "visual tokenizer: share of patches kept that the regulariser aims at (LaVIT: 1/3)"
    )
    keep_ratio_weight: float = setting(2.0, "visual tokenizer: weight of the keep-ratio regulariser")
    commitment_weight: float = setting(0.25, "visual tokenizer: weight of the commitment loss")
    codebook_decay: float = setting(0.99, "visual tokenizer: EMA decay of the codebook")
    kmeans_init: bool = setting(
        True,
        "visual tokenizer: k-means initialisation of the codebook on the first quantised "
        "batch (False keeps the BASE codebook)",
    )
    kmeans_iters: int = setting(10, "visual tokenizer: k-means iterations")
    dead_code_threshold: float = setting(1e-3, "visual tokenizer: EMA usage below which a code is restarted")
    quantize_after_steps: int = setting(0, "visual tokenizer: steps of a first phase without quantisation")
    reconstruction_layers: int = setting(2, "visual tokenizer: depth of the training-only feature decoder")
    gumbel_temperature: float = setting(1.0, "visual tokenizer: temperature of the Gumbel keep/drop sampling")
    # pixel decoder
    train_unet: bool = setting(
        False, "pixel decoder: fine-tune the whole UNet too (with --lora the UNet gets LoRA instead)"
    )
    train_pixel_decoder: bool = setting(
        True, "pixel decoder: train the pixel decoder itself (False: the UNet or its LoRA alone)"
    )
    unet_lora_target_modules: list[str] = setting(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        help="pixel decoder: the UNet's LoRA-adapted modules (attn2.to_k attn2.to_v: the cross-attention keys and "
        "values alone, as Custom Diffusion)",
    )
    condition_dropout: float = setting(0.1, "pixel decoder: share of examples trained without their condition")
    prediction_type: str | None = setting(None, "pixel decoder: epsilon or v_prediction (default: the scheduler's)")
    snr_gamma: float | None = setting(
        None, "pixel decoder: Min-SNR loss weighting with this gamma, as diffusers' scripts (default: plain MSE)"
    )
    init_decoder_input: bool = setting(
        False,
        "pixel decoder: start its input projection as a standardisation of its codebook, for a decoder trained "
        "from scratch (stage 1's l2-normalised codes may all lie close together)",
    )
    use_ema: bool = setting(False, "pixel decoder: keep an EMA of the trained weights and save it")
    ema_decay: float = setting(0.9999, "pixel decoder: EMA decay")
    resolution: int | None = setting(
        None, "pixel decoder: training image size (default: the UNet's sample size x the VAE factor)"
    )
    cache_latents: bool = setting(
        False,
        "pixel decoder: encode every image with the VAE once, before training, and keep the posteriors in "
        "memory ((N, 2 x latent channels, h, w) float32); each step then skips the VAE",
    )
    # language model
    understanding_ratio: float = setting(
        0.5, "language model: share of [IMG] features [/IMG] text examples (the others are text [IMG] codes [/IMG])"
    )
    text_dropout: float = setting(
        0.1,
        "language model: share of generation examples without their text (trains "
        "the bare [IMG] context of the guidance)",
    )
    max_length: int = setting(512, "language model: positions per packed row")
    packing: bool = setting(True, "language model: pack several examples into one row")
    train_visual_embeddings: bool = setting(
        False,
        "language model: under LoRA, also train the embedding and output rows of [IMG], [/IMG] and the visual ids",
    )
    init_understanding_head: bool = setting(
        False,
        "language model: copy the stage-1 predictor/merger into the understanding head first and start its "
        "LLM projection as a standardisation of the data's first merged features (for a model whose "
        "understanding head was never trained)",
    )
    train_understanding_head: bool = setting(
        True, "language model: train the understanding predictor, merger and LLM projection along (False freezes them)"
    )
    lora_target_modules: list[str] = setting(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        help="language model: the LoRA-adapted modules",
    )
    placeholder_token: str | None = setting(
        None,
        "subject fine-tuning (docs/subject.md): a new word, added after the whole vocabulary; its input "
        "embedding trains and is saved to OUT/learned_embeds.safetensors for `load_textual_inversion`",
    )
    initializer_token: str | None = setting(None, "the word(s) whose mean input embedding starts `placeholder_token`'s")
    textual_inversion: bool = setting(
        False,
        "train the new word's embedding alone (the rest of the language model "
        "frozen: prompts without the word are unchanged)",
    )
    class_data: str | None = setting(
        None,
        "pixel decoder, language model: class examples (any `data` form), mixed into the data and marked "
        "(DreamBooth's prior preservation)",
    )
    prior_loss_weight: float = setting(1.0, "the weight of the class examples' tokens in the loss")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """ValueError naming the first setting that is out of range (all checked before anything loads)."""
        from accelerate.utils import LoggerType  # here: `lavit --help` imports this module, not these libraries
        from diffusers.optimization import SchedulerType

        if self.stage not in STAGES:
            raise ValueError(f"`stage` must be one of {STAGES}, got {self.stage!r}.")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"`mixed_precision` must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}.")
        if not os.path.isdir(self.model):
            raise FileNotFoundError(f"`model`: {self.model!r} is not a pipeline folder.")
        for name in POSITIVE + POSITIVE_OR_NONE + NON_NEGATIVE + NON_NEGATIVE_OR_NONE:
            value, lowest = getattr(self, name), 0 if name in NON_NEGATIVE + NON_NEGATIVE_OR_NONE else 1
            optional = name in POSITIVE_OR_NONE + NON_NEGATIVE_OR_NONE
            if value is None and optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                kind = "a non-negative integer" if lowest == 0 else "a positive integer"
                raise ValueError(f"`{name}` must be {kind}{' or None' if optional else ''}, got {value!r}.")
        for name, lowest, inclusive, optional in FLOATS:
            value = getattr(self, name)
            if value is None and optional:
                continue
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < lowest
                or (value == lowest and not inclusive)
            ):
                bound = "non-negative" if inclusive else "positive"
                raise ValueError(
                    f"`{name}` must be a finite {bound} number{' or None' if optional else ''}, got {value!r}."
                )
        trackers = [tracker.value for tracker in LoggerType]
        if self.report_to is not None and self.report_to not in trackers:
            raise ValueError(f"`report_to` must be one of {trackers}, got {self.report_to!r}.")
        for name in ("target_keep_ratio", "condition_dropout", "understanding_ratio", "text_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"`{name}` must lie in [0, 1], got {getattr(self, name)!r}.")
        for name in ("codebook_decay", "ema_decay"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"`{name}` must lie in (0, 1), got {getattr(self, name)!r}.")
        schedulers = [kind.value for kind in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise ValueError(f"`lr_scheduler` must be one of diffusers' {schedulers}, got {self.lr_scheduler!r}.")
        language_model_only = ("placeholder_token", "initializer_token")
        for name in language_model_only:
            if getattr(self, name) is not None and self.stage != "language-model":
                raise ValueError(f"`{name}` is an option of the language-model stage, not of {self.stage!r}.")
        if (self.placeholder_token is None) != (self.initializer_token is None):
            raise ValueError(
                "`placeholder_token` and `initializer_token` go together (the new word and the word(s) "
                "its embedding starts from)."
            )
        if self.placeholder_token is not None and (not self.placeholder_token.strip() or " " in self.placeholder_token):
            raise ValueError(f"`placeholder_token` must be one word, got {self.placeholder_token!r}.")
        if self.textual_inversion and self.placeholder_token is None:
            raise ValueError("`textual_inversion` trains the embedding of `placeholder_token`: pass one.")
        if self.textual_inversion and self.lora:
            raise ValueError(
                "`textual_inversion` trains the new word's embedding alone; `lora` trains adapters: choose one."
            )
        if not self.prior_loss_weight >= 0:
            raise ValueError(f"`prior_loss_weight` must be >= 0, got {self.prior_loss_weight!r}.")
        if self.class_data is not None and self.stage not in LORA_STAGES:
            raise ValueError(
                f"`class_data` is an option of the {' and '.join(LORA_STAGES)} stages, not of {self.stage!r}."
            )
        if self.stage == "pixel-decoder" and not (self.train_pixel_decoder or self.train_unet or self.lora):
            raise ValueError("`train_pixel_decoder` False trains nothing without `train_unet` or `lora`.")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(
                f"`prediction_type` must be None, 'epsilon' or 'v_prediction', got {self.prediction_type!r}."
            )
        if self.lora and self.stage not in LORA_STAGES:
            raise ValueError(f"`lora`: the {self.stage} stage trains no LoRA adapters (only {', '.join(LORA_STAGES)}).")
        for name in ("lora_target_modules", "unet_lora_target_modules"):
            modules = getattr(self, name)
            if not modules or not all(isinstance(m, str) and m for m in modules):
                raise ValueError(f"`{name}` must be a non-empty list of module names, got {modules!r}.")
        if self.resume_from_checkpoint is not None and not (
            isinstance(self.resume_from_checkpoint, str) and self.resume_from_checkpoint
        ):
            raise ValueError(
                f"`resume_from_checkpoint` must be 'latest' or a checkpoint folder, got {self.resume_from_checkpoint!r}."
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
