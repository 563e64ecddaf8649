"""Output dataclasses of the LaVIT pipelines."""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


@dataclass
class LavitText2ImagePipelineOutput(BaseOutput):
    """images: PIL images, a (B, H, W, 3) array, a (B, 3, H, W) tensor or latents, per `output_type`.
    visual_token_ids: per image, the codebook indices it was decoded from.
    nsfw_content_detected: per image, the safety checker's verdict (None without a safety checker)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    visual_token_ids: list[torch.Tensor]
    nsfw_content_detected: list[bool] | None = None


@dataclass
class LavitUnderstandingPipelineOutput(BaseOutput):
    """text: one decoded answer or caption per image (per returned sequence).
    sequences: (B, T) generated token ids only, padded with the pad id."""

    text: list[str]
    sequences: torch.Tensor
