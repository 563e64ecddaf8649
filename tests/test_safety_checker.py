"""The optional safety checker: converted from a release folder that has one, run by the pipeline."""

import shutil

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor

from lavit_pipelines import LavitText2ImagePipeline
from lavit_pipelines.conversion import convert


def add_tiny_safety_checker(release):
    """A tiny random SD safety checker and its feature extractor in the release's `pixel_decoding/`."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    StableDiffusionSafetyChecker(config).save_pretrained(release / "pixel_decoding" / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        release / "pixel_decoding" / "feature_extractor"
    )


def test_safety_checker_is_converted_and_run(checkpoint_dir, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(checkpoint_dir, release)
    add_tiny_safety_checker(release)
    out = convert(str(release), str(tmp_path / "converted"), safety_checker=True)
    pipe = LavitText2ImagePipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker)
    result = pipe(visual_token_ids=[torch.arange(20), torch.arange(30)], num_inference_steps=2, output_type="np")
    assert result.images.shape == (2, 64, 64, 3)
    assert len(result.nsfw_content_detected) == 2
    assert all(isinstance(flag, bool) for flag in result.nsfw_content_detected)
    without = LavitText2ImagePipeline.from_pretrained(out, safety_checker=None, feature_extractor=None)
    assert without.safety_checker is None
