"""Argument checks shared by the LaVIT pipelines: each raises a ValueError/TypeError/FileNotFoundError that
names the argument and what was expected, before any model runs."""

import math
import numbers
import os
from typing import NamedTuple

import numpy as np
import PIL.Image
import torch


class Interval(NamedTuple):
    """The values a float argument accepts: `low`/`high` (None: unbounded), each end open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or value > self.low or (value == self.low and not self.low_open)
        below = self.high is None or value < self.high or (value == self.high and not self.high_open)
        return above and below

    def __str__(self) -> str:
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{low}, {high}"


# Every float argument of the pipelines (and the CLI options that set them), with the values it accepts.
FLOAT_ARGUMENTS = {
    "guidance_scale": Interval(0),
    "llm_guidance_scale": Interval(0, low_open=True),
    "eta": Interval(0, 1),
    "temperature": Interval(0, low_open=True),
    "top_p": Interval(0, 1, low_open=True),
    "repetition_penalty": Interval(0, low_open=True),
    "length_penalty": Interval(),
}


def check_float(name: str, value, label: str | None = None) -> None:
    """ValueError naming the argument (`label`, default `name` in backticks) unless `value` is a finite real
    number in `FLOAT_ARGUMENTS[name]`: NaN and infinities are refused everywhere."""
    label = label or f"`{name}`"
    interval = FLOAT_ARGUMENTS[name]
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value not in interval
    ):
        raise ValueError(f"{label} must be a finite number in {interval}, got {value!r}.")


def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def check_token_limits(min_new_tokens, max_new_tokens) -> None:
    check_positive_int("max_new_tokens", max_new_tokens)
    if (
        not isinstance(min_new_tokens, int)
        or isinstance(min_new_tokens, bool)
        or not 0 <= min_new_tokens <= max_new_tokens
    ):
        raise ValueError(
            f"`min_new_tokens` must be an integer in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens!r}."
        )


def check_sampling(do_sample: bool, top_k, top_p, temperature) -> None:
    """top-k, top-p and temperature matter only when sampling."""
    if not do_sample:
        return
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"`top_k` must be a non-negative integer (0 disables it), got {top_k!r}.")
    check_float("top_p", top_p)
    check_float("temperature", temperature)


def check_generator(generator, count: int) -> None:
    """TypeError unless `generator` is None, a `torch.Generator` or a list of them; ValueError unless a list holds
    one per image (`count`)."""
    generators = generator if isinstance(generator, list) else [generator]
    if not all(g is None or isinstance(g, torch.Generator) for g in generators):
        raise TypeError(f"`generator` must be a `torch.Generator` or a list of them, got {type(generator).__name__}.")
    if isinstance(generator, list) and len(generator) != count:
        raise ValueError(f"`generator` is a list of {len(generator)}; expected one per image ({count}).")


def check_image_items(images: list, name: str = "image") -> None:
    """Each entry: an existing file path, a PIL image or uint8 array of at least 1×1 pixels, or a (3, H, W) /
    (N, 3, H, W) float tensor of finite values."""
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            if not os.path.isfile(item):
                raise FileNotFoundError(f"`{name}`: no image file at {os.fspath(item)!r}.")
        elif isinstance(item, torch.Tensor):
            if item.ndim not in (3, 4) or not item.is_floating_point() or 0 in item.shape:
                raise ValueError(
                    f"`{name}` tensors must be preprocessed float pixel values, got {item.dtype} {tuple(item.shape)}."
                )
            if not torch.isfinite(item).all():
                raise ValueError(f"`{name}` tensors must hold finite pixel values, found NaN or infinity.")
        elif isinstance(item, (PIL.Image.Image, np.ndarray)):
            size = item.size if isinstance(item, PIL.Image.Image) else item.shape[:2]
            if min(size, default=0) < 1:
                raise ValueError(f"`{name}` images must be at least 1×1 pixels, got size {tuple(size)}.")
        else:
            raise TypeError(
                f"`{name}` entries must be PIL images, paths, uint8 arrays or tensors, got {type(item).__name__}."
            )
