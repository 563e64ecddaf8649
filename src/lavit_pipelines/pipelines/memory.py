"""Memory of the text-to-image decode, estimated from the VAE's config before anything is allocated: an image
size that cannot fit is refused, and a large batch is split into batches that fit."""

import psutil
import torch

GIB = 2**30
# Tensors of the VAE decoder's widest activation alive at once while it decodes (input, output, norm, residual):
# what `images_per_batch` budgets per image.
LIVE_ACTIVATIONS = 4


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (CPU: the RAM available; CUDA: the free memory of that GPU); None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return psutil.virtual_memory().available
    return None


def decode_bytes_per_image(vae, height: int, width: int) -> int:
    """A lower bound of the memory decoding one height×width image takes: one (C, height, width) activation of the
    VAE decoder's full-resolution block (C: its first `block_out_channels`), in the dtype it decodes in."""
    dtype = torch.float32 if vae.dtype == torch.float16 and vae.config.force_upcast else vae.dtype
    return vae.config.block_out_channels[0] * height * width * dtype.itemsize


def check_image_memory(vae, height: int, width: int, device: torch.device, default_size: int) -> None:
    """ValueError, before anything is allocated, when one image of height×width cannot be decoded in the memory
    `device` has available; names the estimate and what is available."""
    need, available = decode_bytes_per_image(vae, height, width), available_memory(device)
    if available is not None and need > available:
        raise ValueError(
            f"`height`×`width` {height}×{width}: decoding one image needs at least {need / GIB:.1f} GiB on {device} "
            f"(the VAE's full-resolution activations), {available / GIB:.1f} GiB is available; this model draws "
            f"{default_size}×{default_size} by default."
        )


def images_per_batch(vae, height: int, width: int, device: torch.device) -> int | None:
    """How many height×width images fit one batch in the memory available on `device` (at least 1), budgeting
    `LIVE_ACTIVATIONS` decoder activations per image; None where the available memory is unknown."""
    available = available_memory(device)
    if available is None:
        return None
    return max(1, available // (LIVE_ACTIVATIONS * decode_bytes_per_image(vae, height, width)))
