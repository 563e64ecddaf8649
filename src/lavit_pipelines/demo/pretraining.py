"""The demo's stand-ins for what LaVIT takes ready-made: a ViT trained contrastively on the world's captions
(EVA-CLIP's role) and a small KL autoencoder (Stable Diffusion's VAE role).

Both train on a whole dataset held in memory as tensors: the world's 64×64 images are tiny.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from tqdm.auto import tqdm

from ..image_processor import LavitImageProcessor
from ..models.eva_vit import EvaVisionEncoder
from ..worlds.shapes import COLORS, POSITIONS, SHAPES, parse_caption

# The words a patch names for the object it shows (class 0 of each: no object in the patch).
PATCH_WORDS = {"color": list(COLORS), "shape": list(SHAPES), "place": list(POSITIONS)}
PAIR_PLACES = {"side_by_side": ("left", "right"), "stacked": ("top", "bottom")}


def load_images_and_captions(data: str | Path) -> tuple[torch.Tensor, list[str]]:
    """An imagefolder with `metadata.jsonl` -> images (N, 3, H, W) uint8 and their captions (`text`)."""
    data = Path(data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text(encoding="utf-8").splitlines() if line]
    images = np.stack([np.asarray(PIL.Image.open(data / row["file_name"]).convert("RGB")) for row in rows])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [row["text"] for row in rows]


def patch_words(images: torch.Tensor, captions: list[str], patch: int, min_share: float = 1 / 16) -> torch.Tensor:
    """images (N, 3, H, W) uint8 and their captions -> (N, P, 3) classes of the colour, shape and place words
    (`PATCH_WORDS`, shifted by one) of the caption's object in each patch, 0 where a patch has less than
    `min_share` of foreground (not white) pixels. A pair's first object is the left (top) half's, placed
    `left` (`top`), the second the other half's, `right` (`bottom`)."""
    foreground = ((255 - images.int()).sum(dim=1, keepdim=True) > 60).float()
    occupied = (F.avg_pool2d(foreground, patch) >= min_share).flatten(1)  # (N, P)
    side = images.shape[-1] // patch
    rows, columns = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    halves = {"side_by_side": (columns >= side // 2).long(), "stacked": (rows >= side // 2).long()}
    words = torch.zeros(*occupied.shape, 3, dtype=torch.long)
    for i, caption in enumerate(captions):
        facts = parse_caption(caption)
        if facts is None:
            raise ValueError(f"`captions` must be captions of the shapes world, got {caption!r}.")
        places = (facts.position,) if facts.layout is None else PAIR_PLACES[facts.layout]
        which = torch.zeros(len(rows), dtype=torch.long) if facts.layout is None else halves[facts.layout]
        table = torch.tensor(
            [
                [
                    PATCH_WORDS["color"].index(c) + 1,
                    PATCH_WORDS["shape"].index(s) + 1,
                    PATCH_WORDS["place"].index(p) + 1,
                ]
                for (c, s), p in zip(facts.objects, places)
            ]
        )
        words[i] = table[which] * occupied[i, :, None]
    return words


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `steps`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class CaptionEncoder(nn.Module):
    """The contrastive text tower: token embeddings + positions, a small transformer, mean over real tokens."""

    def __init__(self, vocab_size: int, dim: int, num_layers: int = 2, num_heads: int = 4, max_length: int = 32):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: (B, L) -> caption embeddings (B, dim)."""
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=~mask))
        return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


class ContrastiveModel(nn.Module):
    """CLIP on this world, plus local objectives. The image embedding is the ViT's class token, projected;
    the caption embedding comes from `CaptionEncoder`. Each patch feature predicts its own patch's pixels
    and, like EVA-CLIP's patch features that say what they show, the caption's words for the object in it
    (`patch_words`), through linear heads. That keeps the patch features (the visual tokenizer's input) local:
    pooled into the contrastive embedding instead, they all become the same global summary, and the visual
    tokenizer then gives one repeated code per image. Everything but the ViT is thrown away after training."""

    def __init__(self, encoder: EvaVisionEncoder, vocab_size: int, embed_dim: int = 128):
        super().__init__()
        dim, patch = encoder.patch_embedding.out_channels, encoder.patch_embedding.kernel_size[0]
        self.encoder = encoder
        self.image_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, embed_dim))
        self.pixel_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3 * patch * patch))
        self.word_heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, len(w) + 1)) for w in PATCH_WORDS.values()
        )
        self.text_encoder = CaptionEncoder(vocab_size, dim)
        self.text_head = nn.Linear(dim, embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def loss(
        self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, same: torch.Tensor, words: torch.Tensor
    ) -> tuple:
        """(contrastive, pixel, word) losses. Contrastive: symmetric InfoNCE where every pair with the same
        caption (`same`: (B, B) bool) counts as a positive. Pixel: squared error of each patch's predicted
        pixels. Word: cross-entropy of each patch's words (`words`: (B, N, 3) from `patch_words`)."""
        hidden = self.encoder(pixel_values)
        features = hidden[:, 1:]
        image = F.normalize(self.image_head(hidden[:, 0]), dim=-1)
        text = F.normalize(self.text_head(self.text_encoder(ids, mask)), dim=-1)
        logits = self.log_scale.exp().clamp(max=100) * image @ text.T
        targets = same.float() / same.sum(1, keepdim=True)
        contrastive = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        patch = self.encoder.patch_embedding.kernel_size[0]
        patches = F.unfold(pixel_values, patch, stride=patch).transpose(1, 2)  # (B, N, 3·p·p)
        pixel = (self.pixel_head(features) - patches).pow(2).mean()
        word = sum(
            F.cross_entropy(head(features).flatten(0, 1), words[..., i].flatten())
            for i, head in enumerate(self.word_heads)
        )
        return contrastive, pixel, word / len(self.word_heads)


def train_vision_encoder(
    encoder: EvaVisionEncoder,
    processor: LavitImageProcessor,
    tokenizer,
    images: torch.Tensor,
    captions: list[str],
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    pixel_weight: float = 1.0,
    log=print,
) -> EvaVisionEncoder:
    """Train `encoder` in place on (image, caption) pairs (see `ContrastiveModel`): contrastive + word +
    `pixel_weight` × pixel loss; returns it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ContrastiveModel(encoder, len(tokenizer)).train()
    tokens = tokenizer(captions, padding=True, return_tensors="pt", add_special_tokens=False)
    ids, mask = tokens.input_ids, tokens.attention_mask.bool()
    caption_ids = torch.tensor(_caption_classes(captions))
    words = patch_words(images, captions, encoder.patch_embedding.kernel_size[0])
    mean = torch.tensor(processor.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.config.image_std).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    schedule = cosine_schedule(optimizer, steps, warmup=max(1, steps // 20))
    start = time.time()
    for step in (bar := tqdm(range(steps), desc="vision encoder (contrastive)")):
        batch = torch.randint(len(images), (batch_size,), generator=generator)
        pixels = (images[batch].float() / 255 - mean) / std
        same = caption_ids[batch][:, None] == caption_ids[batch][None, :]
        contrastive, pixel, word = model.loss(pixels, ids[batch], mask[batch], same, words[batch])
        optimizer.zero_grad()
        (contrastive + pixel_weight * pixel + word).backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(contrastive=f"{contrastive.item():.3f}", pixel=f"{pixel.item():.3f}", word=f"{word.item():.3f}")
        if step % 50 == 0 or step == steps - 1:
            log(
                {
                    "stage": "vision-encoder",
                    "step": step,
                    "contrastive_loss": round(contrastive.item(), 4),
                    "pixel_loss": round(pixel.item(), 4),
                    "word_loss": round(word.item(), 4),
                    "seconds": round(time.time() - start, 1),
                }
            )
    return encoder.eval()


def _caption_classes(captions: list[str]) -> list[int]:
    """One integer per distinct caption, in order of first appearance."""
    classes: dict[str, int] = {}
    return [classes.setdefault(caption, len(classes)) for caption in captions]


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> one random `size`×`size` crop per image (B, C, size, size)."""
    height, width = images.shape[-2:]
    tops = torch.randint(height - size + 1, (len(images),), generator=generator).tolist()
    lefts = torch.randint(width - size + 1, (len(images),), generator=generator).tolist()
    return torch.stack(
        [image[:, top : top + size, left : left + size] for image, top, left in zip(images, tops, lefts)]
    )


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    kl_weight: float,
    seed: int,
    crop_size: int = 32,
    log=print,
) -> AutoencoderKL:
    """Train `vae` in place as an autoencoder on random `crop_size` crops (it is fully convolutional, so it
    learns the same on a quarter of the pixels): squared error of the posterior sample's reconstruction + `kl_weight` × KL.
    The output starts white (the world's background), and the `scaling_factor` is set to 1 / std of the
    latents of whole images, as Stable Diffusion's was chosen."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae.decoder.conv_out.bias.data.fill_(1.0)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, steps, warmup=max(1, steps // 20))
    start = time.time()
    for step in (bar := tqdm(range(steps), desc="vae")):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        batch = to_unit_range(random_crops(batch, crop_size, generator))
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = (reconstruction - batch).pow(2).mean()
        kl = posterior.kl().mean() / batch[0].numel()
        loss = mse + kl_weight * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
        if step % 50 == 0 or step == steps - 1:
            log(
                {
                    "stage": "vae",
                    "step": step,
                    "mse": round(mse.item(), 5),
                    "kl": round(kl.item(), 5),
                    "seconds": round(time.time() - start, 1),
                }
            )
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_unit_range(chunk)).latent_dist.mode() for chunk in images[:512].split(64)])
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    return vae
