"""LavitImageProcessor: LaVIT's preprocessing (bicubic 224², CLIP mean/std) and its input checks."""

import numpy as np
import PIL.Image
import pytest
import torch

from lavit_pipelines import LavitImageProcessor
from lavit_pipelines.image_processor import load_image


@pytest.fixture(scope="module")
def image_paths(fixture_dir):
    return [fixture_dir / "reference" / f"image_{i}.png" for i in range(2)]


def test_preprocess_matches_reference(image_paths, reference):
    pixels = LavitImageProcessor().preprocess([str(p) for p in image_paths])
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, reference[1]["pixel_values"], rtol=0, atol=1e-5)


def test_input_kinds_agree(image_paths):
    """Path, PIL (any mode, alpha dropped) and uint8 array give the same pixels; a preprocessed tensor passes through."""
    processor = LavitImageProcessor()
    rgb = load_image(image_paths[0])
    expected = processor.preprocess(rgb)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(17)
    for image in (image_paths[0], str(image_paths[0]), rgba, np.asarray(rgb)):
        torch.testing.assert_close(processor.preprocess(image), expected, rtol=0, atol=0)
    assert processor.preprocess(expected) is expected
    gray = processor.preprocess(PIL.Image.new("L", (50, 30), 128))
    assert gray.shape == (1, 3, 224, 224)
    assert torch.allclose(gray[0, 0], gray[0, 0, 0, 0]) and not torch.allclose(gray[0, 0], gray[0, 1])


def test_custom_size_and_config_round_trip(tmp_path):
    processor = LavitImageProcessor(image_size=112, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    processor.save_config(tmp_path)
    loaded = LavitImageProcessor.from_config(LavitImageProcessor.load_config(tmp_path))
    assert loaded.config.image_size == 112
    pixels = loaded.preprocess(PIL.Image.new("RGB", (300, 200), (255, 0, 128)))
    assert pixels.shape == (1, 3, 112, 112)
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))


@pytest.mark.parametrize(
    "images, error, match",
    [
        ([], ValueError, "at least one"),
        (torch.zeros(1, 3, 32, 32), ValueError, r"\(B, 3, 224, 224\)"),
        (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), ValueError, "float"),
        (np.zeros((8, 8, 3), dtype=np.float32), TypeError, "uint8"),
        (42, TypeError, "PIL image"),
        ("/nonexistent/image.png", FileNotFoundError, "no image file"),
    ],
)
def test_invalid_inputs(images, error, match):
    with pytest.raises(error, match=match):
        LavitImageProcessor().preprocess(images)
