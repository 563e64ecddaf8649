"""LaVIT's language model: LLaMA with a vocabulary extended by [IMG], [/IMG] and the visual codebook.

The released language model is a plain ``LlamaForCausalLM`` whose vocabulary (48386) is the 32000
text pieces, ``[IMG]`` (32000), ``[/IMG]`` (32001) and one id per visual code (32002 ... 48385).
``LavitForCausalLM`` keeps the LLaMA body and state-dict keys unchanged, so the release's shards
load as they are. Its config is a stock LLaMA config (``model_type: "llama"``, architecture
``LlamaForCausalLM``) that carries the LaVIT ids as extra fields: a saved ``language_model/`` folder loads
with ``AutoModelForCausalLM.from_pretrained`` without this package, and with LLaMA tooling.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,  # noqa: F401  (diffusers resolves loader base classes in this module's namespace)
)

from . import visual_sampling

__all__ = ["LavitConfig", "LavitForCausalLM", "PreTrainedModel"]


@strict
class LavitConfig(LlamaConfig):
    r"""Configuration of [`LavitForCausalLM`]: a [`~transformers.LlamaConfig`] plus LaVIT's token ids.

    The defaults describe LaVIT-7B (LLaMA-2-7B with a 48386-entry vocabulary). Saved, it is a LLaMA config
    (`model_type` "llama", architecture `LlamaForCausalLM`) whose extra fields stock transformers keeps.
    Folders converted before, with `model_type` "lavit", still load with [`LavitForCausalLM`].

    Attributes:
        image_start_token_id (`int`, defaults to 32000): id of ``[IMG]``, which opens an image.
        image_end_token_id (`int`, defaults to 32001): id of ``[/IMG]``, which closes an image.
        visual_token_offset (`int`, defaults to 32002): id of visual code 0; code ``c`` is token
            ``visual_token_offset + c``.
        visual_vocab_size (`int`, defaults to 16384): number of visual codes.
    """

    model_type = "llama"

    vocab_size: int = 48386
    rms_norm_eps: float = 1e-5
    image_start_token_id: int = 32000
    image_end_token_id: int = 32001
    visual_token_offset: int = 32002
    visual_vocab_size: int = 16384

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # "llama", or "lavit" in folders converted before
        super().__post_init__(**kwargs)

    @staticmethod
    def id_layout(text_vocab_size: int, visual_vocab_size: int) -> dict:
        """LaVIT's ids after a text vocabulary of `text_vocab_size` ids: `[IMG]`, `[/IMG]`, then one id per visual
        code (the release: 32000 text ids, 16384 codes), with the `vocab_size` they add up to."""
        return dict(
            vocab_size=text_vocab_size + 2 + visual_vocab_size,
            image_start_token_id=text_vocab_size,
            image_end_token_id=text_vocab_size + 1,
            visual_token_offset=text_vocab_size + 2,
            visual_vocab_size=visual_vocab_size,
        )

    def to_dict(self) -> dict:
        """LLaMA's config dict: the weights are a stock `LlamaForCausalLM`'s, whichever class saves them."""
        return {**super().to_dict(), "architectures": ["LlamaForCausalLM"]}

    def validate_visual_vocabulary(self):
        """Part of `@strict` validation: the LaVIT ids must lie inside the vocabulary."""
        if self.visual_vocab_size <= 0:
            raise ValueError(f"visual_vocab_size must be positive, got {self.visual_vocab_size}.")
        if self.visual_token_offset < 0 or self.visual_token_offset + self.visual_vocab_size > self.vocab_size:
            raise ValueError(
                f"The visual ids [{self.visual_token_offset}, {self.visual_token_offset + self.visual_vocab_size}) "
                f"do not fit in the vocabulary of size {self.vocab_size}."
            )
        for name in ("image_start_token_id", "image_end_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary of size {self.vocab_size}.")
            if self.visual_token_offset <= value < self.visual_token_offset + self.visual_vocab_size:
                raise ValueError(f"{name}={value} falls inside the visual id range.")

    @property
    def visual_token_id_range(self) -> range:
        """The token ids of the visual codes: ``range(visual_token_offset, visual_token_offset + visual_vocab_size)``."""
        return range(self.visual_token_offset, self.visual_token_offset + self.visual_vocab_size)

    @property
    def text_vocab_size(self) -> int:
        """Number of ids before the first LaVIT-specific id (32000 for the release: the text pieces)."""
        return min(self.image_start_token_id, self.image_end_token_id, self.visual_token_offset)


class LavitForCausalLM(LlamaForCausalLM):
    """LLaMA causal LM with LaVIT's extended vocabulary; state-dict keys are those of ``LlamaForCausalLM``."""

    config_class = LavitConfig

    @property
    def lavit_token_id_range(self) -> range:
        """Every LaVIT-specific id: [IMG], [/IMG] and the visual codes (32000 ... 48385 for the release).

        This is the range that image understanding suppresses during text generation.
        """
        config = self.config
        start = min(config.image_start_token_id, config.image_end_token_id, config.visual_token_offset)
        stop = max(
            config.image_start_token_id + 1,
            config.image_end_token_id + 1,
            config.visual_token_offset + config.visual_vocab_size,
        )
        return range(start, stop)

    @property
    def added_token_id_range(self) -> range:
        """Ids added after every LaVIT id (new words, e.g. a subject's placeholder token; empty for the release).

        Text-to-image sampling suppresses them after `[IMG]`, with the text ids.
        """
        return range(self.lavit_token_id_range.stop, self.config.vocab_size)

    def is_visual_token(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the entries of ``token_ids`` that are visual-code ids."""
        offset = self.config.visual_token_offset
        return (token_ids >= offset) & (token_ids < offset + self.config.visual_vocab_size)

    def codes_to_token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Visual codebook indices (0 ... visual_vocab_size - 1) → LLM token ids."""
        return codes + self.config.visual_token_offset

    def token_ids_to_codes(self, token_ids: torch.Tensor) -> torch.Tensor:
        """LLM token ids → visual codebook indices, keeping only the visual ids (order preserved, 1-D result)."""
        return token_ids[self.is_visual_token(token_ids)] - self.config.visual_token_offset

    @torch.no_grad()
    def sample_visual_tokens(self, prompts: list[torch.Tensor], *, pad_token_id: int, **sampling) -> torch.Tensor:
        """Sample the visual tokens of one image after each prompt (1-D ids ending with ``[IMG]``), as LaVIT does:
        guidance against the bare ``[IMG]`` context, text ids 3 ... 31999 suppressed (and any word added after the
        visual ids, `added_token_id_range`), until ``[/IMG]``.

        `sampling`: the settings of `visual_sampling.sample_visual_tokens` (`guidance_scale`, `min_new_tokens`,
        `max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `generator`, and optionally
        `progress_bar`, `cache_implementation`, `compile`, `stop_check_interval`); its static cache and compiled
        step live on this model. Returns (B, T) generated ids (``[/IMG]`` included), rows that finished early padded
        with ``pad_token_id``; ``token_ids_to_codes`` turns a row into codebook indices.
        """
        config = self.config
        return visual_sampling.sample_visual_tokens(
            self,
            prompts,
            unconditional_prompt=[config.image_start_token_id],
            suppress_ids=[*range(3, config.text_vocab_size), *self.added_token_id_range],
            eos_token_id=config.image_end_token_id,
            pad_token_id=pad_token_id,
            **sampling,
        )
