"""Where a (demo) LaVIT loses what a picture of the shapes world shows: colour, shape and position of one object,
read back at each step of the generation path.

    python benchmarks/demo_bottlenecks.py [--model FOLDER] [--num-scenes 1000] [--num-renders 40]

- Linear probes (softmax regression, trained on 80 % of `--num-scenes` one-object renders, accuracy on the
  rest) on: the ViT's patch features, the keep mask, the kept codes as a set and by rank (what the pixel
  decoder and the language model see), and the pixel decoder's UNet condition.
- Pictures judged as `lavit evaluate shapes` judges generations (`evaluation.shapes.judge_generation`): the
  VAE's round trip (the ceiling of any generated picture) and the pixel decoder + UNet's reconstruction from
  each image's own visual tokens (the ceiling of text-to-image).

Chance: colour 1/6, shape 1/3, position 1/5.
"""

import argparse
import random
import time

import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor

from demo_quality import default_model
from lavit_pipelines import LavitText2ImagePipeline
from lavit_pipelines.evaluation.shapes import judge_generation
from lavit_pipelines.image_processor import LavitImageProcessor
from lavit_pipelines.models.visual_tokenizer import sample_keep_mask
from lavit_pipelines.worlds.shapes import COLORS, POSITIONS, SHAPES, render, single_scene
from machine import describe_machine

FACTS = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}


def labels(scenes) -> dict[str, torch.Tensor]:
    """Per fact, the (n,) class indices of the scenes' single object."""
    values = {
        "color": [s.objects[0].color for s in scenes],
        "shape": [s.objects[0].shape for s in scenes],
        "position": [s.position for s in scenes],
    }
    return {fact: torch.tensor([FACTS[fact].index(v) for v in vs]) for fact, vs in values.items()}


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: int, steps: int = 300) -> float:
    """Softmax regression on standardised x (n, d) -> accuracy on the rows after the first `train`."""
    mean, std = x[:train].mean(dim=0), x[:train].std(dim=0) + 1e-6
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(x[:train] @ weight + bias, y[:train]) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    return ((x[train:] @ weight + bias).argmax(dim=1) == y[train:]).float().mean().item()


@torch.no_grad()
def representations(pipe, images) -> dict[str, torch.Tensor]:
    """(n, d) rows per step of the path: patch features, keep mask, kept codes (set, by rank), UNet condition."""
    tokenizer, decoder = pipe.visual_tokenizer, pipe.pixel_decoder
    processor = LavitImageProcessor.from_visual_tokenizer_config(tokenizer.config)
    features = tokenizer.patch_features(processor.preprocess(images))
    keep = sample_keep_mask(tokenizer.token_predictor(features), torch.Generator().manual_seed(0))
    codes = tokenizer.quantize(tokenizer.token_merger(features, keep)[keep]).split(keep.sum(dim=1).tolist())
    size, patches = tokenizer.config.codebook_size, keep.shape[1]
    code_set, by_rank = torch.zeros(len(images), size), torch.zeros(len(images), patches * size)
    for row, ids in enumerate(codes):
        code_set[row, ids] = 1
        by_rank[row, torch.arange(len(ids)) * size + ids] = 1
    return {
        "ViT patch features": features.flatten(1),
        "keep mask": keep.float(),
        "kept codes (set)": code_set,
        "kept codes (by rank)": by_rank,
        "UNet condition": decoder(list(codes)).prompt_embeds.flatten(1),
    }


def picture_accuracy(scenes, pictures) -> dict[str, float]:
    """Share of pictures whose object has the scene's colour, shape and position (`judge_generation`)."""
    judgements = [judge_generation(scene, picture) for scene, picture in zip(scenes, pictures)]
    return {fact: sum(j[fact] for j in judgements) / len(judgements) for fact in FACTS}


@torch.no_grad()
def vae_round_trip(pipe, images) -> list:
    processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor)
    latents = pipe.vae.encode(processor.preprocess(images)).latent_dist.mode()
    return processor.postprocess(pipe.vae.decode(latents).sample)


def reconstructions(pipe, images, steps: int, batch_size: int = 8) -> list:
    pictures = []
    for start in range(0, len(images), batch_size):
        generator = torch.Generator().manual_seed(start)
        pictures += pipe.reconstruct(
            images[start : start + batch_size], num_inference_steps=steps, generator=generator
        ).images
    return pictures


def row(name: str, accuracy: dict[str, float]) -> str:
    return f"| {name:<48} | " + " | ".join(f"{100 * accuracy[fact]:5.1f}" for fact in FACTS) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--num-scenes", type=int, default=1000, help="one-object renders for the probes")
    parser.add_argument("--num-renders", type=int, default=40, help="renders for the VAE round trip and reconstruction")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps of the reconstructions")
    args = parser.parse_args()
    if args.model is None:
        parser.error("--model is required: no shipped demo model in this installation")

    print(describe_machine())
    start = time.perf_counter()
    pipe = LavitText2ImagePipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random("demo-bottlenecks")
    scenes = [single_scene(rng) for _ in range(args.num_scenes)]
    images = [render(scene) for scene in scenes]
    y, train = labels(scenes), int(0.8 * len(scenes))
    print(
        f"model {args.model}; probes: {train} train / {len(scenes) - train} test renders; pictures: {args.num_renders}"
    )
    header = " | ".join(f"{fact:>5}" for fact in FACTS)
    print(f"| {'what is read (accuracy %)':<48} | {header} |")
    print("|" + "-" * 50 + "|" + "------:|" * len(FACTS))
    for name, x in representations(pipe, images).items():
        print(row(f"probe: {name}", {fact: probe_accuracy(x, y[fact], train) for fact in FACTS}), flush=True)
    few, renders = scenes[: args.num_renders], images[: args.num_renders]
    print(row("picture: VAE round trip", picture_accuracy(few, vae_round_trip(pipe, renders))), flush=True)
    print(
        row(
            "picture: reconstruction from own visual tokens",
            picture_accuracy(few, reconstructions(pipe, renders, args.steps)),
        )
    )
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
