"""The shapes benchmark: how well a LaVIT draws, captions and answers questions about the synthetic shapes world.

- Generation: a balanced set of one-object prompts ("a red circle on the left") and two-object prompts ("a red
  circle to the left of a blue square"); each image is read back with `worlds.shapes.analyze` (colour = nearest
  palette entry, shape by fill ratio, position = centroid; a pair is split at the canvas' middle).
- Captioning and VQA on held-out renders (scenes drawn from a string seed, which no integer training seed
  reproduces): captions are read with `parse_caption`, answers compared with the scene's own.

Every check is a per-category accuracy in percent; the judges score 100 on the world's own renders and captions.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import PIL.Image
import torch

from ..worlds.shapes import (
    COLORS,
    LAYOUTS,
    POSITIONS,
    SHAPES,
    Scene,
    analyze,
    pair_scene,
    parse_caption,
    random_scene,
    render,
    single_scene,
)
from .runner import folder_identity, load_pipelines, run_sharded, start_run, write_json

# Question prefix -> category of the shapes world's questions.
QUESTION_CATEGORIES = {"what color": "color", "how many": "count", "where is": "position", "what shape": "left_shape"}


def generation_scenes(num_prompts: int, seed: int = 0) -> list[Scene]:
    """`num_prompts` scenes whose captions are the prompts: half one-object (a seeded shuffle of every shape ×
    colour × position, cycled), half two-object (of every ordered shape pair × colour pair × layout), alternating."""
    rng = random.Random(f"shapes-prompts-{seed}")
    singles = list(itertools.product(SHAPES, COLORS, POSITIONS))
    pairs = [
        (s, c, layout)
        for s in itertools.permutations(SHAPES, 2)
        for c in itertools.product(COLORS, repeat=2)
        for layout in LAYOUTS
    ]
    rng.shuffle(singles)
    rng.shuffle(pairs)
    num_pairs = num_prompts // 2
    ones = [
        single_scene(rng, *attributes)
        for attributes in itertools.islice(itertools.cycle(singles), num_prompts - num_pairs)
    ]
    twos = [pair_scene(rng, *attributes) for attributes in itertools.islice(itertools.cycle(pairs), num_pairs)]
    return [scene for both in itertools.zip_longest(ones, twos) for scene in both if scene is not None]


def held_out_scenes(num_scenes: int, seed: int = 0) -> list[Scene]:
    """`num_scenes` random scenes (one or two objects, evenly) from a string seed that training never uses."""
    rng = random.Random(f"shapes-held-out-{seed}")
    return [random_scene(rng) for _ in range(num_scenes)]


def judge_generation(scene: Scene, image: PIL.Image.Image) -> dict[str, bool]:
    """Does `image` show the scene's objects: one object -> color, shape, position; two -> colors and shapes in
    order (the layout is judged by the split); `all` when every check holds."""
    seen = analyze(image, scene.layout)
    found = len(seen) == len(scene.objects)
    checks = {
        "color": found and [s.color for s in seen] == [o.color for o in scene.objects],
        "shape": found and [s.shape for s in seen] == [o.shape for o in scene.objects],
    }
    if scene.position is not None:
        checks["position"] = found and seen[0].position == scene.position
    return {**checks, "all": all(checks.values())}


def judge_caption(scene: Scene, caption: str) -> dict[str, bool]:
    """Does `caption` (in the world's grammar) state the scene's colours, shapes and position/layout."""
    facts = parse_caption(caption)
    objects = [(o.color, o.shape) for o in scene.objects]
    parsed = facts is not None and len(facts.objects) == len(objects)
    checks = {
        "parsed": parsed,
        "color": parsed and [c for c, _ in facts.objects] == [c for c, _ in objects],
        "shape": parsed and [s for _, s in facts.objects] == [s for _, s in objects],
        "position": parsed and (facts.position, facts.layout) == (scene.position, scene.layout),
    }
    return {**checks, "all": all(checks.values())}


def question_category(question: str) -> str:
    return next(category for prefix, category in QUESTION_CATEGORIES.items() if question.startswith(prefix))


def accuracies(judgements: list[dict[str, bool]], prefix: str) -> dict[str, float]:
    """Per key the percentage of judgements holding it (over those that have the key), as `prefix/key`, `all` last."""
    keys = sorted(dict.fromkeys(key for judgement in judgements for key in judgement), key=lambda key: key == "all")
    return {
        f"{prefix}/{key}": 100.0 * sum(j[key] for j in judgements if key in j) / sum(key in j for j in judgements)
        for key in keys
    }


def run_generation(pipe, scenes: list[Scene], output: Path, seed: int, batch_size: int, **kwargs) -> list[dict] | None:
    """Generate one image per scene caption (image i seeded with `seed + i`), save it, judge it."""
    (output / "generation").mkdir(exist_ok=True)

    def predict(batch: list[dict], start: int) -> list[dict]:
        generators = [torch.Generator().manual_seed(seed + item["index"]) for item in batch]
        images = pipe([item["scene"].caption for item in batch], generator=generators, **kwargs).images
        records = []
        for item, image in zip(batch, images):
            name = f"generation/{item['index']:05d}.png"
            image.save(output / name)
            records.append(
                {
                    "index": item["index"],
                    "prompt": item["scene"].caption,
                    "image": name,
                    "correct": judge_generation(item["scene"], image),
                }
            )
        return records

    items = [{"index": i, "scene": scene} for i, scene in enumerate(scenes)]
    return run_sharded(items, "index", predict, output, batch_size, stage="generation")


def run_captions(
    pipe, scenes: list[Scene], images: list, output: Path, seed: int, batch_size: int
) -> list[dict] | None:
    def predict(batch: list[dict], start: int) -> list[dict]:
        captions = pipe.caption(
            [images[item["index"]] for item in batch], generator=torch.Generator().manual_seed(seed + start)
        )
        return [
            {
                "index": item["index"],
                "reference": scenes[item["index"]].caption,
                "caption": caption,
                "correct": judge_caption(scenes[item["index"]], caption),
            }
            for item, caption in zip(batch, captions)
        ]

    return run_sharded(
        [{"index": i} for i in range(len(scenes))], "index", predict, output, batch_size, stage="caption"
    )


def run_questions(
    pipe, scenes: list[Scene], images: list, output: Path, seed: int, batch_size: int
) -> list[dict] | None:
    def predict(batch: list[dict], start: int) -> list[dict]:
        answers = pipe.answer(
            [images[item["scene"]] for item in batch],
            [item["question"] for item in batch],
            generator=torch.Generator().manual_seed(seed + start),
        )
        answers = [answer.strip().lower() for answer in answers]
        return [
            {
                **item,
                "answer": answer,
                "category": question_category(item["question"]),
                "correct": answer == item["expected"],
            }
            for item, answer in zip(batch, answers)
        ]

    pairs = [(i, question, expected) for i, scene in enumerate(scenes) for question, expected in scene.questions()]
    items = [{"index": k, "scene": i, "question": q, "expected": a} for k, (i, q, a) in enumerate(pairs)]
    return run_sharded(items, "index", predict, output, batch_size, stage="vqa")


def evaluate_shapes(
    model_path: str | Path,
    *,
    output: str | Path,
    num_prompts: int = 60,
    num_scenes: int = 60,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    generation_kwargs: dict | None = None,
) -> dict[str, float] | None:
    """Evaluate the pipeline folder `model_path` on the shapes world; writes into the folder `output` the generated
    images (`generation/`), the held-out renders (`scenes/`), `predictions.json` and `metrics.json`. Resumable and
    sharded across `accelerate launch` processes like the other evaluations (`runner.run_sharded`).

    Returns, on the main process (None on the others), the metrics: `generation/{color,shape,position,all}`
    (position over one-object prompts), the same for `generation/one/...` and `generation/two/...` (one- and
    two-object prompts), `caption/{parsed,color,shape,position,all}`,
    `vqa/{color,count,position,left_shape,all}`, in percent, and the counts `num_prompts`, `num_scenes`,
    `num_questions`.
    """
    if num_prompts < 1 or num_scenes < 1:
        raise ValueError(f"`num_prompts` and `num_scenes` must be positive, got {num_prompts} and {num_scenes}.")
    kwargs = generation_kwargs or {}
    config = {
        "task": "shapes",
        "model": folder_identity(model_path),
        "num_prompts": num_prompts,
        "num_scenes": num_scenes,
        "seed": seed,
        "dtype": str(dtype),
        "batch_size": batch_size,
        **kwargs,
    }
    output = start_run(output, config)
    text2image, understanding = load_pipelines(model_path, device, dtype)
    for pipe in (text2image, understanding):
        pipe.set_progress_bar_config(disable=True)

    generation = run_generation(text2image, generation_scenes(num_prompts, seed), output, seed, batch_size, **kwargs)
    scenes = held_out_scenes(num_scenes, seed)
    images = [render(scene) for scene in scenes]
    captions = run_captions(understanding, scenes, images, output, seed, batch_size)
    answers = run_questions(understanding, scenes, images, output, seed, batch_size)
    if answers is None:
        return None
    (output / "scenes").mkdir(exist_ok=True)
    for i, image in enumerate(images):
        image.save(output / "scenes" / f"{i:05d}.png")
    judged = [r["correct"] for r in generation]
    metrics = {
        **accuracies(judged, "generation"),
        # one-object prompts are the ones judged on position
        **accuracies([j for j in judged if "position" in j], "generation/one"),
        **accuracies([j for j in judged if "position" not in j], "generation/two"),
        **accuracies([r["correct"] for r in captions], "caption"),
        **accuracies([{r["category"]: r["correct"], "all": r["correct"]} for r in answers], "vqa"),
        "num_prompts": num_prompts,
        "num_scenes": num_scenes,
        "num_questions": len(answers),
    }
    write_json(output / "predictions.json", {"generation": generation, "caption": captions, "vqa": answers})
    write_json(output / "metrics.json", metrics)
    return metrics
