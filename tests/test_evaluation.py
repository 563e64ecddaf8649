"""LaVIT's evaluations: metrics against hand-computed values and a scipy reference, bad input reported before the
model loads, resume, two processes, and each evaluation end to end on the tiny model and the converted fixture."""

import json
import os
import subprocess

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from conftest import TWO_PROCESS_LAUNCH

from lavit_pipelines.cli import main
from lavit_pipelines.evaluation import metrics
from lavit_pipelines.evaluation.captioning import evaluate_captioning
from lavit_pipelines.evaluation.runner import PARTIAL, start_run
from lavit_pipelines.evaluation.text_to_image import ClipRanker, evaluate_text_to_image, image_tensor
from lavit_pipelines.evaluation.vqa import clean_question, evaluate_vqa
from lavit_pipelines.tiny import build_tiny_tokenizer, tiny_pipeline_path
from lavit_pipelines.worlds.shapes import write_dataset

NO_MODEL = "/nonexistent/lavit-model"  # bad input must be reported before this is ever opened
SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST_T2I = {"num_inference_steps": 2, "max_new_tokens": 8, "min_new_tokens": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four shapes renders with LAVIS-style caption / VQA / text-to-image annotations and a COCO caption file."""
    root = tmp_path_factory.mktemp("data")
    meta = [
        json.loads(line)
        for line in (write_dataset(root / "images", 4, seed=5) / "metadata.jsonl").read_text().splitlines()
    ]
    files = {
        "caption.json": [{"image": m["file_name"], "image_id": i} for i, m in enumerate(meta)],
        "caption_gt.json": {
            "annotations": [{"image_id": i, "id": i, "caption": m["text"]} for i, m in enumerate(meta)]
        },
        "vqa.json": [
            {"question_id": 10 * i + j, "image": m["file_name"], "question": q, "answer": [a] * 10}
            for i, m in enumerate(meta)
            for j, (q, a) in enumerate(m["questions"][:2])
        ],
        "t2i.json": [{"caption": m["text"], "image": m["file_name"]} for m in meta],
    }
    for name, content in files.items():
        (root / name).write_text(json.dumps(content))
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random transformers CLIP with the tiny LaVIT tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class MeanColor(torch.nn.Module):
    """A tiny FID feature extractor: (B, 3, H, W) images in [0, 1] -> (B, 2) features of the mean colour."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3, 2)

    def forward(self, images):
        return self.proj(images.mean(dim=(2, 3)))


# ------------------------------------------------------------------ metrics


def test_vqa_accuracy_normalisation_and_leave_one_out():
    # 3 of 10 humans said "yes": leaving out a "yes" (3 subsets) leaves 2 matches -> 2/3, else 3 -> 1.
    assert metrics.vqa_accuracy("Yes!", ["yes"] * 3 + ["no"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    # one human said "2": the subset without it has 0 matches, the 9 others 1 match -> 1/3.
    assert metrics.vqa_accuracy("Two.", ["2"] + ["3"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert metrics.vqa_accuracy("three", ["3"] * 10) == 1.0
    # the human answers only get the punctuation step when they disagree
    assert metrics.vqa_accuracy("two", ["two"] * 10) == 0.0
    assert metrics.vqa_accuracy("It is a dog", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert metrics.vqa_accuracy("black-and-white", ["black and white"] * 2 + ["gray"] * 8) == pytest.approx(0.6)


def test_answer_normalisation_steps():
    assert metrics.process_punctuation("Hello, world!") == "hello world "  # ", " removed, "!" made a space
    assert metrics.process_punctuation("1,000 (approx)") == "1000 approx"  # a comma between digits: no spaces
    assert metrics.process_punctuation("3.5 m.") == "3.5 m"  # periods inside numbers kept
    assert metrics.process_digits_and_articles("the dont know ten") == "don't know 10"
    assert metrics.normalize_prediction("I don't know") == "unanswerable"
    assert metrics.normalize_prediction("") == "unanswerable"
    assert metrics.normalize_prediction("on the table") == "table"
    assert metrics.gqa_accuracy("The Left.", "left") == 1.0 and metrics.gqa_accuracy("right", "left") == 0.0
    assert clean_question('What is "this"? (A Cat!)  ') == "what is this? a cat"
    assert clean_question(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


def test_caption_scores_match_hand_computed_values():
    references = {1: ["x y"], 2: ["z w"]}
    scores = metrics.caption_scores(references, {1: "x q", 2: "z w"}, ("Bleu", "ROUGE_L", "CIDEr"))
    # CIDEr: idf = log 2 for every n-gram; image 1 shares 1 of 2 unigrams (cosine 1/2) and no bigram -> 10 * 0.5/4;
    # image 2 matches unigrams and bigrams (no 3-/4-grams) -> 10 * 2/4; mean (1.25 + 5) / 2.
    assert scores["CIDEr"] == pytest.approx(3.125, abs=1e-6)
    assert scores["Bleu_1"] == pytest.approx(3 / 4, abs=1e-6)  # 3 of 4 unigrams match
    assert scores["Bleu_2"] == pytest.approx((3 / 4 * 1 / 2) ** 0.5, abs=1e-6)  # 1 of 2 bigrams
    assert scores["ROUGE_L"] == pytest.approx((0.5 + 1) / 2, abs=1e-6)  # LCS 1 of 2 words, beta 1.2 -> 0.5
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    with pytest.raises(ValueError, match="caption metrics must be among"):
        metrics.caption_scores(references, {1: "x"}, ("BLEU",))


def test_fid_matches_a_scipy_reference():
    generator = torch.Generator().manual_seed(0)
    # images of one random colour each, plus noise; the fake colours are darker (squared)
    real = 0.8 * torch.rand(12, 3, 1, 1, generator=generator) + 0.2 * torch.rand(12, 3, 8, 8, generator=generator)
    fake = 0.8 * torch.rand(10, 3, 1, 1, generator=generator) ** 2 + 0.2 * torch.rand(10, 3, 8, 8, generator=generator)
    feature = MeanColor()
    fid = metrics.frechet_distance(metrics.fid_metric(feature), [real[:5], real[5:]], [fake])

    def statistics(images):
        with torch.no_grad():
            features = feature(images).double().numpy()
        return features.mean(axis=0), np.cov(features, rowvar=False)

    (mu1, s1), (mu2, s2) = statistics(real), statistics(fake)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid == pytest.approx(expected, rel=1e-5)
    assert fid > 1e-3 and metrics.frechet_distance(metrics.fid_metric(feature), [real], [real]) < 1e-6
    with pytest.raises(FileNotFoundError, match="Inception weights"):
        metrics.fid_metric("/nonexistent/inception.pth")


# ------------------------------------------------------------------ input checks, resume, processes


def test_bad_input_is_named_before_the_model_loads(data, tmp_path, capsys):
    images, out = data / "images", tmp_path / "out"
    missing_image = tmp_path / "missing.json"
    missing_image.write_text(json.dumps([{"image": "00000.png", "image_id": 0}, {"image": "nope.png", "image_id": 1}]))
    with pytest.raises(FileNotFoundError, match=r"missing.json: entry 1: no image file .*nope.png"):
        evaluate_captioning(
            NO_MODEL, annotations=missing_image, images=images, ground_truth=data / "caption_gt.json", output=out
        )
    no_key = tmp_path / "no_key.json"
    no_key.write_text(json.dumps([{"question_id": 1, "image": "00000.png", "answer": ["a"]}]))
    with pytest.raises(ValueError, match=r"no_key.json: entry 0 \(question_id 1\) has no 'question'"):
        evaluate_vqa(NO_MODEL, annotations=no_key, images=images, output=out, lemmatize=False)
    partial_gt = tmp_path / "gt.json"
    partial_gt.write_text(json.dumps({"annotations": [{"image_id": 0, "caption": "a"}]}))
    with pytest.raises(ValueError, match=r"gt.json has no caption for image id 1 \(3 ids uncovered\)"):
        evaluate_captioning(
            NO_MODEL, annotations=data / "caption.json", images=images, ground_truth=partial_gt, output=out
        )
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 0, "question": "q"}]}))
    with pytest.raises(ValueError, match="official VQA questions file: pass its annotations as --ground-truth"):
        evaluate_vqa(NO_MODEL, annotations=questions, images=images, output=out, lemmatize=False)
    with pytest.raises(ValueError, match="'answer' must be a str for gqa"):
        evaluate_vqa(NO_MODEL, annotations=data / "vqa.json", images=images, output=out, dataset="gqa", lemmatize=False)
    with pytest.raises(ValueError, match="needs a CLIP folder"):
        evaluate_text_to_image(NO_MODEL, annotations=data / "t2i.json", output=out)
    assert (
        main(["evaluate", "t2i", "--model", NO_MODEL, "--annotations", str(data / "t2i.json"), "--output", str(out)])
        == 2
    )
    assert "--inception-weights FILE, or --no-fid" in capsys.readouterr().err
    start_run(out, {"seed": 0})
    with pytest.raises(ValueError, match="other settings"):
        evaluate_captioning(
            NO_MODEL,
            annotations=data / "caption.json",
            images=images,
            ground_truth=data / "caption_gt.json",
            output=out,
        )
    assert not any(out.glob("*.json"))  # nothing written


def test_caption_run_resumes_after_an_interruption(data, tmp_path):
    out = tmp_path / "caption"
    evaluate_captioning(
        tiny_pipeline_path(),
        annotations=data / "caption.json",
        images=data / "images",
        ground_truth=data / "caption_gt.json",
        output=out,
        batch_size=1,
        limit=1,
        metrics=("Bleu", "CIDEr"),
    )
    # an interrupted run: image 0 done (its caption marked, to see that it is kept), the line of image 1 cut
    (out / PARTIAL / "predictions-rank0.jsonl").write_text(
        json.dumps({"image_id": 0, "caption": "a red circle"}) + '\n{"image_id": 1, "capt'
    )
    scores = evaluate_captioning(
        tiny_pipeline_path(),
        annotations=data / "caption.json",
        images=data / "images",
        ground_truth=data / "caption_gt.json",
        output=out,
        batch_size=1,
        limit=3,
        metrics=("Bleu", "CIDEr"),
    )
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == [0, 1, 2]
    assert predictions[0]["caption"] == "a red circle"  # kept, not recomputed
    lines = (out / PARTIAL / "predictions-rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["image_id"] for line in lines[2:]] == [1, 2]
    assert json.loads((out / "metrics.json").read_text()) == scores and set(scores) == {
        "Bleu_1",
        "Bleu_2",
        "Bleu_3",
        "Bleu_4",
        "CIDEr",
    }


def test_two_processes_give_the_predictions_of_one(data, tmp_path):
    args = [
        "evaluate",
        "vqa",
        "--model",
        str(tiny_pipeline_path()),
        "--annotations",
        str(data / "vqa.json"),
        "--images",
        str(data / "images"),
        "--batch-size",
        "1",
        "--no-lemmatize",
        "--limit",
        "4",
    ]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    launch = [
        *TWO_PROCESS_LAUNCH,
        "-m",
        "lavit_pipelines.cli",
        *args,
        "--output",
        str(tmp_path / "two"),
    ]
    result = subprocess.run(launch, capture_output=True, text=True, env={**SINGLE_THREAD, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-8000:]
    assert sorted(p.name for p in (tmp_path / "two" / PARTIAL).glob("*.jsonl")) == [
        "predictions-rank0.jsonl",
        "predictions-rank1.jsonl",
    ]
    one, two = ((tmp_path / name / "predictions.json").read_text() for name in ("one", "two"))
    assert one == two and len(json.loads(one)) == 4


# ------------------------------------------------------------------ end to end


def test_text_to_image_reranks_with_clip_and_scores_fid(data, clip_dir, tmp_path):
    out = tmp_path / "t2i"
    scores = evaluate_text_to_image(
        tiny_pipeline_path(),
        annotations=data / "t2i.json",
        output=out,
        images=data / "images",
        clip=clip_dir,
        fid_feature=MeanColor(),
        num_images=2,
        resolution=32,
        batch_size=2,
        limit=3,
        generation_kwargs=FAST_T2I,
    )
    records = json.loads((out / "predictions.json").read_text())
    assert [r["index"] for r in records] == [0, 1, 2] and scores["num_prompts"] == 3
    ranker = ClipRanker(clip_dir)
    for record in records:
        saved = PIL.Image.open(out / record["image"])
        assert record["clip_score"] == pytest.approx(
            100 * max(float(ranker.similarity([saved], record["caption"])[0]), 0), abs=1e-4
        )
    assert scores["clip_score"] == pytest.approx(sum(r["clip_score"] for r in records) / 3)
    real = torch.stack([image_tensor(PIL.Image.open(data / "images" / f"0000{i}.png"), 32) for i in range(3)])
    fake = torch.stack([image_tensor(PIL.Image.open(out / r["image"])) for r in records])
    assert scores["fid"] == pytest.approx(metrics.frechet_distance(metrics.fid_metric(MeanColor()), [real], [fake]))


def test_every_evaluation_runs_on_the_converted_checkpoint(converted_dir, data, tmp_path, capsys):
    common = ["--model", str(converted_dir), "--images", str(data / "images"), "--limit", "1"]
    assert (
        main(
            [
                "evaluate",
                "caption",
                *common,
                "--annotations",
                str(data / "caption.json"),
                "--ground-truth",
                str(data / "caption_gt.json"),
                "--metrics",
                "CIDEr",
                "ROUGE_L",
                "--output",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    assert set(json.loads(capsys.readouterr().out)) == {"CIDEr", "ROUGE_L"}
    assert (
        main(
            [
                "evaluate",
                "vqa",
                *common,
                "--annotations",
                str(data / "vqa.json"),
                "--dataset",
                "vizwiz",
                "--no-lemmatize",
                "--output",
                str(tmp_path / "v"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["num_questions"] == 1
    assert (
        main(
            [
                "evaluate",
                "t2i",
                *common,
                "--annotations",
                str(data / "t2i.json"),
                "--no-fid",
                "--num-images",
                "1",
                "--steps",
                "2",
                "--max-new-tokens",
                "8",
                "--output",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["num_prompts"] == 1
    assert [p.name for p in (tmp_path / "t" / "images").iterdir()] == ["00000.png"]
    assert (
        main(
            [
                "evaluate",
                "shapes",
                "--model",
                str(converted_dir),
                "--num-prompts",
                "1",
                "--num-scenes",
                "1",
                "--steps",
                "2",
                "--max-new-tokens",
                "8",
                "--output",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["num_prompts"] == 1


def test_vqa_reads_the_official_vizwiz_and_gqa_formats(data, tmp_path):
    from lavit_pipelines.evaluation.vqa import load_vqa_items

    image = data / "images" / "00000.png"
    (tmp_path / "COCO_val2014_000000000007.jpg").write_bytes(image.read_bytes())
    (tmp_path / "n7.jpg").write_bytes(image.read_bytes())
    files = {
        "questions.json": {
            "data_subtype": "val2014",
            "questions": [{"question_id": 70, "image_id": 7, "question": "What?"}],
        },
        "answers.json": {
            "annotations": [{"question_id": 70, "answers": [{"answer": "red", "answer_id": 1}], "answer_type": "other"}]
        },
        "vizwiz.json": [
            {"image": "n7.jpg", "question": "What?", "answers": [{"answer": "red", "answer_confidence": "yes"}]}
        ],
        "gqa.json": {"201": {"imageId": "n7", "question": "What?", "answer": "red"}},
    }
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    official = load_vqa_items(tmp_path / "questions.json", tmp_path, "vqav2", tmp_path / "answers.json")
    assert official == [
        {
            "question_id": 70,
            "path": str(tmp_path / "COCO_val2014_000000000007.jpg"),
            "question": "what?",
            "answer": ["red"],
            "answer_type": "other",
        }
    ]
    vizwiz = load_vqa_items(tmp_path / "vizwiz.json", tmp_path, "vizwiz")
    assert (vizwiz[0]["question_id"], vizwiz[0]["answer"], vizwiz[0]["path"]) == (0, ["red"], str(tmp_path / "n7.jpg"))
    gqa = load_vqa_items(tmp_path / "gqa.json", tmp_path, "gqa")
    assert (gqa[0]["question_id"], gqa[0]["answer"]) == ("201", "red")
    (tmp_path / "answers.json").write_text(
        json.dumps({"annotations": [{"question_id": 71, "answers": [{"answer": "red"}]}]})
    )
    with pytest.raises(ValueError, match="answers.json has no answers for question id 70"):
        load_vqa_items(tmp_path / "questions.json", tmp_path, "vqav2", tmp_path / "answers.json")
