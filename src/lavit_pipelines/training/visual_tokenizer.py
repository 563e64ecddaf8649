"""Stage 1: train the visual tokenizer's token predictor, token merger, quantiser and codebook.

The EVA encoder is frozen. Per image: patch features -> keep/drop log-probabilities -> a Gumbel straight-
through keep mask (hard in the forward pass, soft gradients) -> the merger (whose attention masks carry the
gradient to the predictor) -> l2-normalised codes vectors z -> nearest codebook vectors q (straight-through)
-> a training-only decoder reconstructs all patch features from the kept tokens. Loss: cosine
reconstruction + `keep_ratio_weight`·(mean keep probability − target)² + `commitment_weight`·|z − sg(q)|².
The codebook follows the EMA of its assigned vectors (see `codebook.py`), initialised by k-means.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..image_processor import LavitImageProcessor
from ..models.attention import SelfCrossBlock, masked_softmax_attention, sdpa
from ..models.visual_tokenizer import gumbel_noise
from .codebook import CodebookEMA
from .loop import Stage

STAGE1_MODULES = ("token_predictor", "token_merger", "quantizer_proj")


def straight_through_keep(logprobs: torch.Tensor, generators, temperature: float = 1.0) -> torch.Tensor:
    """logprobs (B, N, 2) -> keep (B, N) float: the hard Gumbel-max decision of `sample_keep_mask` in the
    forward pass, the gradient of the Gumbel softmax in the backward pass."""
    soft = ((logprobs + gumbel_noise(logprobs, generators)) / temperature).softmax(dim=-1)[..., 0]
    hard = (soft > 0.5).float()
    return hard + soft - soft.detach()


class FeatureReconstructionDecoder(nn.Module):
    """Training-only head: one learned query per patch attends (self) to the other queries and (cross) to
    the kept tokens, and predicts that patch's encoder feature. A kept token's position is its rank among the
    kept tokens, which is all that the pixel decoder knows of it: where a token lies in the image must be in
    its code."""

    def __init__(
        self,
        num_patches: int,
        token_dim: int,
        hidden_size: int,
        target_dim: int,
        num_layers: int,
        num_heads: int,
        mlp_dim: int,
    ):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, hidden_size)
        self.token_positions = nn.Parameter(torch.randn(1, num_patches, hidden_size) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, num_patches, hidden_size) * 0.02)
        self.blocks = nn.ModuleList(SelfCrossBlock(hidden_size, num_heads, mlp_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)
        self.output_proj = nn.Linear(hidden_size, target_dim)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, token_dim), keep: (B, N) 0/1 (with gradients) -> predicted features (B, N, target_dim)."""
        ranks = ((keep.detach() > 0.5).long().cumsum(dim=1) - 1).clamp(min=0)
        context = self.input_proj(tokens.to(self.input_proj.weight.dtype)) + self.token_positions[0, ranks]
        x = self.queries.expand(len(tokens), -1, -1)
        cross = masked_softmax_attention(keep[:, None, None, :])
        for block in self.blocks:
            x = block(x, context, sdpa(), cross)
        return self.output_proj(self.norm(x))


class VisualTokenizerTrainingModule(nn.Module):
    """The visual tokenizer (EVA and understanding head frozen), the reconstruction decoder and the codebook state."""

    def __init__(self, visual_tokenizer, config, accelerator):
        super().__init__()
        self.visual_tokenizer, self.config, self.accelerator = visual_tokenizer, config, accelerator
        visual_tokenizer.requires_grad_(False)
        for name in STAGE1_MODULES:
            getattr(visual_tokenizer, name).requires_grad_(True)
        c = visual_tokenizer.config
        self.decoder = FeatureReconstructionDecoder(
            (c.image_size // c.patch_size) ** 2,
            c.codebook_dim,
            c.hidden_size,
            c.hidden_size,
            config.reconstruction_layers,
            c.hidden_size // c.attention_head_dim,
            c.merger_mlp_dim,
        )
        self.codebook_ema = CodebookEMA(c.codebook_size, config.codebook_decay, config.dead_code_threshold)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(n_p, D) on each process -> (sum n_p, D), the same on every process, in process order."""
        counts = self.accelerator.gather(torch.tensor([len(x)], device=x.device)).tolist()
        rows = self.accelerator.gather(self.accelerator.pad_across_processes(x, dim=0))
        return torch.cat([chunk[:n] for chunk, n in zip(rows.split(max(counts)), counts)])

    def quantize(self, z: torch.Tensor, kept: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """z (B, N, D) -> straight-through codebook vectors (B, N, D) and the commitment loss and usage metrics."""
        codebook = self.visual_tokenizer.codebook.weight
        seed = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        if self.training and not bool(self.codebook_ema.initialized):
            vectors = self.gather_rows(z[kept].detach())
            if self.config.kmeans_init and len(vectors):
                self.codebook_ema.initialize(codebook.data, vectors, self.config.kmeans_iters, seed)
            self.codebook_ema.initialized.fill_(True)
        codes = self.visual_tokenizer.codebook(z.flatten(0, 1)).view(kept.shape)
        q = codebook[codes].float()
        commitment = ((z - q).pow(2).sum(dim=-1) * kept).sum() / kept.sum().clamp(min=1)
        metrics = {"commitment_loss": commitment}
        if self.training:
            reduce_sum = lambda t: self.accelerator.reduce(t, "sum")  # noqa: E731
            metrics.update(self.codebook_ema.update(codebook.data, z[kept].detach(), codes[kept], reduce_sum))
            if self.config.dead_code_threshold > 0:
                self.codebook_ema.restart_dead_codes(codebook.data, self.gather_rows(z[kept].detach()), seed)
        return z + (q - z).detach(), metrics

    def forward(self, batch: dict, generators: list, step: int) -> dict:
        visual_tokenizer, config = self.visual_tokenizer, self.config
        with torch.no_grad():
            features = visual_tokenizer.patch_features(batch["pixel_values"])
        logprobs = visual_tokenizer.token_predictor(features)
        keep = straight_through_keep(logprobs, generators, config.gumbel_temperature)
        z = F.normalize(visual_tokenizer.quantizer_proj(visual_tokenizer.token_merger(features, keep)).float(), dim=-1)
        kept = keep.detach() > 0.5
        metrics = {}
        if step >= config.quantize_after_steps:
            z, metrics = self.quantize(z, kept, step)
        reconstruction = self.decoder(z, keep)
        reconstruction_loss = (1 - F.cosine_similarity(reconstruction.float(), features.float(), dim=-1)).mean()
        keep_ratio_loss = (logprobs[..., 0].exp().mean(dim=1) - config.target_keep_ratio).pow(2).mean()
        loss = reconstruction_loss + config.keep_ratio_weight * keep_ratio_loss
        if "commitment_loss" in metrics:
            loss = loss + config.commitment_weight * metrics["commitment_loss"]
        return {
            "loss": loss,
            "reconstruction_loss": reconstruction_loss,
            "keep_ratio_loss": keep_ratio_loss,
            "keep_ratio": kept.float().mean(),
            **metrics,
        }


class VisualTokenizerStage(Stage):
    needed_components = ("visual_tokenizer", "pixel_decoder")
    trained_components = ("visual_tokenizer", "pixel_decoder")
    validation_images = "reconstruction"

    def __init__(self, config, components, accelerator):
        super().__init__(config, components, accelerator)
        visual_tokenizer = components["visual_tokenizer"]
        if config.gradient_checkpointing:
            visual_tokenizer.enable_gradient_checkpointing()
        self.processor = LavitImageProcessor.from_visual_tokenizer_config(visual_tokenizer.config)
        self.module = VisualTokenizerTrainingModule(visual_tokenizer, config, accelerator)

    def transform(self, image, text: str) -> dict:
        return {"pixel_values": self.processor.preprocess(image)[0]}

    def finish(self, output) -> dict:
        """The pixel decoder owns a copy of the codebook: it gets the new one."""
        visual_tokenizer, decoder = self.components["visual_tokenizer"], self.components["pixel_decoder"]
        decoder.codebook.weight.data.copy_(visual_tokenizer.codebook.weight.data)
        return super().finish(output)
