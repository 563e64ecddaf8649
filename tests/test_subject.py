"""Subject fine-tuning: the new word's embedding round trip, the sampler's suppression of added ids, the
prior-preservation weighting, option errors, and `lavit train subject` end to end on the tiny training base."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline
from lavit_pipelines.cli import main
from lavit_pipelines.training import TrainingConfig, train
from lavit_pipelines.training.data import PRIOR
from lavit_pipelines.training.language_model import LanguageModelTrainingModule
from lavit_pipelines.training.subject import SubjectConfig


def read_logs(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "logs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def subject_data(tmp_path_factory) -> Path:
    """Four tiny images captioned with the new word."""
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path_factory.mktemp("subject") / "data", count=4)
    lines = [json.dumps({"file_name": f"{i}.png", "text": f"a sks car number {i}"}) for i in range(4)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def subject_run(training_base, subject_data, training_data, tmp_path_factory) -> Path:
    return train(
        TrainingConfig(
            stage="language-model",
            model=str(training_base),
            data=str(subject_data),
            batch_size=4,
            learning_rate=1e-2,
            output=str(tmp_path_factory.mktemp("subject-run") / "out"),
            max_steps=3,
            lora=True,
            placeholder_token="sks",
            initializer_token="red car",
            class_data=str(training_data),
            understanding_ratio=0.0,
        )
    )


@pytest.mark.parametrize("pipeline_cls", [LavitText2ImagePipeline, LavitUnderstandingPipeline])
def test_the_new_word_round_trips_into_a_fresh_pipeline(subject_run, training_base, pipeline_cls):
    trained = LavitText2ImagePipeline.from_pretrained(subject_run)
    vocab = LavitText2ImagePipeline.from_pretrained(training_base).language_model.config.vocab_size
    token_id = trained.tokenizer.convert_tokens_to_ids("sks")
    assert token_id == vocab  # after [text][IMG][/IMG][visual codes]
    row = trained.language_model.get_input_embeddings().weight[token_id]
    torch.testing.assert_close(load_file(subject_run / "learned_embeds.safetensors")["sks"], row, rtol=0, atol=0)
    initial = (
        trained.language_model.get_input_embeddings()
        .weight[trained.tokenizer("red car", add_special_tokens=False).input_ids]
        .mean(0)
    )
    assert (row - initial).abs().max() > 1e-4  # trained away from "red car"

    fresh = pipeline_cls.from_pretrained(training_base)
    fresh.load_lora_weights(subject_run)
    assert fresh.load_textual_inversion(subject_run) == [token_id]
    assert (
        fresh.tokenizer("a sks car", add_special_tokens=False).input_ids
        == trained.tokenizer("a sks car", add_special_tokens=False).input_ids
    )
    torch.testing.assert_close(fresh.language_model.get_input_embeddings().weight[token_id], row, rtol=0, atol=0)
    assert fresh.language_model.lavit_token_id_range == trained.language_model.lavit_token_id_range
    with pytest.raises(ValueError, match="already in tokenizer vocabulary"):
        fresh.load_textual_inversion(subject_run)


@pytest.mark.parametrize("pipeline_cls", [LavitText2ImagePipeline, LavitUnderstandingPipeline])
def test_unload_textual_inversion_gives_back_the_base_tokenizer_and_embeddings_bit_for_bit(
    subject_run, training_base, pipeline_cls
):
    base = pipeline_cls.from_pretrained(training_base)
    vocab = base.language_model.config.vocab_size
    pipe = pipeline_cls.from_pretrained(training_base)
    second = torch.randn(pipe.language_model.config.hidden_size)
    assert pipe.load_textual_inversion(subject_run) == [vocab]
    assert pipe.load_textual_inversion({"zzw": second}) == [vocab + 1]
    pipe.unload_textual_inversion("sks")  # the later word moves down, its embedding with it
    assert "sks" not in pipe.tokenizer.get_vocab() and pipe.tokenizer.convert_tokens_to_ids("zzw") == vocab
    assert pipe.tokenizer("a zzw car", add_special_tokens=False).input_ids[1] == vocab
    torch.testing.assert_close(pipe.language_model.get_input_embeddings().weight[vocab], second, rtol=0, atol=0)
    assert pipe.language_model.config.vocab_size == vocab + 1
    with pytest.raises(ValueError, match=r"\['sks'\] are not words added after the language model's vocabulary"):
        pipe.unload_textual_inversion("sks")

    trained = pipeline_cls.from_pretrained(subject_run)  # a fine-tune's folder: the word is part of it
    for unloaded in (pipe, trained):
        unloaded.unload_textual_inversion()
        assert unloaded.tokenizer.get_vocab() == base.tokenizer.get_vocab()
        text = "a sks car"
        assert unloaded.tokenizer(text).input_ids == base.tokenizer(text).input_ids
        state, expected = unloaded.language_model.state_dict(), base.language_model.state_dict()
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
        assert unloaded.language_model.config.vocab_size == vocab


def test_decoder_class_examples_weigh_prior_loss_weight(training_base):
    """The pixel-decoder stage's loss on the same batch (two subject, two class examples) at weights 0, 1 and 3."""
    from diffusers import DDPMScheduler

    from lavit_pipelines.training.pixel_decoder import PixelDecoderTrainingModule

    pipe = LavitText2ImagePipeline.from_pretrained(training_base)
    components = {name: getattr(pipe, name) for name in ("visual_tokenizer", "pixel_decoder", "unet", "vae")}
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    batch = {
        "pixel_values": torch.randn(4, 3, 56, 56),
        "vae_pixel_values": torch.randn(4, 3, 64, 64),
        "index": torch.arange(4),
        PRIOR: torch.tensor([False, True, False, True]),
    }

    def loss(weight: float) -> torch.Tensor:
        module = PixelDecoderTrainingModule(components, scheduler, 0.0, prior_loss_weight=weight)
        with torch.no_grad():
            return module(batch, [torch.Generator().manual_seed(i) for i in range(4)], 0)["loss"]

    zero, one, three = loss(0.0), loss(1.0), loss(3.0)
    assert one - zero > 1e-4  # the class examples count
    torch.testing.assert_close(three - one, 2 * (one - zero))  # and weigh prior_loss_weight each


def test_text_to_image_never_samples_an_added_or_text_id_after_img(subject_run):
    """The added word's and every text id's logits are raised far above the visual ids' (a forward hook): the
    sampler must still draw only visual ids (and [/IMG]) after [IMG]; each of the 12 steps gives a visual code."""
    pipe = LavitText2ImagePipeline.from_pretrained(subject_run)
    lm = pipe.language_model
    assert list(lm.added_token_id_range) == [pipe.tokenizer.convert_tokens_to_ids("sks")]
    forbidden = [*range(3, lm.config.text_vocab_size), *lm.added_token_id_range]

    visual = lm.config.visual_token_id_range

    def favour_forbidden(module, args, output):
        output.logits[..., visual.start : visual.stop] += 100
        output.logits[..., forbidden] += 200
        return output

    handle = lm.register_forward_hook(favour_forbidden)
    try:
        codes = pipe.generate_visual_tokens(
            ["a sks car", "a red car"], min_new_tokens=12, max_new_tokens=12, generator=torch.Generator().manual_seed(0)
        )
    finally:
        handle.remove()
    assert [len(row) for row in codes] == [12, 12]
    assert all(int(c) < lm.config.visual_vocab_size for row in codes for c in row)


def test_class_examples_weigh_prior_loss_weight_per_token(training_base, subject_data):
    """The same batch (two subject and two class examples) at weights 0, 1 and 3: the class tokens count, and
    count `prior_loss_weight` times."""
    pipe = LavitText2ImagePipeline.from_pretrained(training_base)
    texts = ["a sks car", "a red car number 1", "a blue car", "a car number 3"]
    batch = {"pixel_values": torch.randn(4, 3, 56, 56), "text": texts, PRIOR: torch.tensor([False, True, False, True])}

    def loss(weight: float) -> dict:
        config = TrainingConfig(
            stage="language-model",
            model=str(training_base),
            data=str(subject_data),
            output="unused",
            understanding_ratio=0.0,
            text_dropout=0.0,
            prior_loss_weight=weight,
        )
        module = LanguageModelTrainingModule(pipe.language_model, pipe.visual_tokenizer, pipe.tokenizer, config)
        with torch.no_grad():
            return module(batch, [torch.Generator().manual_seed(i) for i in range(4)], 0)

    zero, one, three = loss(0.0), loss(1.0), loss(3.0)
    assert one["prior_loss"] > 0 and one["loss"] - zero["loss"] > 1e-3  # the class examples are not ignored
    torch.testing.assert_close(three["loss"] - one["loss"], 2 * (one["loss"] - zero["loss"]))  # and weighted
    torch.testing.assert_close(one["loss"], one["visual_loss"])  # weight 1: the plain mean over every token


def test_subject_options_are_checked_before_any_model_loads(training_base, subject_data, training_data, tmp_path):
    def config(**kwargs):
        settings = {
            "stage": "language-model",
            "model": str(training_base),
            "data": str(subject_data),
            "output": str(tmp_path / "out"),
            **kwargs,
        }
        return TrainingConfig(**settings)

    with pytest.raises(ValueError, match="`placeholder_token` and `initializer_token` go together"):
        config(placeholder_token="sks")
    with pytest.raises(ValueError, match="`placeholder_token` must be one word"):
        config(placeholder_token="s ks", initializer_token="car")
    with pytest.raises(ValueError, match="`textual_inversion` trains the new word's embedding alone"):
        config(placeholder_token="sks", initializer_token="car", textual_inversion=True, lora=True)
    with pytest.raises(ValueError, match="`class_data` is an option of the pixel-decoder and language-model stages"):
        config(stage="visual-tokenizer", class_data=str(training_data))
    with pytest.raises(ValueError, match="`train_pixel_decoder` False trains nothing"):
        config(stage="pixel-decoder", train_pixel_decoder=False)
    with pytest.raises(ValueError, match="`prior_loss_weight` must be >= 0"):
        config(prior_loss_weight=-1.0)
    with pytest.raises(ValueError, match="placeholder token 'red' must be a new word"):
        train(config(placeholder_token="red", initializer_token="car"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="does not contain the word 'sks'"):
        SubjectConfig(
            model=str(training_base),
            images=str(training_data),
            token="sks",
            class_word="car",
            output=str(tmp_path / "out"),
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--token", "s ks"], "`token` must be one word without spaces"),
        (["--max-steps", "0"], "`max_steps` must be a positive integer"),
        (["--decoder-steps", "0"], "`decoder_steps` must be a positive integer"),
        (["--decoder-learning-rate", "0"], "`decoder_learning_rate` must be positive"),
        (["--caption", "a photo"], "`caption` must contain '{token}'"),
        (["--images", "nowhere"], "`images`: 'nowhere' is not a folder"),
        (["--token", "red"], "`token`: 'red' is already a word of"),
    ],
)
def test_cli_subject_names_bad_options_in_one_line(training_base, subject_data, tmp_path, capsys, args, message):
    argv = [
        "train",
        "subject",
        "--model",
        str(training_base),
        "--images",
        str(subject_data.parent / "plain"),
        "--token",
        "sks",
        "--class-word",
        "car",
        "--output",
        str(tmp_path / "out"),
        *args,
    ]
    (subject_data.parent / "plain").mkdir(exist_ok=True)
    (subject_data.parent / "plain" / "0.png").write_bytes((subject_data / "0.png").read_bytes())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def subject_images(training_data: Path, folder: Path) -> Path:
    """Three plain images (no metadata: the command captions them)."""
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes((training_data / f"{i}.png").read_bytes())
    return folder


def test_cli_train_subject_with_lora_draws_class_examples_and_trains_them(
    training_base, training_data, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = [
        "train",
        "subject",
        "--model",
        str(training_base),
        "--images",
        str(subject_images(training_data, tmp_path / "imgs")),
        "--token",
        "sks",
        "--class-word",
        "car",
        "--output",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--num-class-images",
        "2",
        "--prior-loss-weight",
        "0.5",
        "--lora",
        "--keep-checkpoint",
    ]
    assert main(argv) == 0
    assert [p.name for p in (out / "model").glob("checkpoint-*")] == ["checkpoint-2"]
    assert capsys.readouterr().out.strip() == str(out / "model")
    instance = [json.loads(line) for line in (out / "instance-data" / "metadata.jsonl").read_text().splitlines()]
    assert [row["text"] for row in instance] == ["a sks"] * 3
    classes = [json.loads(line) for line in (out / "class-data" / "metadata.jsonl").read_text().splitlines()]
    assert [row["text"] for row in classes] == ["a car"] * 2 and len(list((out / "class-data").glob("*.png"))) == 2
    settings = json.loads((out / "model" / "training_config.json").read_text())
    assert settings["placeholder_token"] == "sks" and settings["prior_loss_weight"] == 0.5 and settings["lora"]
    assert settings["understanding_ratio"] == 0.0 and settings["class_data"] == str(out / "class-data")
    logs = read_logs(out / "model")
    assert [row["step"] for row in logs] == [1, 2] and any(row["prior_loss"] > 0 for row in logs)  # 5 examples, batch 4
    pipe = LavitText2ImagePipeline.from_pretrained(training_base)
    pipe.load_textual_inversion(out / "model")
    pipe.load_lora_weights(out / "model")
    image = pipe("a sks", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_cli_train_subject_by_default_trains_the_word_alone(training_base, training_data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "train",
        "subject",
        "--model",
        str(training_base),
        "--images",
        str(subject_images(training_data, tmp_path / "imgs")),
        "--token",
        "sks",
        "--class-word",
        "car",
        "--output",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "3",
    ]
    assert main(argv) == 0
    settings = json.loads((out / "model" / "training_config.json").read_text())
    assert settings["textual_inversion"] and not settings["lora"] and settings["class_data"] is None
    assert not list((out / "model").glob("checkpoint-*"))  # no resumable state left behind unless asked
    assert not (out / "class-data").exists() and not (out / "model" / "pytorch_lora_weights.safetensors").exists()
    pipe = LavitText2ImagePipeline.from_pretrained(out / "model")
    base = LavitText2ImagePipeline.from_pretrained(training_base)
    token_id = base.language_model.config.vocab_size
    assert pipe.tokenizer("a sks", add_special_tokens=False).input_ids[-1] == token_id
    trained, old = pipe.language_model.state_dict(), base.language_model.state_dict()
    for key, value in old.items():  # every other weight unchanged
        torch.testing.assert_close(trained[key][: len(value)], value, rtol=0, atol=0)
    learned = load_file(out / "model" / "learned_embeds.safetensors")["sks"]
    torch.testing.assert_close(trained["model.embed_tokens.weight"][token_id], learned, rtol=0, atol=0)
    prompts = ["a red car", "a photo of a blue car"]  # without the word: the same draws as the base model's
    before, after = (
        p.generate_visual_tokens(prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)])
        for p in (base, pipe)
    )
    assert all(torch.equal(b, a) for b, a in zip(before, after)) and min(map(len, before)) > 1


def test_cli_train_subject_with_decoder_adds_a_cross_attention_lora_trained_with_the_class_examples(
    training_base, training_data, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = [
        "train",
        "subject",
        "--model",
        str(training_base),
        "--images",
        str(subject_images(training_data, tmp_path / "imgs")),
        "--token",
        "sks",
        "--class-word",
        "car",
        "--output",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--num-class-images",
        "2",
        "--decoder",
        "--decoder-steps",
        "2",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out / "model")
    word = json.loads((out / "language-model" / "training_config.json").read_text())
    assert word["textual_inversion"] and word["class_data"] is None  # the word alone: class examples change nothing
    decoder = json.loads((out / "model" / "training_config.json").read_text())
    assert decoder["stage"] == "pixel-decoder" and decoder["class_data"] == str(out / "class-data")
    assert decoder["model"] == str(out / "language-model") and not decoder["train_pixel_decoder"]
    assert [row["step"] for row in read_logs(out / "model")] == [1, 2]  # 5 examples, batch 4
    lora = load_file(out / "model" / "pytorch_lora_weights.safetensors")
    assert lora and all(key.startswith("unet.") and ".attn2.to_" in key for key in lora)
    assert {key.split(".attn2.")[1].split(".")[0] for key in lora} == {"to_k", "to_v"}
    assert not list(out.glob("*/checkpoint-*"))
    base = LavitText2ImagePipeline.from_pretrained(training_base)
    trained = LavitText2ImagePipeline.from_pretrained(out / "model")
    for name in ("pixel_decoder", "unet"):  # the LoRA file holds the whole change
        for key, value in getattr(base, name).state_dict().items():
            torch.testing.assert_close(getattr(trained, name).state_dict()[key], value, rtol=0, atol=0)
    base.load_textual_inversion(out / "model")
    base.load_lora_weights(out / "model")
    image = base("a sks", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
