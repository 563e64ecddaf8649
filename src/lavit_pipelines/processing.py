"""LavitProcessor: the sequences LaVIT's language model reads and writes, in one place (in the spirit of
transformers' `JanusProcessor`).

- an image the model writes: `[IMG] visual ids [/IMG]` (`image_ids`);
- a text-to-image prompt: its text segments and the visual ids of its images in order, then `[IMG]`
  (`prompt_ids`; `images_per_prompt` matches the images to the `<image>` placeholders);
- an image the model reads: `[IMG] features [/IMG]`, then the text (`image_embeds`, `understanding_inputs`).

No BOS anywhere (as the original). Visual ids are codebook indices already offset by
`LavitForCausalLM.codes_to_token_ids`.
"""

import torch
from diffusers.utils import logging
from transformers import PreTrainedTokenizerBase

from .image_processor import LavitImageProcessor

logger = logging.get_logger(__name__)

IMAGE_PLACEHOLDER = "<image>"


def images_per_prompt(prompts: list[str], image) -> list[list]:
    """Group `image` by prompt: one list per prompt, as many images as its `<image>` placeholders."""
    counts = [p.count(IMAGE_PLACEHOLDER) for p in prompts]
    if image is None:
        images = [[] for _ in prompts]
    elif isinstance(image, torch.Tensor):
        images = list(image.split(counts)) if image.ndim == 4 and len(image) == sum(counts) else None
    elif len(prompts) > 1 and isinstance(image, (list, tuple)) and all(isinstance(i, (list, tuple)) for i in image):
        images = [list(i) for i in image]
    else:
        images = [list(image) if isinstance(image, (list, tuple)) else [image]] if len(prompts) == 1 else None
    if images is None or len(images) != len(prompts) or [len(i) for i in images] != counts:
        given = (
            "no image"
            if image is None
            else f"{len(image) if isinstance(image, (list, tuple, torch.Tensor)) else 1} image entries"
        )
        raise ValueError(
            f"The prompts hold {counts} `{IMAGE_PLACEHOLDER}` placeholders but `image` has {given}; pass one image "
            f"per placeholder (a list per prompt when `prompt` is a list)."
        )
    return images


class LavitProcessor:
    """LaVIT's text tokenizer, its `LavitImageProcessor` and the LaVIT ids of a language-model config
    (`LavitConfig`: `image_start_token_id`, `image_end_token_id`, `max_position_embeddings`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: LavitImageProcessor, config):
        self.tokenizer, self.image_processor, self.config = tokenizer, image_processor, config

    @property
    def pad_token_id(self) -> int:
        """The id whose embedding pads a batch (the original pads with eos, id 2)."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def text_ids(self, text: str) -> list[int]:
        """`text` -> token ids, no BOS."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def image_ids(self, visual_ids: torch.Tensor) -> list[int]:
        """(n,) visual ids -> `[IMG] visual ids [/IMG]`."""
        return [self.config.image_start_token_id, *visual_ids.tolist(), self.config.image_end_token_id]

    def prompt_ids(self, prompt: str, images_visual_ids: list[torch.Tensor], max_new_tokens: int) -> list[int]:
        """A prompt with `<image>` placeholders -> its ids: each text segment stripped and tokenised on its own, each
        image as its visual ids (no `[IMG]`/`[/IMG]`), in order; kept to what fits the context beside
        `max_new_tokens` new tokens; then `[IMG]`."""
        images = iter(images_visual_ids)
        ids = []
        for i, segment in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
            if i > 0:
                ids += next(images).tolist()
            if segment.strip():
                ids += self.text_ids(segment.strip())
        limit = self.config.max_position_embeddings - max_new_tokens - 1
        if len(ids) > limit:
            logger.warning(
                f"The prompt has {len(ids)} tokens; only the first {limit} fit the language model's context."
            )
        return ids[:limit] + [self.config.image_start_token_id]

    def image_embeds(self, features: torch.Tensor, embeddings: torch.nn.Embedding) -> torch.Tensor:
        """(n, D) features -> `[emb([IMG])] features [emb([/IMG])]` (n + 2, D), on the embeddings' device and dtype."""
        weight = embeddings.weight
        markers = embeddings(
            torch.tensor([self.config.image_start_token_id, self.config.image_end_token_id], device=weight.device)
        )
        return torch.cat([markers[:1], features.to(weight.device, weight.dtype), markers[1:]])

    def understanding_inputs(
        self,
        features: list[torch.Tensor],
        prompts: list[str] | None,
        embeddings: torch.nn.Embedding,
        pad_prompt_before_image: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image (n_i, D) features (+ one prompt per image) -> the LLM input (B, L, D) and attention mask (B, L).

        Each row is `image_embeds`, left-padded with the pad (eos) embedding and mask 0, followed by the prompt
        embeddings (no BOS), left-padded by the tokenizer. A padded prompt's pads stay between image and text (the
        original's `generate`), or move before the image with `pad_prompt_before_image=True` (the original's
        `predict_answers`).
        """
        device = embeddings.weight.device
        rows = [self.image_embeds(f, embeddings) for f in features]
        pad = embeddings(torch.tensor([self.pad_token_id], device=device))[0]
        length = max(len(row) for row in rows)
        embeds = pad.expand(len(rows), length, -1).clone()
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            embeds[i, length - len(row) :] = row
            mask[i, length - len(row) :] = 1
        if not prompts:
            return embeds, mask

        text = self.tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        prompt_embeds, prompt_mask = embeddings(text.input_ids.to(device)), text.attention_mask.to(device)
        if not pad_prompt_before_image:
            return torch.cat([embeds, prompt_embeds], dim=1), torch.cat([mask, prompt_mask], dim=1)
        moved_embeds, moved_mask = [], []
        for image_embeds, image_mask, text_embeds, text_mask in zip(embeds, mask, prompt_embeds, prompt_mask):
            pads = int((text_mask == 0).sum())
            moved_embeds.append(torch.cat([text_embeds[:pads], image_embeds, text_embeds[pads:]]))
            moved_mask.append(torch.cat([text_mask[:pads], image_mask, text_mask[pads:]]))
        return torch.stack(moved_embeds), torch.stack(moved_mask)
