"""LaVIT's image preprocessing (bicubic resize to a square, CLIP mean/std), without torchvision."""

import os

import numpy as np
import PIL.Image
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# What the pipelines take as images: a PIL image, a path, a uint8 array, a preprocessed tensor, or a list of them.
ImageInput = PIL.Image.Image | str | os.PathLike | np.ndarray | torch.Tensor | list


def open_image_file(path, name: str = "image") -> PIL.Image.Image:
    """The decoded image at `path`; FileNotFoundError/ValueError naming the file when it is missing, not an image,
    truncated, larger than PIL's decompression-bomb limit, or empty."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`{name}`: no image file at {os.fspath(path)!r}.")
    try:
        with PIL.Image.open(path) as opened:
            image = opened.copy()  # decodes every pixel: a truncated file fails here
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"`{name}`: cannot read the image {os.fspath(path)!r}: {error}") from error
    if min(image.size) < 1:
        raise ValueError(f"`{name}`: the image {os.fspath(path)!r} is empty ({image.size[0]}×{image.size[1]} pixels).")
    return image


def load_image(image, name: str = "image") -> PIL.Image.Image:
    """A path, PIL image or (H, W[, C]) uint8 array -> RGB PIL image (any mode, alpha dropped)."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image_file(image, name)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(
                f"`{name}` arrays must be uint8 of shape (H, W) or (H, W, C), got {image.dtype} {image.shape}."
            )
        image = PIL.Image.fromarray(image)
    elif not isinstance(image, PIL.Image.Image):
        raise TypeError(f"`{name}` must be a PIL image, a path or a uint8 array, got {type(image).__name__}.")
    return image.convert("RGB")


class LavitImageProcessor(ConfigMixin):
    """Turns images into the visual tokenizer's input: RGB, bicubic resize to `image_size`², scale to [0, 1],
    normalise with `image_mean`/`image_std`. No crop."""

    config_name = "preprocessor_config.json"

    @register_to_config
    def __init__(
        self,
        image_size: int = 224,
        image_mean: tuple = tuple(OPENAI_CLIP_MEAN),
        image_std: tuple = tuple(OPENAI_CLIP_STD),
    ):
        super().__init__()

    @classmethod
    def from_visual_tokenizer_config(cls, config) -> "LavitImageProcessor":
        """The processor of a `LavitVisualTokenizer` whose config is `config` (its image size, mean and std)."""
        return cls(image_size=config["image_size"], image_mean=config["image_mean"], image_std=config["image_std"])

    def preprocess(self, images, name: str = "image") -> torch.Tensor:
        """One image or a list (PIL, paths, uint8 arrays), or an already preprocessed (B, 3, S, S) float
        tensor -> pixel values (B, 3, S, S) float32, S = image_size."""
        size = self.config.image_size
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size) or not images.is_floating_point():
                raise ValueError(
                    f"`{name}` tensors must be preprocessed float pixel values of shape (B, 3, {size}, {size}), "
                    f"got {images.dtype} {tuple(images.shape)}."
                )
            return images
        images = images if isinstance(images, (list, tuple)) else [images]
        if len(images) == 0:
            raise ValueError(f"`{name}` must hold at least one image.")
        arrays = [
            np.asarray(load_image(image, name).resize((size, size), PIL.Image.BICUBIC), dtype=np.float32)
            for image in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        mean = torch.tensor(self.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std).view(1, 3, 1, 1)
        return (pixels - mean) / std
