"""Evaluation never destroys or mixes results (docs/safety.md): an output that holds or is an input is refused, a
resumed run must have every setting that changes its results unchanged, malformed entries are named, optional
metric packages are checked before the model, and `--model` defaults to the embedded demo model."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lavit_pipelines.cli import main
from lavit_pipelines.demo import default_model_path
from lavit_pipelines.evaluation.captioning import evaluate_captioning
from lavit_pipelines.evaluation.runner import PARTIAL, RUN_CONFIG
from lavit_pipelines.evaluation.text_to_image import evaluate_text_to_image
from lavit_pipelines.evaluation.vqa import evaluate_vqa
from lavit_pipelines.tiny import tiny_pipeline_path
from lavit_pipelines.worlds.shapes import write_dataset

NO_MODEL = "/nonexistent/lavit-model"  # every refusal here must come before this is opened


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    meta = [
        json.loads(line)
        for line in (write_dataset(root / "images", 2, seed=5) / "metadata.jsonl").read_text().splitlines()
    ]
    files = {
        "caption.json": [{"image": m["file_name"], "image_id": i} for i, m in enumerate(meta)],
        "caption_gt.json": {"annotations": [{"image_id": i, "caption": m["text"]} for i, m in enumerate(meta)]},
        "vqa.json": [
            {
                "question_id": i,
                "image": m["file_name"],
                "question": m["questions"][0][0],
                "answer": [m["questions"][0][1]] * 10,
            }
            for i, m in enumerate(meta)
        ],
        "t2i.json": [{"caption": m["text"]} for m in meta],
    }
    for name, content in files.items():
        (root / name).write_text(json.dumps(content))
    return root


def caption(data, output, annotations=None, ground_truth=None, images=None):
    return evaluate_captioning(
        NO_MODEL,
        annotations=annotations or data / "caption.json",
        images=images or data / "images",
        ground_truth=ground_truth or data / "caption_gt.json",
        output=output,
    )


@pytest.mark.parametrize(
    "where",
    ["annotations", "ground_truth", "folder of annotations", "folder of ground truth", "images", "inside images"],
)
def test_an_output_that_is_or_holds_an_input_is_refused_and_nothing_changes(data, tmp_path, where):
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    output = {
        "annotations": copy / "caption.json",
        "ground_truth": copy / "caption_gt.json",
        "folder of annotations": copy,
        "folder of ground truth": copy,
        "images": copy / "images",
        "inside images": copy / "images" / "results",
    }[where]
    with pytest.raises(ValueError, match="--output .* overlaps --(annotations|ground-truth|images)|is a file"):
        caption(data, output, copy / "caption.json", copy / "caption_gt.json", copy / "images")
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_cli_refuses_the_annotations_file_as_output(data, tmp_path, capsys):
    annotations = tmp_path / "vqa.json"
    annotations.write_bytes((data / "vqa.json").read_bytes())
    assert (
        main(
            [
                "evaluate",
                "vqa",
                "--model",
                NO_MODEL,
                "--annotations",
                str(annotations),
                "--images",
                str(data / "images"),
                "--no-lemmatize",
                "--output",
                str(tmp_path),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("lavit evaluate: error: --output") and "overlaps --annotations" in err and err.count("\n") == 1
    )
    assert annotations.read_bytes() == (data / "vqa.json").read_bytes()


@pytest.fixture(scope="module")
def vqa_run(data, tmp_path_factory) -> Path:
    """A finished VQA run of the tiny model on the first question."""
    output = tmp_path_factory.mktemp("vqa") / "out"
    evaluate_vqa(
        tiny_pipeline_path(),
        annotations=data / "vqa.json",
        images=data / "images",
        output=output,
        lemmatize=False,
        batch_size=1,
        limit=1,
    )
    return output


def test_a_resumed_run_records_what_changes_its_results(vqa_run):
    recorded = json.loads((vqa_run / PARTIAL / RUN_CONFIG).read_text())
    assert {
        "model",
        "images",
        "annotations",
        "ground_truth",
        "seed",
        "dtype",
        "dataset",
        "lemmatize",
        "batch_size",
    } <= set(recorded)
    assert recorded["model"] == str(Path(tiny_pipeline_path()).resolve()) and len(recorded["annotations"]) == 64


@pytest.mark.parametrize(
    "change, named",
    [
        ("seed", "seed: 0 recorded, 1 now"),
        ("dtype", "dtype: 'torch.float32' recorded, 'torch.bfloat16' now"),
        ("annotations", "annotations: '"),
        ("images", "images: '"),
        ("model", "model: '"),
    ],
)
def test_resuming_with_other_settings_is_refused_naming_the_difference(data, vqa_run, tmp_path, change, named):
    annotations, images, model = tmp_path / "vqa.json", data / "images", tiny_pipeline_path()
    entries = json.loads((data / "vqa.json").read_text())
    if change == "annotations":  # the same file name, another content
        entries[0]["answer"] = ["something else"] * 10
    annotations.write_text(json.dumps(entries))
    if change == "images":
        images = tmp_path / "images"
        shutil.copytree(data / "images", images)
    if change == "model":
        model = tmp_path / "model"
        shutil.copytree(tiny_pipeline_path(), model)
    output = tmp_path / "out"
    shutil.copytree(vqa_run, output)
    settings = {"seed": 1 if change == "seed" else 0, "dtype": torch.bfloat16 if change == "dtype" else torch.float32}
    with pytest.raises(ValueError, match=f"other settings \\({named}"):
        evaluate_vqa(
            model,
            annotations=annotations,
            images=images,
            output=output,
            lemmatize=False,
            batch_size=1,
            limit=1,
            **settings,
        )


BAD_VQA = [
    (
        [
            {"question_id": 1, "image": "00000.png", "question": "q", "answer": ["a"]},
            {"question_id": 1, "image": "00001.png", "question": "r", "answer": ["b"]},
        ],
        r"entry 1 \(question_id 1\): duplicate 'question_id' \(entry 0 has it too\)",
    ),
    (
        [{"question_id": 1, "image": "00000.png", "question": None, "answer": ["a"]}],
        r"entry 0 \(question_id 1\): 'question' must be a str, got null",
    ),
    (
        [{"question_id": [1], "image": "00000.png", "question": "q", "answer": ["a"]}],
        r"entry 0 \(question_id \[1\]\): 'question_id' must be a int or str, got \[1\]",
    ),
    (
        [{"question_id": 1, "image": "00000.png", "question": "q", "answer": [3]}],
        r"entry 0 \(question_id 1\): 'answer' must be a list of str",
    ),
    (
        [{"question_id": 1, "image": "../caption.json", "question": "q", "answer": ["a"]}],
        r"entry 0 \(question_id 1\): the image '../caption.json' lies outside --images",
    ),
]


@pytest.mark.parametrize("entries, message", BAD_VQA)
def test_malformed_vqa_entries_are_named(data, tmp_path, entries, message):
    annotations = tmp_path / "bad.json"
    annotations.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=message):
        evaluate_vqa(
            NO_MODEL, annotations=annotations, images=data / "images", output=tmp_path / "out", lemmatize=False
        )


def test_malformed_caption_and_t2i_entries_are_named(data, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "00000.png", "image_id": 0}, {"image": "00001.png", "image_id": 0}]))
    with pytest.raises(ValueError, match=r"entry 1 \(image_id 0\): duplicate 'image_id'"):
        caption(data, tmp_path / "out", annotations=bad)
    bad.write_text(json.dumps({"annotations": [{"image_id": 0, "caption": "a"}, {"image_id": 1, "caption": 7}]}))
    with pytest.raises(ValueError, match=r"bad.json: entry 1: 'caption' must be a str, got 7"):
        caption(data, tmp_path / "out", ground_truth=bad)
    bad.write_text(json.dumps([{"caption": "a red circle"}, {"caption": None}]))
    with pytest.raises(ValueError, match=r"bad.json: entry 1: 'caption' \(or 'text'\) must be a str, got null"):
        evaluate_text_to_image(NO_MODEL, annotations=bad, output=tmp_path / "out", num_images=1)


def test_caption_metric_packages_are_checked_before_the_model(data, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java
    with pytest.raises(FileNotFoundError, match="caption metrics need Java on PATH"):
        caption(data, tmp_path / "out")
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(ImportError, match="caption metrics need pycocoevalcap"):
        caption(data, tmp_path / "out")


def test_model_defaults_to_the_embedded_demo_model(data, tmp_path):
    assert (
        main(
            [
                "evaluate",
                "vqa",
                "--annotations",
                str(data / "vqa.json"),
                "--images",
                str(data / "images"),
                "--no-lemmatize",
                "--limit",
                "1",
                "--batch-size",
                "1",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    recorded = json.loads((tmp_path / "out" / PARTIAL / RUN_CONFIG).read_text())
    assert recorded["model"] == str(Path(default_model_path()).resolve())
