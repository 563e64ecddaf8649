"""`TrainingConfig`: every setting of a training run, checked before anything heavy happens."""

import dataclasses
import os
from dataclasses import dataclass, field

STAGES = ("visual-tokenizer", "pixel-decoder", "language-model")
MIXED_PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class TrainingConfig:
    """One training run of one LaVIT stage.

    Shared: `stage` (one of STAGES), `model` (BASE pipeline folder), `data` (image folder with
    metadata.jsonl, a saved `datasets` folder or a `datasets` name), `output` (OUT folder: checkpoints,
    logs.jsonl, then the trained pipeline folder). With `lora=True` the UNet (pixel decoder stage) or the
    language model (language-model stage) gets peft LoRA adapters, saved to OUT in diffusers' LoRA format.

    Visual tokenizer: `target_keep_ratio` (LaVIT: 1/3) and `keep_ratio_weight` of the regulariser,
    `commitment_weight`, `codebook_decay` (EMA), `kmeans_init` (k-means initialisation of the codebook on
    the first quantised batch; False keeps the BASE codebook), `dead_code_threshold` (EMA usage below which
    a code is restarted), `quantize_after_steps` (first phase without quantisation),
    `reconstruction_layers` (depth of the training-only feature decoder), `gumbel_temperature`.

    `validation_steps`: every so many steps (and before the first), the loss on a fixed batch and a sample
    (pixel decoder: an image reconstructed with `validation_inference_steps` denoising steps; language model:
    a caption) go to logs.jsonl and OUT/validation/.

    Pixel decoder: `train_unet` (full UNet fine-tuning; with `lora=True` the UNet gets LoRA instead),
    `condition_dropout`, `prediction_type` (None: the scheduler's), `snr_gamma` (Min-SNR loss weighting with
    this γ, as diffusers' scripts; None: plain MSE), `init_decoder_input` (start the pixel decoder's input
    projection as a standardisation of its codebook, for a decoder trained from scratch: stage 1's
    l2-normalised codes may all lie close together), `use_ema`/`ema_decay`, `resolution`
    (None: the UNet's sample size × the VAE factor), `cache_latents` (encode every image with the VAE once,
    before training, and keep the posteriors in memory: (N, 2·latent channels, h, w) float32; each step then
    skips the VAE).

    Language model: `understanding_ratio` (share of `[IMG] features [/IMG] text` samples; the others are
    `text [IMG] codes [/IMG]`), `text_dropout`, `max_length`, `packing`, `train_visual_embeddings` (also
    train the embedding and output rows of [IMG], [/IMG] and the visual ids under LoRA),
    `init_understanding_head` (copy the stage-1 predictor/merger into the understanding head first and
    start its LLM projection as a standardisation of the data's first merged features, for a model whose
    understanding head was never trained), `train_understanding_head` (train the
    understanding predictor, merger and LLM projection along; False freezes them, e.g. for LoRA on small
    GPUs), `lora_target_modules`.

    With `mixed_precision` "bf16"/"fp16" the frozen weights are loaded in that dtype and the trained ones
    kept in float32.
    """

    stage: str
    model: str
    data: str
    output: str
    max_steps: int = 100
    learning_rate: float = 1e-4
    batch_size: int = 4
    seed: int = 0
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float | None = None
    resume_from_checkpoint: str | None = None
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    validation_steps: int | None = None
    validation_inference_steps: int = 25
    logging_steps: int = 10
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    image_column: str = "image"
    text_column: str = "text"
    # visual tokenizer
    target_keep_ratio: float = 1 / 3
    keep_ratio_weight: float = 2.0
    commitment_weight: float = 0.25
    codebook_decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 10
    dead_code_threshold: float = 1e-3
    quantize_after_steps: int = 0
    reconstruction_layers: int = 2
    gumbel_temperature: float = 1.0
    # pixel decoder
    train_unet: bool = False
    condition_dropout: float = 0.1
    prediction_type: str | None = None
    snr_gamma: float | None = None
    init_decoder_input: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    resolution: int | None = None
    cache_latents: bool = False
    # language model
    understanding_ratio: float = 0.5
    text_dropout: float = 0.1
    max_length: int = 512
    packing: bool = True
    train_visual_embeddings: bool = False
    init_understanding_head: bool = False
    train_understanding_head: bool = True
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """ValueError naming the first setting that is out of range."""
        if self.stage not in STAGES:
            raise ValueError(f"`stage` must be one of {STAGES}, got {self.stage!r}.")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"`mixed_precision` must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}.")
        if not os.path.isdir(self.model):
            raise FileNotFoundError(f"`model`: {self.model!r} is not a pipeline folder.")
        positive = ("max_steps", "batch_size", "lora_rank", "gradient_accumulation_steps", "checkpointing_steps",
                    "logging_steps", "max_length", "reconstruction_layers", "validation_inference_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.validation_steps is not None and self.validation_steps < 1:
            raise ValueError(f"`validation_steps` must be a positive integer or None, got {self.validation_steps!r}.")
        for name in ("target_keep_ratio", "condition_dropout", "understanding_ratio", "text_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"`{name}` must lie in [0, 1], got {getattr(self, name)!r}.")
        for name in ("codebook_decay", "ema_decay"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"`{name}` must lie in (0, 1), got {getattr(self, name)!r}.")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"`snr_gamma` must be positive or None, got {self.snr_gamma!r}.")
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate!r}.")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"`prediction_type` must be None, 'epsilon' or 'v_prediction', got {self.prediction_type!r}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
