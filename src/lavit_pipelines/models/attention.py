"""Attention building blocks shared by LaVIT's vision transformers.

Every LaVIT attention has head width 88; modules take the head count explicitly. The attention
function is passed in by the caller so that one block serves both the token merger (LaVIT's masked
softmax) and the pixel decoder (plain softmax through SDPA).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(attn_mask: torch.Tensor | None = None) -> AttentionFn:
    """Scaled dot-product attention with an optional additive or boolean `attn_mask`."""
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def masked_softmax_attention(mask: torch.Tensor, eps: float = 1e-6) -> AttentionFn:
    """LaVIT's policy attention, kept exact: with s the scaled scores and m the 0/1 `mask`
    (broadcastable to (B, H, Nq, Nk)), `e = exp(s - rowmax(s)) * m`, `w = (e + eps/Nk) / (sum(e) + eps)`,
    computed in float32. A row whose mask is all zero averages the values uniformly."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
        weights = (scores - scores.amax(dim=-1, keepdim=True)).exp() * mask
        weights = (weights + eps / k.shape[-2]) / (weights.sum(dim=-1, keepdim=True) + eps)
        return (weights @ v.float()).to(v.dtype)

    return attend


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    return x.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused `qkv` projection and an output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, 3C)."""
        return self.qkv(x)

    def forward(self, x: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        q, k, v = (split_heads(t, self.num_heads) for t in self.project_qkv(x).chunk(3, dim=-1))
        return self.out_proj(merge_heads(attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head attention from `x` to `context` with separate q/k/v projections."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        """x: (B, Nq, C), context: (B, Nk, C) -> (B, Nq, C)."""
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(context), self.num_heads)
        v = split_heads(self.v_proj(context), self.num_heads)
        return self.out_proj(merge_heads(attention(q, k, v)))


class SelfCrossBlock(nn.Module):
    """Pre-norm block: `x += self(norm1(x)); x += cross(norm2(x), context); x += mlp(norm3(x))`.

    Used by the token merger (context: layer-normed encoder features) and by the pixel decoder
    (context: embedded visual codes). LayerNorms run in float32.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps=eps)
        self.self_attn = SelfAttention(dim, num_heads)
        self.norm2 = FP32LayerNorm(dim, eps=eps)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm3 = FP32LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, inner_dim=mlp_dim, activation_fn="gelu")

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, self_attention: AttentionFn, cross_attention: AttentionFn
    ) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), self_attention)
        x = x + self.cross_attn(self.norm2(x), context, cross_attention)
        return x + self.mlp(self.norm3(x))
