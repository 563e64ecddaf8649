"""Training does what it was asked or says why not (docs/safety.md): every setting checked before anything loads,
resuming that starts fresh only when there is nothing to resume and never retrains a finished run, checkpoints and
data files that are named when they cannot be used, and a run's output never read as data."""

import json
from pathlib import Path

import PIL.Image
import pytest

from lavit_pipelines.training import TrainingConfig, train
from lavit_pipelines.training.data import load_image_text_dataset


def config(model: Path, data: Path, output: Path, stage: str = "visual-tokenizer", **kwargs) -> TrainingConfig:
    settings = {"batch_size": 4, "learning_rate": 1e-3, "max_steps": 2, "kmeans_init": False, **kwargs}
    return TrainingConfig(stage=stage, model=str(model), data=str(data), output=str(output), **settings)


@pytest.fixture(scope="module")
def finished_run(training_base, training_data, tmp_path_factory) -> Path:
    return train(config(training_base, training_data, tmp_path_factory.mktemp("finished") / "out"))


BAD_SETTINGS = [
    ({"learning_rate": float("nan")}, "`learning_rate` must be a finite positive number"),
    ({"learning_rate": float("inf")}, "`learning_rate` must be a finite positive number"),
    ({"learning_rate": 0.0}, "`learning_rate` must be a finite positive number"),
    ({"weight_decay": float("nan")}, "`weight_decay` must be a finite non-negative number"),
    ({"max_grad_norm": float("inf")}, "`max_grad_norm` must be a finite non-negative number"),
    ({"gumbel_temperature": 0.0}, "`gumbel_temperature` must be a finite positive number"),
    ({"lora_alpha": -1.0}, "`lora_alpha` must be a finite positive number or None"),
    ({"lr_scheduler": "cosine_annealing"}, "`lr_scheduler` must be one of diffusers'"),
    ({"checkpoints_total_limit": -1}, "`checkpoints_total_limit` must be a non-negative integer or None"),
    ({"validation_steps": 0}, "`validation_steps` must be a positive integer or None"),
    ({"resolution": -64}, "`resolution` must be a positive integer or None"),
    ({"kmeans_iters": 0}, "`kmeans_iters` must be a positive integer"),
    ({"lr_warmup_steps": -1}, "`lr_warmup_steps` must be a non-negative integer"),
    ({"lora": True}, "`lora`: the visual-tokenizer stage trains no LoRA adapters"),
    ({"lora_target_modules": []}, "`lora_target_modules` must be a non-empty list"),
]


@pytest.mark.parametrize("settings, message", BAD_SETTINGS)
def test_every_setting_is_checked_when_the_config_is_made(training_base, training_data, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        config(training_base, training_data, tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_nan_learning_rate_on_one_line(training_base, training_data, tmp_path, capsys):
    from lavit_pipelines.cli import main

    argv = [
        "train",
        "pixel-decoder",
        "--model",
        str(training_base),
        "--data",
        str(training_data),
        "--output",
        str(tmp_path / "out"),
        "--learning-rate",
        "nan",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("lavit train: error: `learning_rate` must be a finite positive number") and err.count("\n") == 1
    )
    assert not (tmp_path / "out").exists()


def test_latest_without_a_checkpoint_says_so_and_starts_fresh(training_base, training_data, tmp_path, capsys):
    out = train(config(training_base, training_data, tmp_path / "out", max_steps=1, resume_from_checkpoint="latest"))
    err = capsys.readouterr().err
    assert err.count("holds no checkpoint; starting a new training run") == 1
    assert (out / "model_index.json").is_file()


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def test_resuming_a_finished_run_trains_and_rewrites_nothing(finished_run, training_base, training_data, capsys):
    before = snapshot(finished_run)
    again = config(training_base, training_data, finished_run, resume_from_checkpoint="latest")
    assert train(again) == finished_run
    assert "already reached max_steps=2: nothing to train" in capsys.readouterr().err
    assert snapshot(finished_run) == before


def test_a_checkpoint_of_another_stage_is_named(finished_run, training_data, tmp_path):
    with pytest.raises(
        ValueError, match=r"checkpoint-2 is a checkpoint of the visual-tokenizer stage .*not of pixel-decoder"
    ):
        train(
            config(
                finished_run,
                training_data,
                tmp_path / "out",
                stage="pixel-decoder",
                max_steps=3,
                resume_from_checkpoint=str(finished_run / "checkpoint-2"),
            )
        )


def copied_checkpoint(finished_run: Path, tmp_path: Path) -> Path:
    """The finished run's last checkpoint alone in a new folder (no training config beside it)."""
    checkpoint = tmp_path / "elsewhere" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    for path in (finished_run / "checkpoint-2").iterdir():
        (checkpoint / path.name).write_bytes(path.read_bytes())
    return checkpoint


def test_a_checkpoint_of_another_model_is_named(finished_run, training_data, tmp_path):
    checkpoint = copied_checkpoint(finished_run, tmp_path)
    with pytest.raises(ValueError, match=r"model.safetensors holds the weights of another model than this run trains"):
        train(
            config(
                finished_run,
                training_data,
                tmp_path / "out",
                stage="pixel-decoder",
                max_steps=3,
                resume_from_checkpoint=str(checkpoint),
            )
        )


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_a_truncated_checkpoint_file_is_named(finished_run, training_base, training_data, tmp_path, name):
    checkpoint = copied_checkpoint(finished_run, tmp_path)
    path = checkpoint / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"`resume_from_checkpoint`: .*{name}"):
        train(
            config(training_base, training_data, tmp_path / "out", max_steps=3, resume_from_checkpoint=str(checkpoint))
        )


def data_folder(training_data: Path, tmp_path: Path, lines: list[bytes]) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "0.png").write_bytes((training_data / "0.png").read_bytes())
    (data / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return data


GOOD = b'{"file_name": "0.png", "text": "a car"}'


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"file_name": "0.png", "text": "caf\xe9"}'.encode("latin-1"), "metadata.jsonl:2: not UTF-8 text"),
        (
            b'{"file_name": "../0.png", "text": "a car"}',
            "metadata.jsonl:2: the image '../0.png' lies outside the data folder",
        ),
        (
            b'{"file_name": "/etc/hostname", "text": "a car"}',
            "metadata.jsonl:2: the image '/etc/hostname' lies outside",
        ),
        (b'{"file_name": "out.png", "text": "a car"}', "metadata.jsonl:2: the image 'out.png' lies outside"),
    ],
)
def test_bad_metadata_lines_are_named(training_base, training_data, tmp_path, line, message):
    data = data_folder(training_data, tmp_path, [GOOD, line])
    outside = tmp_path / "secret.png"
    outside.write_bytes((training_data / "1.png").read_bytes())
    (data / "out.png").symlink_to(outside)
    with pytest.raises(ValueError, match=message):
        train(config(training_base, data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("limit", [3000, 1000])  # 64² = 4096 pixels: PIL warns above the limit, refuses above twice it
def test_an_image_over_the_decompression_bomb_limit_is_named(
    training_base, training_data, tmp_path, monkeypatch, limit
):
    data = data_folder(training_data, tmp_path, [GOOD])
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: .*0.png.* is not a readable image .*decompression"):
        train(config(training_base, data, tmp_path / "out"))


def test_a_run_written_inside_its_data_folder_is_not_read_as_data(training_base, training_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for path in training_data.iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    train(
        config(
            training_base,
            data,
            data / "run",
            stage="pixel-decoder",
            max_steps=1,
            validation_steps=1,
            validation_inference_steps=1,
        )
    )
    assert list((data / "run").rglob("*.png"))  # validation images are there
    dataset = load_image_text_dataset(str(data))
    assert len(dataset) == 8 and sorted(dataset["text"]) == sorted(
        json.loads(line)["text"] for line in (data / "metadata.jsonl").read_text().splitlines()
    )
