"""LaVIT's dynamic visual tokenizer: EVA encoder -> token predictor -> token merger -> codes or LLM features."""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .attention import SelfCrossBlock, masked_softmax_attention
from .eva_vit import EvaVisionEncoder


class TokenPredictor(nn.Module):
    """Scores each patch for keeping: local half of the channels plus the mean-pooled other half."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps=eps)
        self.input_proj = nn.Linear(dim, dim)
        self.score_mlp = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, N, C) -> log-probabilities of (keep, drop): (B, N, 2), float32."""
        x = F.gelu(self.input_proj(self.norm(features.to(self.input_proj.weight.dtype))))
        local, pooled = x.chunk(2, dim=-1)
        x = torch.cat([local, pooled.mean(dim=1, keepdim=True).expand_as(pooled)], dim=-1)
        return self.score_mlp(x).float().log_softmax(dim=-1)


class TokenMerger(nn.Module):
    """Kept patches attend causally to earlier kept patches (self) and to every dropped patch (cross)."""

    def __init__(self, dim: int, num_layers: int, num_heads: int, mlp_dim: int, eps: float = 1e-5):
        super().__init__()
        self.input_norm = FP32LayerNorm(dim, eps=eps)
        self.blocks = nn.ModuleList(SelfCrossBlock(dim, num_heads, mlp_dim, eps) for _ in range(num_layers))
        self.output_norm = FP32LayerNorm(dim, eps=eps)
        self.gradient_checkpointing = False

    def forward(self, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """features: (B, N, C), keep: (B, N) bool, or 0/1 floats carrying gradients (training) -> merged (B, N, C)."""
        n = features.shape[1]
        keep = keep[:, None, None, :].float()
        eye = torch.eye(n, device=keep.device)
        causal = torch.ones(n, n, device=keep.device).tril()
        self_attention = masked_softmax_attention(torch.maximum(keep, eye) * causal)
        cross_attention = masked_softmax_attention(1 - keep)
        context = self.input_norm(features)
        x = features
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, context, self_attention, cross_attention)
            else:
                x = block(x, context, self_attention, cross_attention)
        return self.output_norm(x)


class NearestCodebook(nn.Module):
    """The codebook (N, D); its forward maps l2-normalised vectors to the index of the nearest code."""

    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_codes, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (n, D) -> (n,) argmin of the squared L2 distance, computed as |z|² + |e|² - 2 z·e in float32."""
        z, codebook = z.float(), self.weight.float()
        distances = z.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * z @ codebook.T
        return distances.argmin(dim=1)


def gumbel_noise(logprobs: torch.Tensor, generator=None) -> torch.Tensor:
    """Gumbel noise shaped like logprobs (B, N, 2): `-log` of one `exponential_()` draw (what
    `F.gumbel_softmax` draws), from `generator` (one, or a list with one per image) or the global RNG."""
    generators = generator if isinstance(generator, list) else [generator]
    rows = [logprobs] if len(generators) == 1 else logprobs.split(1)
    draws = []
    for rows_i, gen in zip(rows, generators, strict=True):
        device = gen.device if gen is not None else rows_i.device
        draws.append(torch.empty(rows_i.shape, dtype=rows_i.dtype, device=device).exponential_(generator=gen))
    return -torch.cat(draws).to(logprobs.device).log()


def sample_keep_mask(logprobs: torch.Tensor, generator=None) -> torch.Tensor:
    """Gumbel-max over (keep, drop): logprobs (B, N, 2) -> keep (B, N) bool. An image whose draw keeps no
    patch keeps its likeliest one: an image is never zero tokens (which no decoder or LLM prompt can take)."""
    keep = (logprobs + gumbel_noise(logprobs, generator)).argmax(dim=-1) == 0
    empty = ~keep.any(dim=1)
    if empty.any():
        keep[empty, logprobs[empty, :, 0].argmax(dim=1)] = True
    return keep


def split_per_image(rows: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
    """Rows of all kept patches (sum(keep), ...) -> per-image list, using keep (B, N) for the counts."""
    return list(rows.split(keep.sum(dim=1).tolist()))


class LavitVisualTokenizer(ModelMixin, ConfigMixin):
    """Images to LaVIT visual tokens.

    Stage 1 (`token_predictor`, `token_merger`, `quantizer_proj`, `codebook`) gives discrete codes for
    generation; stage 2 (`understanding_predictor`, `understanding_merger`, `llm_projection`) gives the
    continuous LLM-space features used for understanding. Both share the EVA `encoder`.
    """

    _keep_in_fp32_modules = ["token_predictor", "understanding_predictor"]
    _supports_gradient_checkpointing = True
    _no_split_modules = ["EvaBlock", "SelfCrossBlock"]

    @register_to_config
    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 14,
        hidden_size: int = 1408,
        encoder_layers: int = 40,
        encoder_mlp_dim: int = 6144,
        merger_layers: int = 12,
        merger_mlp_dim: int = 6144,
        attention_head_dim: int = 88,
        codebook_size: int = 16384,
        codebook_dim: int = 32,
        llm_hidden_size: int = 4096,
        encoder_norm_eps: float = 1e-6,
        norm_eps: float = 1e-5,
        image_mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN),
        image_std: tuple[float, ...] = tuple(OPENAI_CLIP_STD),
    ):
        super().__init__()
        heads = hidden_size // attention_head_dim
        self.encoder = EvaVisionEncoder(
            image_size, patch_size, hidden_size, encoder_layers, heads, encoder_mlp_dim, encoder_norm_eps
        )
        self.token_predictor = TokenPredictor(hidden_size, norm_eps)
        self.token_merger = TokenMerger(hidden_size, merger_layers, heads, merger_mlp_dim, norm_eps)
        self.quantizer_proj = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, codebook_dim)
        )
        self.codebook = NearestCodebook(codebook_size, codebook_dim)
        self.understanding_predictor = TokenPredictor(hidden_size, norm_eps)
        self.understanding_merger = TokenMerger(hidden_size, merger_layers, heads, merger_mlp_dim, norm_eps)
        self.llm_projection = nn.Linear(hidden_size, llm_hidden_size)

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> EVA patch features (B, num_patches, C), class token dropped."""
        return self.encoder(pixel_values)[:, 1:]

    def merge_kept(
        self, pixel_values: torch.Tensor, predictor: TokenPredictor, merger: TokenMerger, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> merged features of all kept patches (sum(keep), C), in patch order, and keep (B, N)."""
        features = self.patch_features(pixel_values)
        keep = sample_keep_mask(predictor(features), generator)
        return merger(features, keep)[keep], keep

    def quantize(self, features: torch.Tensor) -> torch.Tensor:
        """Merged features (n, C) -> nearest codebook indices (n,) after the task layer and l2-norm."""
        return self.codebook(F.normalize(self.quantizer_proj(features), dim=-1))

    @apply_forward_hook
    def tokenize(self, pixel_values: torch.Tensor, generator=None) -> list[torch.Tensor]:
        """(B, 3, H, W) -> per-image LongTensor of codebook indices in 0..codebook_size-1 (kept-patch order)."""
        merged, keep = self.merge_kept(pixel_values, self.token_predictor, self.token_merger, generator)
        return split_per_image(self.quantize(merged), keep)

    @apply_forward_hook
    def encode_features(self, pixel_values: torch.Tensor, generator=None) -> list[torch.Tensor]:
        """(B, 3, H, W) -> per-image LLM-space features (n_i, llm_hidden_size) of the kept patches."""
        merged, keep = self.merge_kept(pixel_values, self.understanding_predictor, self.understanding_merger, generator)
        return split_per_image(self.llm_projection(merged), keep)

    def forward(self, pixel_values: torch.Tensor, generator=None) -> list[torch.Tensor]:
        """Same as `tokenize`."""
        return self.tokenize(pixel_values, generator=generator)
