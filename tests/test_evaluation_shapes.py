"""The shapes benchmark: balanced prompts, judges that score the world's own renders and captions 100%, and an
end-to-end run on the embedded tiny model through the CLI."""

import json
from collections import Counter

from lavit_pipelines.cli import main
from lavit_pipelines.evaluation import shapes as bench
from lavit_pipelines.tiny import tiny_pipeline_path
from lavit_pipelines.worlds.shapes import COLORS, POSITIONS, SHAPES, pair_scene, render


def test_prompts_are_balanced_and_alternate():
    scenes = bench.generation_scenes(180, seed=0)
    singles, pairs = scenes[0::2], scenes[1::2]
    assert all(len(s.objects) == 1 for s in singles) and all(len(s.objects) == 2 for s in pairs)
    combos = {(s.objects[0].shape, s.objects[0].color, s.position) for s in singles}
    assert len(combos) == len(SHAPES) * len(COLORS) * len(POSITIONS) == 90
    assert len({s.caption for s in pairs}) == 90
    assert [s.caption for s in bench.generation_scenes(7, seed=0)] == [s.caption for s in scenes[:6]] + [
        singles[3].caption
    ]
    assert [s.caption for s in bench.generation_scenes(20, seed=1)] != [s.caption for s in scenes[:20]]


def test_judges_score_ground_truth_100():
    scenes = bench.generation_scenes(180) + bench.held_out_scenes(100)
    generation = [bench.judge_generation(scene, render(scene)) for scene in scenes]
    captions = [bench.judge_caption(scene, scene.caption + ".") for scene in scenes]
    assert set(bench.accuracies(generation, "g").values()) == {100.0}
    assert set(bench.accuracies(captions, "c").values()) == {100.0}
    categories = Counter(bench.question_category(q) for scene in scenes for q, _ in scene.questions())
    assert set(categories) == {"color", "count", "position", "left_shape"}


def test_judges_name_what_is_wrong():
    import random

    scene = pair_scene(random.Random(0), shapes=("circle", "square"), colors=("red", "blue"), layout="side_by_side")
    assert bench.judge_caption(scene, "a blue circle to the left of a red square") == {
        "parsed": True,
        "color": False,
        "shape": True,
        "position": True,
        "all": False,
    }
    assert bench.judge_caption(scene, "a red circle above a blue square")["position"] is False
    assert bench.judge_caption(scene, "two shapes") == dict.fromkeys(
        ("parsed", "color", "shape", "position", "all"), False
    )
    swapped = pair_scene(random.Random(0), shapes=("square", "circle"), colors=("red", "blue"), layout="side_by_side")
    assert bench.judge_generation(scene, render(swapped)) == {"color": True, "shape": False, "all": False}
    assert bench.accuracies([{"a": True, "all": False}, {"b": True, "all": True}], "x") == {
        "x/a": 100.0,
        "x/b": 100.0,
        "x/all": 50.0,
    }


def test_cli_runs_end_to_end_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "shapes"
    args = [
        "evaluate",
        "shapes",
        "--model",
        str(tiny_pipeline_path()),
        "--output",
        str(out),
        "--num-prompts",
        "2",
        "--num-scenes",
        "1",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--max-new-tokens",
        "16",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out) == metrics
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["prompt"] for p in predictions["generation"]] == [s.caption for s in bench.generation_scenes(2)]
    assert len(predictions["vqa"]) == metrics["num_questions"] == len(bench.held_out_scenes(1)[0].questions())
    assert sorted(p.name for p in (out / "generation").iterdir()) == ["00000.png", "00001.png"]
    for name in ("generation/all", "caption/all", "vqa/all", "generation/position", "vqa/count"):
        assert 0 <= metrics[name] <= 100
    # one prompt of each kind: the split accuracies average to the overall ones
    assert (
        metrics["generation/position"] == metrics["generation/one/position"]
        and "generation/two/position" not in metrics
    )
    for name in ("color", "shape", "all"):
        assert (
            metrics[f"generation/{name}"] == (metrics[f"generation/one/{name}"] + metrics[f"generation/two/{name}"]) / 2
        )
    assert main(args) == 0  # a rerun finds every result in the logs and writes the same metrics
    assert json.loads(capsys.readouterr().out) == metrics
    assert main([*args, "--num-scenes", "2"]) == 2
    assert "other settings (num_scenes: 1 recorded, 2 now)" in capsys.readouterr().err
