"""Training of every stage on a tiny model and a few synthetic images: the loss goes down, the output is a
complete pipeline folder, a resumed run equals an uninterrupted one, bad input fails before training."""

import json
from pathlib import Path

import pytest
import torch

from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline
from lavit_pipelines.training import TrainingConfig, train


def read_logs(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "logs.jsonl").read_text().splitlines()]


def train_losses(output: Path) -> list[float]:
    return [row["loss"] for row in read_logs(output) if "loss" in row]


def assert_loss_goes_down(output: Path, window: int = 4) -> None:
    losses = train_losses(output)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert last < 0.8 * first, losses


@pytest.fixture(scope="module")
def tokenizer_run(training_base, training_data, tmp_path_factory) -> Path:
    return train(TrainingConfig(
        stage="visual-tokenizer", model=str(training_base), data=str(training_data),
        output=str(tmp_path_factory.mktemp("vt") / "out"), max_steps=16, batch_size=4, learning_rate=1e-3,
        checkpointing_steps=8, validation_steps=8,
    ))


def test_visual_tokenizer_training_reduces_the_loss_and_writes_a_pipeline(tokenizer_run, training_base):
    assert_loss_goes_down(tokenizer_run)
    logs = read_logs(tokenizer_run)
    assert [row["step"] for row in logs if "loss" in row] == list(range(1, 17))
    assert {"perplexity", "dead_codes", "keep_ratio", "reconstruction_loss"} <= set(logs[-2])
    assert [row["step"] for row in logs if "validation_loss" in row] == [8, 16]
    pipe = LavitText2ImagePipeline.from_pretrained(tokenizer_run, load_visual_tokenizer=True)
    base = LavitText2ImagePipeline.from_pretrained(training_base, load_visual_tokenizer=True)
    new, old = pipe.visual_tokenizer.state_dict(), base.visual_tokenizer.state_dict()
    assert not torch.equal(new["codebook.weight"], old["codebook.weight"])
    assert not torch.equal(new["token_predictor.input_proj.weight"], old["token_predictor.input_proj.weight"])
    for key in ("encoder.patch_embedding.weight", "understanding_merger.blocks.0.mlp.net.2.weight"):
        torch.testing.assert_close(new[key], old[key])  # frozen
    torch.testing.assert_close(pipe.pixel_decoder.codebook.weight, new["codebook.weight"])  # the decoder's copy
    torch.testing.assert_close(new["codebook.weight"].norm(dim=1), torch.ones(len(new["codebook.weight"])))
    LavitUnderstandingPipeline.from_pretrained(tokenizer_run)  # loads too
    assert (tokenizer_run / "checkpoint-8").is_dir() and (tokenizer_run / "checkpoint-16").is_dir()
