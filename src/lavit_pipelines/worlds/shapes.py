"""A synthetic world of coloured shapes on a white canvas: scenes, their captions and questions, a renderer,
and an analyser that reads a picture of this world back.

Canvas 64×64 RGB, white background. One-object scenes place a circle, square or triangle (isosceles, apex
up) of side 14–26 px at the left, right, top, bottom or center (±4 px jitter); two-object scenes place two
different shapes of side 12–20 px side by side or stacked (±3 px jitter). Colours come from a six-entry
palette, each channel jittered by up to ±15. Everything is drawn from a `random.Random`, so a seed gives the
same scenes on every machine.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

CANVAS = 64
BACKGROUND = (255, 255, 255)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
LAYOUTS = {"side_by_side": ((18, 32), (46, 32)), "stacked": ((32, 18), (32, 46))}
RELATIONS = {"side_by_side": "to the left of", "stacked": "above"}
COLOR_JITTER, SINGLE_JITTER, PAIR_JITTER = 15, 4, 3
SINGLE_SIDES, PAIR_SIDES = (14, 26), (12, 20)
# Fill ratio of a shape inside its bounding box: square 1, circle π/4, triangle 1/2.
FILL_RATIOS = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}


@dataclass(frozen=True)
class ShapeObject:
    """One shape: its kind, palette colour name, drawn RGB, centre (x, y) and bounding-box side in pixels."""

    shape: str
    color: str
    rgb: tuple[int, int, int]
    center: tuple[int, int]
    side: int

    def noun(self) -> str:
        """`a red circle` / `an orange square`."""
        return f"{'an' if self.color == 'orange' else 'a'} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two objects. `position` names where a single object is; `layout` how a pair is arranged."""

    objects: tuple[ShapeObject, ...]
    position: str | None = None
    layout: str | None = None

    @property
    def caption(self) -> str:
        if len(self.objects) == 1:
            return f"{self.objects[0].noun()} {PHRASES[self.position]}"
        first, second = self.objects
        return f"{first.noun()} {RELATIONS[self.layout]} {second.noun()}"

    def questions(self) -> list[tuple[str, str]]:
        """(question, lowercase answer) pairs this scene answers."""
        count = "one" if len(self.objects) == 1 else "two"
        pairs = [(f"what color is the {obj.shape}?", obj.color) for obj in self.objects]
        pairs.append(("how many shapes are there?", count))
        if self.position is not None:
            pairs.append((f"where is the {self.objects[0].shape}?", self.position))
        if self.layout == "side_by_side":
            pairs.append(("what shape is on the left?", self.objects[0].shape))
        return pairs


def _jittered_color(rng: random.Random, name: str) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[name])


def _place(
    rng: random.Random, shape: str, color: str, center: tuple[int, int], sides: tuple[int, int], jitter: int
) -> ShapeObject:
    x, y = (c + rng.randint(-jitter, jitter) for c in center)
    return ShapeObject(shape, color, _jittered_color(rng, color), (x, y), rng.randint(*sides))


def single_scene(
    rng: random.Random, shape: str | None = None, color: str | None = None, position: str | None = None
) -> Scene:
    """A one-object scene; unspecified attributes are drawn from `rng`."""
    shape = shape or rng.choice(SHAPES)
    color = color or rng.choice(list(COLORS))
    position = position or rng.choice(list(POSITIONS))
    return Scene((_place(rng, shape, color, POSITIONS[position], SINGLE_SIDES, SINGLE_JITTER),), position=position)


def pair_scene(
    rng: random.Random,
    shapes: tuple[str, str] | None = None,
    colors: tuple[str, str] | None = None,
    layout: str | None = None,
) -> Scene:
    """A two-object scene of two different shapes (first: left or top); unspecified attributes from `rng`."""
    shapes = shapes or tuple(rng.sample(SHAPES, 2))
    if shapes[0] == shapes[1]:
        raise ValueError(f"`shapes` must be two different shapes, got {shapes}.")
    colors = colors or (rng.choice(list(COLORS)), rng.choice(list(COLORS)))
    layout = layout or rng.choice(list(LAYOUTS))
    objects = tuple(
        _place(rng, s, c, centre, PAIR_SIDES, PAIR_JITTER) for s, c, centre in zip(shapes, colors, LAYOUTS[layout])
    )
    return Scene(objects, layout=layout)


def random_scene(rng: random.Random, pair_probability: float = 0.5) -> Scene:
    """A one- or two-object scene, two objects with probability `pair_probability`."""
    return pair_scene(rng) if rng.random() < pair_probability else single_scene(rng)


def render(scene: Scene) -> PIL.Image.Image:
    """The scene as a 64×64 RGB image."""
    image = PIL.Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    for obj in scene.objects:
        x, y = obj.center
        half = obj.side / 2
        box = (x - half, y - half, x + half - 1, y + half - 1)
        if obj.shape == "circle":
            draw.ellipse(box, fill=obj.rgb)
        elif obj.shape == "square":
            draw.rectangle(box, fill=obj.rgb)
        else:
            draw.polygon([(x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=obj.rgb)
    return image


def write_dataset(folder: str | Path, num_scenes: int, seed: int = 0, pair_probability: float = 0.5) -> Path:
    """Render `num_scenes` scenes into `folder` as `00000.png`, ... plus `metadata.jsonl` (the `datasets`
    imagefolder convention): per line `file_name`, `text` (the caption) and `questions` ([question, answer]
    pairs). The same seed writes the same files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for index in range(num_scenes):
        scene = random_scene(rng, pair_probability)
        name = f"{index:05d}.png"
        render(scene).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": scene.caption, "questions": scene.questions()}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


# ---------------------------------------------------------------------- reading a picture back


@dataclass(frozen=True)
class SeenObject:
    """What the analyser sees of one foreground blob: nearest palette colour, shape by fill ratio, centroid."""

    color: str
    shape: str
    centroid: tuple[float, float]
    pixels: int

    @property
    def position(self) -> str:
        """The nearest of the one-object positions to the centroid."""
        x, y = self.centroid
        return min(POSITIONS, key=lambda name: (POSITIONS[name][0] - x) ** 2 + (POSITIONS[name][1] - y) ** 2)


def foreground_mask(image: PIL.Image.Image, threshold: int = 60) -> np.ndarray:
    """(H, W) bool: pixels whose summed distance from white exceeds `threshold`."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    return (255 - pixels).sum(axis=-1) > threshold


def _describe(pixels: np.ndarray, mask: np.ndarray) -> SeenObject:
    """The object made of the `mask` pixels of `pixels` (H, W, 3)."""
    ys, xs = np.nonzero(mask)
    mean_rgb = pixels[mask].mean(axis=0)
    color = min(COLORS, key=lambda name: float(((np.array(COLORS[name]) - mean_rgb) ** 2).sum()))
    box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = mask.sum() / box_area
    shape = min(FILL_RATIOS, key=lambda name: abs(FILL_RATIOS[name] - fill))
    return SeenObject(color, shape, (float(xs.mean()), float(ys.mean())), int(mask.sum()))


def analyze(image: PIL.Image.Image, layout: str | None = None, min_pixels: int = 20) -> list[SeenObject]:
    """The objects of a picture of this world, in caption order.

    `layout=None`: the whole foreground is one object. `"side_by_side"` / `"stacked"`: the foreground is split
    at the canvas' vertical / horizontal middle into the left (top) and the right (bottom) object. Parts with
    fewer than `min_pixels` foreground pixels are not objects.
    """
    image = image.convert("RGB").resize((CANVAS, CANVAS), PIL.Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float64)
    mask = foreground_mask(image)
    if layout is None:
        parts = [mask]
    else:
        first = np.zeros_like(mask)
        if layout == "side_by_side":
            first[:, : CANVAS // 2] = True
        elif layout == "stacked":
            first[: CANVAS // 2] = True
        else:
            raise ValueError(f"`layout` must be None or one of {list(LAYOUTS)}, got {layout!r}.")
        parts = [mask & first, mask & ~first]
    return [_describe(pixels, part) for part in parts if part.sum() >= min_pixels]


@dataclass(frozen=True)
class CaptionFacts:
    """What a caption of this world states: (color, shape) per object in caption order, and where."""

    objects: tuple[tuple[str, str], ...]
    position: str | None = None
    layout: str | None = None


_NOUN = rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_SINGLE = re.compile(rf"{_NOUN} ({'|'.join(PHRASES.values())})")
_PAIR = re.compile(rf"{_NOUN} ({'|'.join(RELATIONS.values())}) {_NOUN}")


def parse_caption(text: str) -> CaptionFacts | None:
    """The facts of a caption in this world's grammar (lowercase, surrounding spaces and a final '.' ignored);
    None when the text is not such a caption."""
    text = text.strip().lower().rstrip(".")
    if match := _SINGLE.fullmatch(text):
        color, shape, phrase = match.groups()
        position = next(name for name, words in PHRASES.items() if words == phrase)
        return CaptionFacts(((color, shape),), position=position)
    if match := _PAIR.fullmatch(text):
        c1, s1, relation, c2, s2 = match.groups()
        layout = next(name for name, words in RELATIONS.items() if words == relation)
        return CaptionFacts(((c1, s1), (c2, s2)), layout=layout)
    return None
