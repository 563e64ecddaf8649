"""LaVIT's tokenizer decoder: visual codes -> UNet conditioning (SDXL for high-res, SD-1.5 for low-res)."""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.utils import BaseOutput
from torch import nn

from .attention import SelfCrossBlock, merge_heads, sdpa, split_heads

VARIANTS = ("highres", "lowres")


@dataclass
class LavitPixelDecoderOutput(BaseOutput):
    """UNet conditioning for a batch of B token sequences (Q query tokens, D = sum of prompt dims).

    prompt_embeds / negative_prompt_embeds: (B, Q, D). pooled_prompt_embeds / negative_pooled_prompt_embeds:
    (B, pooled_dim) for the high-res decoder, None for the low-res one. prompt_attention_mask /
    negative_prompt_attention_mask: (B, Q) bool for the low-res decoder, None for the high-res one.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None  # defaults: accelerate rebuilds outputs as `cls(dict)`
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    prompt_attention_mask: torch.Tensor | None = None
    negative_prompt_attention_mask: torch.Tensor | None = None


def check_visual_token_ids(visual_token_ids, codebook_size: int, max_length: int, name: str = "visual_token_ids"):
    """Raise a ValueError/TypeError naming `name` unless it is a non-empty list of 1-D integer tensors (or
    int lists) with 1..max_length codes each, all in [0, codebook_size)."""
    if isinstance(visual_token_ids, torch.Tensor) and visual_token_ids.ndim == 2:
        visual_token_ids = list(visual_token_ids)
    if not isinstance(visual_token_ids, (list, tuple)) or len(visual_token_ids) == 0:
        raise TypeError(f"`{name}` must be a non-empty list of 1-D LongTensors of codebook indices.")
    for i, ids in enumerate(visual_token_ids):
        ids = torch.as_tensor(ids)
        if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"`{name}[{i}]` must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}.")
        ids = ids.long()  # comparisons in a narrow dtype (uint8 against the codebook size) would wrap
        if not 1 <= len(ids) <= max_length:
            raise ValueError(f"`{name}[{i}]` must hold 1 to {max_length} codes, got {len(ids)}.")
        if ids.min() < 0 or ids.max() >= codebook_size:
            raise ValueError(
                f"`{name}[{i}]` must hold codebook indices in [0, {codebook_size}), got values in "
                f"[{int(ids.min())}, {int(ids.max())}]."
            )


class AttentionPooler(nn.Module):
    """Multi-head attention pooling: the mean token, prepended to the sequence, attends to all of it."""

    def __init__(self, num_positions: int, dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.position_embedding = nn.Parameter(torch.zeros(num_positions + 1, dim))
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) -> pooled (B, output_dim)."""
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.position_embedding.to(x.dtype)
        q = split_heads(self.q_proj(x[:, :1]), self.num_heads)
        k = split_heads(self.k_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)
        return self.out_proj(merge_heads(sdpa()(q, k, v)))[:, 0]


class LavitPixelDecoder(ModelMixin, ConfigMixin):
    """Visual codes -> UNet conditioning through learned queries that cross-attend to the codes.

    `variant="highres"`: two projections concatenated to SDXL `prompt_embeds` plus an attention-pooled
    `pooled_prompt_embeds`; negatives are zeros. `variant="lowres"`: one projection for SD-1.5, with the
    learned `negative_condition` placed at the start of zeros and attention masks. The decoder owns a copy
    of the codebook, so text-to-image needs no visual tokenizer.
    """

    _no_split_modules = ["SelfCrossBlock"]
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        variant: str = "highres",
        codebook_size: int = 16384,
        codebook_dim: int = 32,
        hidden_size: int = 1408,
        num_layers: int = 12,
        mlp_dim: int = 6144,
        attention_head_dim: int = 88,
        num_queries: int = 256,
        output_dim: int = 1408,
        prompt_embed_dims: tuple[int, ...] = (768, 1280),
        pooled_embed_dim: int | None = 1280,
        negative_condition_length: int | None = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
        heads = hidden_size // attention_head_dim
        self.codebook = nn.Embedding(codebook_size, codebook_dim)
        self.input_proj = nn.Linear(codebook_dim, hidden_size)
        self.code_position_embedding = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        self.query_embedding = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        self.blocks = nn.ModuleList(SelfCrossBlock(hidden_size, heads, mlp_dim, norm_eps) for _ in range(num_layers))
        self.output_norm = FP32LayerNorm(hidden_size, eps=norm_eps)
        self.output_proj = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, output_dim)
        )
        self.prompt_projections = nn.ModuleList(nn.Linear(output_dim, dim) for dim in prompt_embed_dims)
        if variant == "highres":
            self.pooler = AttentionPooler(num_queries, output_dim, heads, pooled_embed_dim)
        else:
            self.negative_condition = nn.Parameter(torch.zeros(negative_condition_length, sum(prompt_embed_dims)))
        self.gradient_checkpointing = False

    def embed_codes(self, visual_token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image codes -> zero-padded code embeddings with positions (B, L, C) and mask (B, L) bool."""
        lengths = torch.tensor([len(ids) for ids in visual_token_ids], device=self.device)
        mask = torch.arange(int(lengths.max()), device=self.device) < lengths[:, None]
        codes = torch.zeros(mask.shape, dtype=torch.long, device=self.device)
        codes[mask] = torch.cat([torch.as_tensor(ids).to(self.device) for ids in visual_token_ids])
        x = self.input_proj(self.codebook(codes).to(self.dtype)) * mask[..., None]
        return x + self.code_position_embedding[:, : mask.shape[1]], mask

    def forward(self, visual_token_ids: list[torch.Tensor]) -> LavitPixelDecoderOutput:
        """visual_token_ids: per-image LongTensors of codebook indices (or a (B, L) tensor) -> conditioning."""
        check_visual_token_ids(visual_token_ids, self.config.codebook_size, self.config.num_queries)
        codes, mask = self.embed_codes(list(visual_token_ids))
        additive_mask = (1.0 - mask[:, None, None, :].to(codes.dtype)) * -10000.0
        x = self.query_embedding.expand(len(mask), -1, -1)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, codes, sdpa(), sdpa(additive_mask))
            else:
                x = block(x, codes, sdpa(), sdpa(additive_mask))
        decoded = self.output_proj(self.output_norm(x))
        prompt_embeds = torch.cat([proj(decoded) for proj in self.prompt_projections], dim=-1)
        if self.config.variant == "highres":
            pooled = self.pooler(decoded)
            return LavitPixelDecoderOutput(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=torch.zeros_like(prompt_embeds),
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=torch.zeros_like(pooled),
            )
        return self._lowres_output(prompt_embeds)

    def _lowres_output(self, prompt_embeds: torch.Tensor) -> LavitPixelDecoderOutput:
        """Adds the learned negative condition (at the start of zeros) and both attention masks."""
        batch, length, _ = prompt_embeds.shape
        n = self.negative_condition.shape[0]
        negative = torch.zeros_like(prompt_embeds)
        negative[:, :n] = self.negative_condition.to(prompt_embeds.dtype)
        negative_mask = torch.zeros(batch, length, dtype=torch.bool, device=prompt_embeds.device)
        negative_mask[:, :n] = True
        return LavitPixelDecoderOutput(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative,
            prompt_attention_mask=torch.ones_like(negative_mask),
            negative_prompt_attention_mask=negative_mask,
        )
