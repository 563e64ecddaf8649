"""Time of one pixel-decoder training step (forward and backward, batch of shapes-world renders) with the VAE
encoding each batch, against `cache_latents` (posteriors encoded once, before training), in one process.

    python benchmarks/decoder_training_step.py [--model FOLDER] [--batch-size 32] [--repeats 20] [--threads N]

Without --model, the shipped demo weights. Prints the machine, the median of each path over interleaved
repeats, and their ratio (cached / encoded).
"""

import argparse
import random
import statistics
import time

import torch
from diffusers import DDPMScheduler
from diffusers.image_processor import VaeImageProcessor

from demo_quality import default_model
from lavit_pipelines import LavitText2ImagePipeline
from lavit_pipelines.image_processor import LavitImageProcessor
from lavit_pipelines.training.loop import example_generators
from lavit_pipelines.training.pixel_decoder import PixelDecoderTrainingModule
from lavit_pipelines.worlds.shapes import random_scene, render
from machine import describe_machine


def batch_of_renders(pipe, size: int) -> dict:
    """`size` rendered scenes as the pixel-decoder stage's transform gives them, with their indices."""
    rng = random.Random("decoder-training-step")
    images = [render(random_scene(rng)) for _ in range(size)]
    config = pipe.visual_tokenizer.config
    processor = LavitImageProcessor.from_visual_tokenizer_config(config)
    return {
        "index": torch.arange(size),
        "pixel_values": processor.preprocess(images),
        "vae_pixel_values": VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor).preprocess(images),
    }


def step_seconds(module: PixelDecoderTrainingModule, batch: dict) -> float:
    generators = example_generators(0, 0, batch["index"].tolist())
    start = time.perf_counter()
    module(batch, generators, 0)["loss"].backward()
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.model is None:
        parser.error("--model is required: no shipped demo model in this installation")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_machine())
    pipe = LavitText2ImagePipeline.from_pretrained(args.model)
    module = PixelDecoderTrainingModule(pipe.components, DDPMScheduler.from_config(pipe.scheduler.config), 0.1, 5.0)
    pipe.visual_tokenizer.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    batch = batch_of_renders(pipe, args.batch_size)
    start = time.perf_counter()
    module.cache_latents([{"vae_pixel_values": p} for p in batch["vae_pixel_values"]], args.batch_size)
    print(f"caching {args.batch_size} images: {time.perf_counter() - start:.3f} s")
    cache = module.latent_parameters
    times = {"encoded": [], "cached": []}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name in times:
            module.latent_parameters = cache if name == "cached" else None
            times[name].append(step_seconds(module, batch))
    encoded, cached = (statistics.median(times[name][1:]) for name in ("encoded", "cached"))
    print(
        f"step (batch {args.batch_size}, median of {args.repeats}): VAE encoding each step {encoded:.3f} s, "
        f"cache_latents {cached:.3f} s, ratio {cached / encoded:.3f}"
    )


if __name__ == "__main__":
    main()
