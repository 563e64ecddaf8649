"""The synthetic shapes world: deterministic scenes, the caption grammar, and an analyser that reads renders back."""

import random

import numpy as np
import pytest

from lavit_pipelines.worlds import shapes


def test_same_seed_same_dataset(tmp_path):
    first = shapes.write_dataset(tmp_path / "a", 6, seed=3)
    second = shapes.write_dataset(tmp_path / "b", 6, seed=3)
    assert (first / "metadata.jsonl").read_text() == (second / "metadata.jsonl").read_text()
    for name in ("00000.png", "00005.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_caption_grammar_and_questions():
    rng = random.Random(0)
    scene = shapes.single_scene(rng, shape="triangle", color="orange", position="top")
    assert scene.caption == "an orange triangle at the top"
    assert dict(scene.questions()) == {
        "what color is the triangle?": "orange",
        "how many shapes are there?": "one",
        "where is the triangle?": "top",
    }
    pair = shapes.pair_scene(rng, shapes=("circle", "square"), colors=("red", "blue"), layout="side_by_side")
    assert pair.caption == "a red circle to the left of a blue square"
    assert ("what shape is on the left?", "circle") in pair.questions()
    with pytest.raises(ValueError, match="shapes"):
        shapes.pair_scene(rng, shapes=("circle", "circle"))


def test_render_follows_the_spec():
    scene = shapes.single_scene(random.Random(1), shape="square", color="green", position="left")
    pixels = np.asarray(shapes.render(scene))
    assert pixels.shape == (64, 64, 3) and tuple(pixels[0, 63]) == shapes.BACKGROUND
    (obj,) = scene.objects
    assert 14 <= obj.side <= 26 and abs(obj.center[0] - 16) <= 4 and abs(obj.center[1] - 32) <= 4
    assert np.abs(np.array(obj.rgb) - shapes.COLORS["green"]).max() <= 15
    assert (shapes.foreground_mask(shapes.render(scene))).sum() == obj.side**2


def test_analyser_reads_renders_back():
    rng = random.Random(7)
    for _ in range(150):
        scene = shapes.random_scene(rng)
        seen = shapes.analyze(shapes.render(scene), scene.layout)
        assert [(s.color, s.shape) for s in seen] == [(o.color, o.shape) for o in scene.objects], scene.caption
        if scene.position is not None:
            assert seen[0].position == scene.position


def test_parse_caption_round_trip():
    rng = random.Random(2)
    for _ in range(50):
        scene = shapes.random_scene(rng)
        facts = shapes.parse_caption(scene.caption + ".")
        assert facts.objects == tuple((o.color, o.shape) for o in scene.objects)
        assert (facts.position, facts.layout) == (scene.position, scene.layout)
    assert shapes.parse_caption("a dog on the left") is None
    with pytest.raises(ValueError, match="layout"):
        shapes.analyze(shapes.render(scene), layout="diagonal")
