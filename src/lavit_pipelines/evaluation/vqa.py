"""Zero-shot VQA (VQAv2, OK-VQA, VizWiz, GQA) as in LaVIT's `evaluate_vqa.py`: BLIP-2's question clean-up, the
prompt "Question: {} Answer:", 5 beams, 2–10 new tokens, length penalty 0, the original's answer post-processing
and spaCy lemmatisation (`LavitUnderstandingPipeline.answer`); VizWiz first asks whether the question is
answerable. Scored with the official VQA accuracy (GQA: exact match)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..pipelines.understanding import lemmatize_answers, load_lemmatizer
from .metrics import gqa_accuracy, vqa_accuracy
from .runner import (
    check_entries,
    check_output_folder,
    load_understanding,
    read_json,
    run_sharded,
    start_run,
    understanding_record,
    write_json,
)

DATASETS = ("vqav2", "okvqa", "vizwiz", "gqa")
VIZWIZ_JUDGE_PROMPT = 'Is the question: "{}" answerable?'
MAX_QUESTION_WORDS = 50


def clean_question(question: str) -> str:
    """BLIP-2's question pre-processing: lowercase, drop . ! " ( ) * # : ; ~, strip trailing spaces, at most 50 words."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    return " ".join(question.split(" ")[:MAX_QUESTION_WORDS])


def _official_items(questions: dict, questions_path, ground_truth) -> list[dict]:
    """The official VQA pair: questions `{"questions": [{"question_id", "image_id", "question"}], "data_subtype"}` and
    annotations `{"annotations": [{"question_id", "answers": [{"answer"}], "answer_type"?}]}`; images are
    `COCO_{data_subtype}_{image_id:012d}.jpg` in `images`."""
    if ground_truth is None:
        raise ValueError(f"{questions_path} is an official VQA questions file: pass its annotations as --ground-truth")
    annotations = read_json(ground_truth, "--ground-truth")
    if not isinstance(annotations, dict) or "annotations" not in annotations:
        raise ValueError(f"{ground_truth}: expected an official VQA annotation file with an 'annotations' list")
    check_entries(
        questions["questions"],
        {"question_id": int, "image_id": int, "question": str},
        questions_path,
        key="question_id",
    )
    check_entries(annotations["annotations"], {"question_id": int, "answers": list}, ground_truth, key="question_id")
    by_id = {entry["question_id"]: entry for entry in annotations["annotations"]}
    subtype = questions.get("data_subtype", "val2014")
    entries = []
    for entry in questions["questions"]:
        if entry["question_id"] not in by_id:
            raise ValueError(f"{ground_truth} has no answers for question id {entry['question_id']}")
        annotation = by_id[entry["question_id"]]
        entries.append(
            {
                **entry,
                "image": f"COCO_{subtype}_{entry['image_id']:012d}.jpg",
                "answer": [a["answer"] for a in annotation["answers"]],
                "answer_type": annotation.get("answer_type"),
            }
        )
    return entries


def _vizwiz_items(entries: list, path) -> list[dict]:
    """VizWiz's own format `[{"image", "question", "answers": [{"answer", ...}], "answer_type"}]`: question ids
    are the entry indices."""
    check_entries(entries, {"image": str, "question": str, "answers": list}, path)
    return [
        {**e, "question_id": e.get("question_id", i), "answer": [a["answer"] for a in e["answers"]]}
        for i, e in enumerate(entries)
    ]


def _gqa_items(questions: dict) -> list[dict]:
    """GQA's own format `{question_id: {"imageId", "question", "answer"}}`; images are `{imageId}.jpg`."""
    return [
        {"question_id": qid, "image": f"{q['imageId']}.jpg", "question": q["question"], "answer": q["answer"]}
        for qid, q in questions.items()
    ]


def load_vqa_items(
    annotations: str | Path, images: str | Path, dataset: str, ground_truth: str | Path | None = None
) -> list[dict]:
    """`[{"question_id", "path", "question" (cleaned), "answer" (list of strings; GQA: one string), "answer_type"}]`
    from LAVIS-format annotations `[{"question_id", "image", "question", "answer"}]`, the official VQA pair
    (VQAv2, OK-VQA), VizWiz's or GQA's own files; every image checked."""
    if dataset not in DATASETS:
        raise ValueError(f"`dataset` must be one of {DATASETS}, got {dataset!r}")
    images = Path(images)
    data = read_json(annotations, "--annotations")
    if isinstance(data, dict) and "questions" in data:
        entries = _official_items(data, annotations, ground_truth)
    elif isinstance(data, dict) and all(isinstance(q, dict) and "imageId" in q for q in data.values()):
        entries = _gqa_items(data)
    elif (
        isinstance(data, list)
        and data
        and isinstance(data[0], dict)
        and "answer" not in data[0]
        and "answers" in data[0]
    ):
        entries = _vizwiz_items(data, annotations)
    else:
        entries = data
    check_entries(
        entries,
        {"question_id": (int, str), "image": str, "question": str, "answer": (list, str)},
        annotations,
        images,
        key="question_id",
    )
    expected = str if dataset == "gqa" else list
    for index, entry in enumerate(entries):
        answers = [entry["answer"]] if isinstance(entry["answer"], str) else entry["answer"]
        if not isinstance(entry["answer"], expected) or not all(isinstance(answer, str) for answer in answers):
            raise ValueError(
                f"{annotations}: entry {index} (question_id {entry['question_id']!r}): 'answer' must be a "
                f"{'str' if expected is str else 'list of str'} for {dataset}"
            )
    return [
        {
            "question_id": e["question_id"],
            "path": str(images / e["image"]),
            "question": clean_question(e["question"]),
            "answer": e["answer"],
            "answer_type": e.get("answer_type"),
        }
        for e in entries
    ]


def answer_batch(pipe, batch: list[dict], generator: torch.Generator, lemmatize: bool, vizwiz: bool) -> list[str]:
    """The original's answers to a batch; with `vizwiz`, "unanswerable" where the model's judgement of the question
    contains "no"."""
    paths, questions = [item["path"] for item in batch], [item["question"] for item in batch]
    if vizwiz:
        judgements = pipe.answer(
            paths, [VIZWIZ_JUDGE_PROMPT.format(q) for q in questions], lemmatize=lemmatize, generator=generator
        )
    answers = pipe.answer(paths, questions, lemmatize=lemmatize, generator=generator)
    if vizwiz:
        answers = ["unanswerable" if "no" in judgement.lower() else a for a, judgement in zip(answers, judgements)]
    return answers


def vqa_metrics(items: list[dict], answers: dict, dataset: str, lemmatizer=None) -> dict[str, float]:
    """`accuracy` in percent (and `accuracy/<answer type>` where known). With a `lemmatizer`, the ground-truth
    answers are lemmatised like the predictions (the original scores against lemmatised annotation files)."""

    def truth(item):
        if lemmatizer is None:
            return item["answer"]
        lemmatized = lemmatize_answers([item["answer"]] if dataset == "gqa" else item["answer"], lemmatizer)
        return lemmatized[0] if dataset == "gqa" else lemmatized

    score = gqa_accuracy if dataset == "gqa" else vqa_accuracy
    per_type = {}
    for item in items:
        accuracy = score(answers[item["question_id"]], truth(item))
        per_type.setdefault(None, []).append(accuracy)
        if item["answer_type"] is not None:
            per_type.setdefault(item["answer_type"], []).append(accuracy)
    return {
        ("accuracy" if kind is None else f"accuracy/{kind}"): 100.0 * sum(values) / len(values)
        for kind, values in per_type.items()
    }


def evaluate_vqa(
    model_path: str | Path,
    *,
    annotations: str | Path,
    images: str | Path,
    output: str | Path,
    dataset: str = "vqav2",
    ground_truth: str | Path | None = None,
    lemmatize: bool = True,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    limit: int | None = None,
) -> dict | None:
    """Answer every question of `annotations` (the first `limit`), write `output/predictions.json`
    (`[{"question_id", "answer"}]`) and `output/metrics.json`; returns the metrics on the main process, None on the
    others. `lemmatize=False` skips spaCy (a deviation from the original, recorded in the metrics)."""
    check_output_folder(output, {"--annotations": annotations, "--ground-truth": ground_truth, "--images": images})
    items = load_vqa_items(annotations, images, dataset, ground_truth)[:limit]
    try:
        lemmatizer = load_lemmatizer() if lemmatize else None
    except (ImportError, ValueError) as error:
        raise type(error)(f"{error} (or skip it, a deviation from the original: --no-lemmatize)") from error
    config = understanding_record(
        "vqa",
        model_path,
        images,
        annotations,
        ground_truth,
        seed,
        dtype,
        batch_size,
        dataset=dataset,
        lemmatize=lemmatize,
    )
    output = start_run(output, config)
    pipe = load_understanding(model_path, device, dtype)
    pipe.set_progress_bar_config(disable=True)

    def predict(batch: list[dict], start: int) -> list[dict]:
        answers = answer_batch(pipe, batch, torch.Generator().manual_seed(seed + start), lemmatize, dataset == "vizwiz")
        return [{"question_id": item["question_id"], "answer": answer} for item, answer in zip(batch, answers)]

    records = run_sharded(items, "question_id", predict, output, batch_size)
    if records is None:
        return None
    write_json(output / "predictions.json", records)
    metrics = {
        **vqa_metrics(items, {r["question_id"]: r["answer"] for r in records}, dataset, lemmatizer),
        "lemmatized": lemmatize,
        "num_questions": len(records),
    }
    write_json(output / "metrics.json", metrics)
    return metrics
