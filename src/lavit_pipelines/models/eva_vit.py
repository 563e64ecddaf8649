"""EVA-CLIP ViT-G/14 image encoder, as LaVIT uses it: patch features after the last block, no final norm."""

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

from .attention import SelfAttention, sdpa


class EvaSelfAttention(SelfAttention):
    """Self-attention whose fused `qkv` has no bias; separate `q_bias` and `v_bias` (the key bias is zero)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads, qkv_bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x) + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])


class EvaBlock(nn.Module):
    """Pre-norm ViT block with exact-GELU MLP; LayerNorms in float32."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps=eps)
        self.attn = EvaSelfAttention(dim, num_heads)
        self.norm2 = FP32LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, inner_dim=mlp_dim, activation_fn="gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), sdpa())
        return x + self.mlp(self.norm2(x))


class EvaVisionEncoder(nn.Module):
    """Patch embedding, class token, absolute positions and `num_layers` EVA blocks."""

    def __init__(
        self, image_size: int, patch_size: int, dim: int, num_layers: int, num_heads: int, mlp_dim: int, eps: float
    ):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.layers = nn.ModuleList(EvaBlock(dim, num_heads, mlp_dim, eps) for _ in range(num_layers))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, 3, H, W) -> hidden states (B, 1 + num_patches, dim), class token first."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding
        for layer in self.layers:
            x = layer(x)
        return x
