"""Training and fine-tuning of every LaVIT stage on accelerate, peft and datasets.

    from lavit_pipelines.training import TrainingConfig, train
    out = train(TrainingConfig(stage="visual-tokenizer", model="base", data="images", output="out"))

`out` is a complete pipeline folder (the next stage's `model`); see docs/training.md.
"""

from pathlib import Path

from .config import STAGES, TrainingConfig

__all__ = ["STAGES", "TrainingConfig", "train"]


def stage_class(stage: str):
    """The `Stage` subclass of a stage name (imported on demand)."""
    if stage == "visual-tokenizer":
        from .visual_tokenizer import VisualTokenizerStage

        return VisualTokenizerStage
    if stage == "pixel-decoder":
        from .pixel_decoder import PixelDecoderStage

        return PixelDecoderStage
    if stage == "language-model":
        from .language_model import LanguageModelStage

        return LanguageModelStage
    raise ValueError(f"`stage` must be one of {STAGES}, got {stage!r}.")


def train(config: TrainingConfig) -> Path:
    """Run `config`; returns the output folder (a complete pipeline folder; with `lora=True` it also holds
    the adapter, loadable with `load_lora_weights(output)`)."""
    from .loop import run

    return run(config, stage_class(config.stage))
