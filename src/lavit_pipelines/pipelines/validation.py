"""Argument checks shared by the LaVIT pipelines: each raises a ValueError/TypeError/FileNotFoundError that
names the argument and what was expected, before any model runs."""

import os

import numpy as np
import PIL.Image
import torch


def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def check_token_limits(min_new_tokens, max_new_tokens) -> None:
    check_positive_int("max_new_tokens", max_new_tokens)
    if not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"`min_new_tokens` must be an integer in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens!r}.")


def check_sampling(do_sample: bool, top_k, top_p, temperature) -> None:
    """top-k, top-p and temperature matter only when sampling."""
    if not do_sample:
        return
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"`top_k` must be a non-negative integer (0 disables it), got {top_k!r}.")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}.")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"`temperature` must be a positive number when sampling, got {temperature!r}.")


def check_image_items(images: list, name: str = "image") -> None:
    """Each entry: an existing file path, a PIL image, a uint8 array, or a (3, H, W) / (N, 3, H, W) float tensor."""
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            if not os.path.isfile(item):
                raise FileNotFoundError(f"`{name}`: no image file at {os.fspath(item)!r}.")
        elif isinstance(item, torch.Tensor):
            if item.ndim not in (3, 4) or not item.is_floating_point():
                raise ValueError(f"`{name}` tensors must be preprocessed float pixel values, got {item.dtype} {tuple(item.shape)}.")
        elif not isinstance(item, (PIL.Image.Image, np.ndarray)):
            raise TypeError(f"`{name}` entries must be PIL images, paths, uint8 arrays or tensors, got {type(item).__name__}.")
