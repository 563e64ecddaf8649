"""Subject fine-tuning on the demo model: does a short `lavit train subject` teach a new word, and what does it cost
the old prompts?

    python benchmarks/subject_quality.py [--model FOLDER] [--subjects sks:purple:triangle ...] [--max-steps 300]
        [--learning-rate 1e-2] [--lora] [--decoder] [--num-images 40] [--num-prompts 40]
        [--old-prompts 100 --old-scenes 40 --old-seeds 0 1 2 3]

Per subject (token:colour:shape; a colour outside the world's palette as `name=R,G,B`): `--num-images` renders of
the world's renderer (the shape in that colour at the five positions in turn, captioned "a {token} on the left",
...), `train_subject` on them (class examples drawn by the base model, as the command does), then the share of
`--num-prompts` generations "a {token} {place}" that show the subject at the asked place (colour, shape and
position right: `worlds.shapes.analyze`, the colour the nearest of the palette and the subject's own), and the
shapes benchmark (`evaluate_shapes`: the old prompts, captions and answers) before and after, averaged over
`--old-seeds` (each seed draws other prompts and other samples: a changed denoiser resamples every picture, and
one seed's 50 two-object prompts swing by up to 14 points from the sampling alone). What bounds the subject, per
subject: the share of the training renders whose reconstruction (their own visual tokens through the pixel
decoder and the UNet, at the generation settings) shows it, and for a palette colour the base model's pictures of
its own description ("a purple triangle on the left", same seeds). Prints the wall and the process CPU time of
each fine-tune (class examples included), the machine and the thread count.
"""

import argparse
import inspect
import json
import random
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from lavit_pipelines.evaluation.shapes import evaluate_shapes
from lavit_pipelines.training.subject import SubjectConfig, train_subject
from lavit_pipelines.worlds.shapes import (
    COLORS,
    PHRASES,
    POSITIONS,
    SINGLE_JITTER,
    SINGLE_SIDES,
    Scene,
    ShapeObject,
    analyze,
    foreground_mask,
    render,
)
from machine import describe_machine

SUBJECTS = ("sks:purple:triangle", "zwx:green:square", "qrv:pink=240,100,170:circle")
OLD_METRICS = (
    "generation/one/color",
    "generation/one/shape",
    "generation/one/position",
    "generation/two/color",
    "generation/two/shape",
    "caption/all",
    "vqa/color",
    "vqa/count",
    "vqa/position",
    "vqa/left_shape",
)


def parse_subject(text: str) -> tuple[str, str, tuple[int, int, int], str]:
    """`token:colour:shape` or `token:name=R,G,B:shape` -> (token, colour name, rgb, shape)."""
    token, colour, shape = text.split(":")
    name, _, rgb = colour.partition("=")
    return token, name, tuple(int(c) for c in rgb.split(",")) if rgb else COLORS[name], shape


def subject_scene(rng: random.Random, rgb: tuple[int, int, int], name: str, shape: str, position: str) -> Scene:
    """One object of the subject at `position`, placed and sized as the world's one-object scenes."""
    x, y = (c + rng.randint(-SINGLE_JITTER, SINGLE_JITTER) for c in POSITIONS[position])
    jittered = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in rgb)
    return Scene((ShapeObject(shape, name, jittered, (x, y), rng.randint(*SINGLE_SIDES)),), position=position)


def write_subject_images(folder: Path, token: str, name: str, rgb, shape: str, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng, lines = random.Random(seed), []
    for i in range(count):
        position = list(POSITIONS)[i % len(POSITIONS)]
        render(subject_scene(rng, rgb, name, shape, position)).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"a {token} {PHRASES[position]}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def shows_subject(image, name: str, rgb, shape: str, position: str) -> bool:
    """One object of `shape` at `position` whose mean colour is nearest to the subject's among the palette and it."""
    seen = analyze(image)
    if len(seen) != 1 or seen[0].shape != shape or seen[0].position != position:
        return False
    pixels = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float64)
    mean = pixels[foreground_mask(image.resize((64, 64)))].mean(axis=0)
    colours = {**COLORS, name: rgb}
    return min(colours, key=lambda c: float(((np.array(colours[c]) - mean) ** 2).sum())) == name


def load_pipeline(model: Path):
    """The text-to-image pipeline of `model`, with its LoRA file when it has one."""
    from lavit_pipelines import LavitText2ImagePipeline

    pipe = LavitText2ImagePipeline.from_pretrained(model)
    if (model / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def subject_generations(model: Path, noun: str, num_prompts: int) -> tuple[list[str], list]:
    """The positions asked and the pictures of "{noun} {place}", the places in turn (image i seeded 1000 + i)."""
    positions = [list(POSITIONS)[i % len(POSITIONS)] for i in range(num_prompts)]
    prompts = [f"{noun} {PHRASES[p]}" for p in positions]
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(num_prompts)]
    return positions, load_pipeline(model)(prompts, generator=generators).images


def reconstructions(model: Path, images: list) -> list:
    """`images` through their own visual tokens, the pixel decoder and the UNet at the generation settings."""
    pipe = load_pipeline(model)
    steps = inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    guidance = pipe.config.default_guidance_scale
    generator = torch.Generator().manual_seed(0)
    return pipe.reconstruct(images, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images


def share(name: str, rgb, shape: str, pictures: list, positions: list[str]) -> float:
    """Percent of `pictures` that show the subject at its position."""
    return 100.0 * sum(shows_subject(im, name, rgb, shape, p) for im, p in zip(pictures, positions)) / len(positions)


def draw_rows(rows: list[list], path: Path, cell: int = 96) -> None:
    """Rows of 64² pictures, upscaled (nearest) to `cell` pixels, into one PNG."""
    grid = PIL.Image.new("RGB", (cell * max(map(len, rows)), cell * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((cell, cell), PIL.Image.NEAREST), (c * cell, r * cell))
    grid.save(path)


def merged_folder(model: Path, scratch: Path) -> Path:
    """`model` itself, or with its LoRA (language model, UNet) merged, saved into `scratch` (for `evaluate_shapes`)."""
    if not (model / "pytorch_lora_weights.safetensors").is_file():
        return model
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    pipe = load_pipeline(model)
    pipe.fuse_lora()
    for component in (pipe.language_model, pipe.unet):
        if hasattr(component, "peft_config"):
            recurse_remove_peft_layers(component)
            del component.peft_config
    pipe.unet._hf_peft_config_loaded = False
    pipe.save_pretrained(scratch / "merged")
    return scratch / "merged"


def old_metrics(model: Path, scratch: Path, args) -> dict[str, float]:
    """`evaluate_shapes`' old metrics, the mean over `args.old_seeds`."""
    runs = []
    for seed in args.old_seeds:
        output = scratch / f"shapes-{len(list(scratch.iterdir()))}"
        runs.append(
            evaluate_shapes(
                model, output=output, num_prompts=args.old_prompts, num_scenes=args.old_scenes, seed=seed, batch_size=8
            )
        )
    return {key: sum(run[key] for run in runs) / len(runs) for key in OLD_METRICS}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    from lavit_pipelines import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(default_model_path()))
    parser.add_argument("--subjects", nargs="+", default=list(SUBJECTS))
    parser.add_argument("--max-steps", type=int, default=SubjectConfig.max_steps)
    parser.add_argument("--learning-rate", type=float, default=SubjectConfig.learning_rate)
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=SubjectConfig.lora)
    parser.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=SubjectConfig.decoder)
    parser.add_argument("--decoder-learning-rate", type=float, default=SubjectConfig.decoder_learning_rate)
    parser.add_argument("--prior-preservation", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--num-images", type=int, default=40)
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--old-prompts", type=int, default=100)
    parser.add_argument("--old-scenes", type=int, default=40)
    parser.add_argument("--old-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--grids", type=Path, help="folder for subject-<token>.png: renders, base model, fine-tuned")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe_machine())
    print(
        f"threads {torch.get_num_threads()}; steps {args.max_steps}, learning rate {args.learning_rate}, "
        f"lora {args.lora}, decoder {args.decoder} (learning rate {args.decoder_learning_rate}), "
        f"prior preservation {args.prior_preservation}"
    )
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.output or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        before = old_metrics(args.model, scratch, args)
        rows = []
        for index, subject in enumerate(args.subjects):
            token, name, rgb, shape = parse_subject(subject)
            images = scratch / f"{token}-images"
            write_subject_images(images, token, name, rgb, shape, args.num_images, seed=index)
            config = SubjectConfig(
                model=str(args.model),
                images=str(images),
                token=token,
                class_word=shape,
                output=str(scratch / f"{token}-run"),
                max_steps=args.max_steps,
                learning_rate=args.learning_rate,
                lora=args.lora,
                decoder=args.decoder,
                decoder_learning_rate=args.decoder_learning_rate,
                prior_preservation=args.prior_preservation,
            )
            wall, cpu = time.perf_counter(), cpu_seconds()
            model = train_subject(config)
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            positions, pictures = subject_generations(model, f"a {token}", args.num_prompts)
            renders = [PIL.Image.open(images / f"{i:03d}.png").convert("RGB") for i in range(args.num_images)]
            render_places = [list(POSITIONS)[i % len(POSITIONS)] for i in range(args.num_images)]
            bounds = {"reconstruction": share(name, rgb, shape, reconstructions(args.model, renders), render_places)}
            if name in COLORS:
                noun = f"{'an' if name[0] in 'aeiou' else 'a'} {name} {shape}"
                places, described = subject_generations(args.model, noun, args.num_prompts)
                bounds["description"] = share(name, rgb, shape, described, places)
            if args.grids:  # training renders, the base model's pictures of the same prompts, the fine-tuned model's
                base = subject_generations(args.model, f"a {token}", len(POSITIONS))[1]
                draw_rows(
                    [renders[: len(POSITIONS)], base, pictures[: len(POSITIONS)]], args.grids / f"subject-{token}.png"
                )
            after = old_metrics(merged_folder(model, scratch / f"{token}-run"), scratch, args)
            rows.append(
                {
                    "subject": f"{token} = {name} {shape}",
                    "steps": args.max_steps,
                    "wall_s": round(wall, 1),
                    "cpu_s": round(cpu, 1),
                    "subject_accuracy": share(name, rgb, shape, pictures, positions),
                    "base_model": bounds,
                    "old_after": after,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nold metrics of the base model ({args.old_prompts} prompts, {args.old_scenes} scenes): {json.dumps(before)}"
    )
    print(
        "| subject | steps | wall / CPU s | subject at the asked place | base model: reconstruction / description "
        "| largest old-metric drop (points) |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        drops = {key: before[key] - row["old_after"][key] for key in OLD_METRICS}
        worst = max(drops, key=drops.get)
        print(
            f"| {row['subject']} | {row['steps']} | {row['wall_s']} / {row['cpu_s']} | "
            f"{row['subject_accuracy']:.1f} % ({args.num_prompts} prompts) | "
            f"{' / '.join(f'{v:.1f} %' for v in row['base_model'].values())} | {worst} {-drops[worst]:+.1f} |"
        )


if __name__ == "__main__":
    main()
