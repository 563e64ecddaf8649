"""Training of every stage on a tiny model and a few synthetic images: the loss goes down, the output is a
complete pipeline folder, a resumed run equals an uninterrupted one, bad input fails before training."""

import json
import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch
from conftest import TWO_PROCESS_LAUNCH

from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline
from lavit_pipelines.training import TrainingConfig, train


def read_logs(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "logs.jsonl").read_text().splitlines()]


def train_losses(output: Path) -> list[float]:
    return [row["loss"] for row in read_logs(output) if "loss" in row]


def assert_loss_goes_down(output: Path, window: int = 4, factor: float = 0.8) -> None:
    """The mean of the last `window` losses is below `factor` times the mean of the first `window`."""
    losses = train_losses(output)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert last < factor * first, losses


@pytest.fixture(scope="module")
def tokenizer_run(training_base, training_data, tmp_path_factory) -> Path:
    return train(
        TrainingConfig(
            stage="visual-tokenizer",
            model=str(training_base),
            data=str(training_data),
            output=str(tmp_path_factory.mktemp("vt") / "out"),
            max_steps=16,
            batch_size=4,
            learning_rate=1e-3,
            checkpointing_steps=8,
            validation_steps=8,
            validation_inference_steps=2,
            report_to="tensorboard",
        )
    )


def test_visual_tokenizer_training_reduces_the_loss_and_writes_a_pipeline(tokenizer_run, training_base):
    assert_loss_goes_down(tokenizer_run)
    logs = read_logs(tokenizer_run)
    assert [row["step"] for row in logs if "loss" in row] == list(range(1, 17))
    assert {"perplexity", "dead_codes", "keep_ratio", "reconstruction_loss"} <= set(logs[-2])
    validation = {row["step"]: row["validation_loss"] for row in logs if "validation_loss" in row}
    assert list(validation) == [0, 8, 16] and validation[16] < validation[0]
    pipe = LavitText2ImagePipeline.from_pretrained(tokenizer_run)
    base = LavitText2ImagePipeline.from_pretrained(training_base)
    new, old = pipe.visual_tokenizer.state_dict(), base.visual_tokenizer.state_dict()
    assert not torch.equal(new["codebook.weight"], old["codebook.weight"])
    assert not torch.equal(new["token_predictor.input_proj.weight"], old["token_predictor.input_proj.weight"])
    for key in ("encoder.patch_embedding.weight", "understanding_merger.blocks.0.mlp.net.2.weight"):
        torch.testing.assert_close(new[key], old[key])  # frozen
    torch.testing.assert_close(pipe.pixel_decoder.codebook.weight, new["codebook.weight"])  # the decoder's copy
    torch.testing.assert_close(new["codebook.weight"].norm(dim=1), torch.ones(len(new["codebook.weight"])))
    LavitUnderstandingPipeline.from_pretrained(tokenizer_run)  # loads too
    assert (tokenizer_run / "checkpoint-8").is_dir() and (tokenizer_run / "checkpoint-16").is_dir()


def test_a_run_can_be_watched_in_tensorboard_and_leaves_loss_curves(tokenizer_run, training_data):
    """--report-to tensorboard: the logged values and validation grids (reconstructions for this stage, captioned
    with their token counts and texts) go to TensorBoard too; OUT/loss.png plots logs.jsonl's losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lavit_pipelines.training.reporting import CELL

    events = EventAccumulator(str(tokenizer_run / "lavit-visual-tokenizer")).Reload()
    losses = [(event.step, round(event.value, 4)) for event in events.Scalars("loss")]
    assert losses == [(row["step"], round(row["loss"], 4)) for row in read_logs(tokenizer_run) if "loss" in row]
    assert [event.step for event in events.Scalars("validation_loss")] == [0, 8, 16]
    assert [event.step for event in events.Images("validation")] == [0, 8, 16]
    for step in (0, 8, 16):
        grid = PIL.Image.open(tokenizer_run / "validation" / f"step-{step}.png")
        assert grid.width == 4 * CELL and CELL < grid.height < 2 * CELL  # the first 4 examples, captioned
    assert PIL.Image.open(tokenizer_run / "loss.png").size == (700, 400)


def stage_config(stage: str, model: Path, data: Path, output: Path, **kwargs) -> TrainingConfig:
    settings = {"batch_size": 4, "learning_rate": 1e-3, **kwargs}
    return TrainingConfig(stage=stage, model=str(model), data=str(data), output=str(output), **settings)


def test_pixel_decoder_training_reduces_the_loss_on_the_stage_1_output(tokenizer_run, training_data, tmp_path):
    out = train(
        stage_config(
            "pixel-decoder",
            tokenizer_run,
            training_data,
            tmp_path / "out",
            max_steps=6,
            train_unet=True,
            validation_steps=6,
            validation_inference_steps=2,
            use_ema=True,
            ema_decay=0.5,
        )
    )
    assert_loss_goes_down(out, window=3)
    validation = [row["validation_loss"] for row in read_logs(out) if "validation_loss" in row]
    assert len(validation) == 2 and validation[1] < 0.8 * validation[0]  # the same noise: step 0 vs step 6
    assert (out / "validation" / "step-6.png").is_file()
    pipe = LavitText2ImagePipeline.from_pretrained(out)
    image = pipe(
        visual_token_ids=[torch.arange(12)],
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_cached_latents_train_as_latents_encoded_at_every_step(tokenizer_run, training_data, tmp_path):
    """`cache_latents` (the VAE encodes each image once, before training): the same losses and UNet weights."""
    from safetensors.torch import load_file

    runs = {
        cache: train(
            stage_config(
                "pixel-decoder",
                tokenizer_run,
                training_data,
                tmp_path / str(cache),
                max_steps=3,
                train_unet=True,
                cache_latents=cache,
            )
        )
        for cache in (False, True)
    }
    losses = train_losses(runs[True])
    assert len(losses) == 3 and losses == pytest.approx(train_losses(runs[False]), rel=1e-5)
    weights = [load_file(runs[cache] / "unet" / "diffusion_pytorch_model.safetensors") for cache in (False, True)]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-6)


def test_cached_posteriors_are_read_by_example_index_without_the_encoder():
    from diffusers import DDPMScheduler

    from lavit_pipelines.tiny import build_tiny_components
    from lavit_pipelines.training.pixel_decoder import PixelDecoderTrainingModule

    components = build_tiny_components()
    module = PixelDecoderTrainingModule(components, DDPMScheduler(), condition_dropout=0.0)
    pixels = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    module.cache_latents([{"vae_pixel_values": p} for p in pixels], batch_size=2)
    assert module.latent_parameters.shape == (5, 8, 8, 8)  # mean and log-variance of 4 channels
    calls = []
    components["vae"].encoder.register_forward_pre_hook(lambda *args: calls.append(1))
    batch = {"index": torch.tensor([4, 1]), "vae_pixel_values": pixels[[4, 1]]}
    cached = module.latent_dist(batch)
    assert not calls
    module.latent_parameters = None
    encoded = module.latent_dist(batch)
    assert calls
    torch.testing.assert_close(cached.mean, encoded.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.std, encoded.std, rtol=1e-5, atol=1e-6)


def test_language_model_training_reduces_both_losses(tokenizer_run, training_data, tmp_path):
    out = train(
        stage_config(
            "language-model",
            tokenizer_run,
            training_data,
            tmp_path / "out",
            max_steps=12,
            learning_rate=3e-3,
            init_understanding_head=True,
        )
    )
    assert_loss_goes_down(out, window=3, factor=0.9)
    logs = [row for row in read_logs(out) if "loss" in row]
    assert 0 < sum(row["understanding_examples"] for row in logs) / len(logs) < 1  # both directions ran
    trained = LavitUnderstandingPipeline.from_pretrained(out).visual_tokenizer.state_dict()
    base = LavitUnderstandingPipeline.from_pretrained(tokenizer_run).visual_tokenizer.state_dict()
    assert not torch.equal(trained["llm_projection.weight"], base["llm_projection.weight"])
    torch.testing.assert_close(trained["codebook.weight"], base["codebook.weight"])  # stage 1 stays frozen
    assert caption_runs(out)


def test_prompted_examples_train_understanding_with_the_loss_on_the_text_only(tokenizer_run, training_data, tmp_path):
    from lavit_pipelines.training.language_model import IGNORE, LanguageModelTrainingModule

    data = tmp_path / "data"
    shutil.copytree(training_data, data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    metadata_with(data, [{**row, "prompt": "Question: what is it? Answer:", "text": "a square."} for row in rows])
    out = train(stage_config("language-model", tokenizer_run, data, tmp_path / "out", max_steps=3))
    assert all(
        row["understanding_examples"] == 1.0 for row in read_logs(out) if "loss" in row
    )  # prompts never generate
    pipe = LavitUnderstandingPipeline.from_pretrained(out)
    module = LanguageModelTrainingModule(pipe.language_model, pipe.visual_tokenizer, pipe.tokenizer, None)
    features = torch.zeros(3, pipe.language_model.config.hidden_size)
    embeds, labels = module.understanding_example(features, [5, 6], [7, 8])
    assert embeds.shape[0] == 3 + 2 + 2 + 2 + 1  # [IMG] features [/IMG] prompt text </s>
    assert labels.tolist() == [IGNORE] * 7 + [7, 8, pipe.tokenizer.eos_token_id]
    metadata_with(data, [{**rows[0], "prompt": 3}])
    with pytest.raises(ValueError, match='metadata.jsonl:1: "prompt" must be a string'):
        train(stage_config("language-model", tokenizer_run, data, tmp_path / "refused"))


def test_packed_examples_attend_only_to_themselves(training_base):
    """A packed row gives each example the logits it has alone (a cache in the forward would let the second
    example see the first one at positions that look like its own)."""
    from lavit_pipelines.training.language_model import batch_rows, pack, packed_logits

    lm = LavitText2ImagePipeline.from_pretrained(training_base).language_model.eval()
    embed = lm.get_input_embeddings()
    examples = [(embed(torch.tensor(ids)), torch.tensor(ids)) for ids in ([5, 6, 7, 8], [9, 10, 11])]
    rows = pack(examples, max_length=16, packing=True)
    assert rows == [[0, 1]]
    embeds, positions, _ = batch_rows(examples, rows, embed(torch.tensor([0])))
    with torch.no_grad():
        packed = packed_logits(lm, embeds, positions)[0]
        alone = [packed_logits(lm, e[None], torch.arange(len(e))[None])[0] for e, _ in examples]
    torch.testing.assert_close(packed[:4], alone[0])
    torch.testing.assert_close(packed[4:7], alone[1])


def test_reconstruction_decoder_knows_a_kept_token_by_its_rank_not_its_patch():
    """The pixel decoder sees the kept tokens in order, not where they were: so does stage 1's decoder."""
    from lavit_pipelines.training.visual_tokenizer import FeatureReconstructionDecoder

    torch.manual_seed(0)
    decoder = FeatureReconstructionDecoder(4, 8, 16, 8, num_layers=1, num_heads=2, mlp_dim=32).eval()
    tokens = torch.randn(1, 4, 8)
    first_two = decoder(tokens, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    moved = decoder(tokens[:, [2, 3, 0, 1]], torch.tensor([[0.0, 0.0, 1.0, 1.0]]))  # the same two, at patches 2 and 3
    torch.testing.assert_close(first_two, moved)
    assert not torch.allclose(first_two, decoder(tokens[:, [1, 0, 2, 3]], torch.tensor([[1.0, 1.0, 0.0, 0.0]])))


def caption_runs(folder: Path) -> bool:
    pipe = LavitUnderstandingPipeline.from_pretrained(folder)
    return isinstance(pipe(torch.zeros(1, 3, 56, 56), max_new_tokens=4, min_new_tokens=1).text[0], str)


def test_resume_equals_an_uninterrupted_run(training_base, training_data, tmp_path):
    """Gradient accumulation, two epochs (4 batches each), codebook k-means/EMA/dead codes: stopped after the
    checkpoint at step 3 (mid-epoch) and resumed, the run ends with the same weights and losses."""
    common = dict(batch_size=2, gradient_accumulation_steps=2, checkpointing_steps=3, dead_code_threshold=0.5)
    whole = train(
        stage_config("visual-tokenizer", training_base, training_data, tmp_path / "whole", max_steps=5, **common)
    )
    part = stage_config("visual-tokenizer", training_base, training_data, tmp_path / "part", max_steps=4, **common)
    train(part)
    for leftover in ("checkpoint-4", "visual_tokenizer", "model_index.json"):  # as if stopped after step 3
        path = tmp_path / "part" / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    part.max_steps, part.resume_from_checkpoint = 5, "latest"
    resumed = train(part)
    assert train_losses(resumed) == train_losses(whole) and len(train_losses(whole)) == 5
    from safetensors.torch import load_file

    name = "visual_tokenizer/diffusion_pytorch_model.safetensors"
    a, b = load_file(whole / name), load_file(resumed / name)
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def lora_runs(tokenizer_run, training_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    return {
        "unet": train(
            stage_config(
                "pixel-decoder", tokenizer_run, training_data, root / "unet", max_steps=2, learning_rate=1e-2, lora=True
            )
        ),
        "language_model": train(
            stage_config(
                "language-model", tokenizer_run, training_data, root / "lm", max_steps=2, learning_rate=1e-2, lora=True
            )
        ),
    }


def test_unet_lora_round_trips_into_the_text_to_image_pipeline(lora_runs, tokenizer_run):
    pipe = LavitText2ImagePipeline.from_pretrained(tokenizer_run)

    def run():
        return pipe(
            visual_token_ids=[torch.arange(10)],
            height=64,
            width=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    before = run()
    pipe.load_lora_weights(lora_runs["unet"], adapter_name="mine")
    assert pipe.get_list_adapters() == {"unet": ["mine"]}
    with_adapter = run()
    assert (with_adapter - before).abs().max() > 1e-3
    pipe.set_adapters("mine", 0.0)
    torch.testing.assert_close(run(), before)
    pipe.set_adapters("mine", 1.0)
    pipe.fuse_lora()
    torch.testing.assert_close(run(), with_adapter, atol=1e-4, rtol=0)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    torch.testing.assert_close(run(), before, atol=1e-4, rtol=0)
    assert pipe.get_list_adapters() == {}


@pytest.mark.parametrize("pipeline_cls", [LavitText2ImagePipeline, LavitUnderstandingPipeline])
def test_language_model_lora_round_trips_into_both_pipelines(lora_runs, tokenizer_run, pipeline_cls):
    pipe = pipeline_cls.from_pretrained(tokenizer_run)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = pipe.language_model(ids).logits
        pipe.load_lora_weights(lora_runs["language_model"])
        with_adapter = pipe.language_model(ids).logits
        assert (with_adapter - before).abs().max() > 1e-3
        pipe.fuse_lora()
        torch.testing.assert_close(pipe.language_model(ids).logits, with_adapter, atol=1e-5, rtol=0)
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        torch.testing.assert_close(pipe.language_model(ids).logits, before, atol=1e-5, rtol=0)


def test_understanding_pipeline_refuses_a_unet_only_lora(lora_runs, tokenizer_run):
    pipe = LavitUnderstandingPipeline.from_pretrained(tokenizer_run)
    with pytest.raises(ValueError, match="LavitUnderstandingPipeline loads \\['language_model'\\]"):
        pipe.load_lora_weights(lora_runs["unet"])


# ------------------------------------------------------------------ bad input fails before training


def metadata_with(folder: Path, lines: list[dict]) -> Path:
    write_lines = "\n".join(json.dumps(line) for line in lines) + "\n"
    (folder / "metadata.jsonl").write_text(write_lines)
    return folder


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            [{"file_name": "0.png", "text": "a car"}, {"file_name": "missing.png", "text": "a dog"}],
            "metadata.jsonl:2: the image .*missing.png.* does not exist",
        ),
        (
            [{"file_name": "0.png", "text": "a car"}, {"file_name": "0.png", "text": "  "}],
            "metadata.jsonl:2: '0.png' has no text",
        ),
        ([{"file_name": "0.png"}], "metadata.jsonl:1: '0.png' has no text"),
        ([{"text": "a car"}], 'metadata.jsonl:1: needs a string "file_name"'),
    ],
)
def test_bad_data_fails_before_training_naming_the_line(training_base, training_data, tmp_path, lines, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "0.png").write_bytes((training_data / "0.png").read_bytes())
    metadata_with(data, lines)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(stage_config("visual-tokenizer", training_base, data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unreadable_image_and_missing_metadata_are_named(training_base, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(FileNotFoundError, match="has no metadata.jsonl"):
        train(stage_config("visual-tokenizer", training_base, data, tmp_path / "out"))
    (data / "0.png").write_text("not an image")
    metadata_with(data, [{"file_name": "0.png", "text": "a car"}])
    with pytest.raises(ValueError, match="metadata.jsonl:1: .*0.png.* is not a readable image"):
        train(stage_config("visual-tokenizer", training_base, data, tmp_path / "out"))


def test_bad_settings_and_an_occupied_output_fail_before_training(training_base, training_data, tmp_path):
    with pytest.raises(ValueError, match="`stage` must be one of"):
        stage_config("tokenizer", training_base, training_data, tmp_path / "out")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        stage_config("pixel-decoder", training_base, training_data, tmp_path / "out", batch_size=0)
    with pytest.raises(FileNotFoundError, match="`model`"):
        stage_config("pixel-decoder", tmp_path / "nowhere", training_data, tmp_path / "out")
    with pytest.raises(ValueError, match="`snr_gamma` must be a finite positive number or None"):
        stage_config("pixel-decoder", training_base, training_data, tmp_path / "out", snr_gamma=0.0)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds files \\(notes.txt\\)"):
        train(stage_config("pixel-decoder", training_base, training_data, occupied))
    with pytest.raises(ValueError, match="already holds files"):  # resuming needs a run of ours there
        train(stage_config("pixel-decoder", training_base, training_data, occupied, resume_from_checkpoint="latest"))
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="`output` must differ from `model`"):
        train(stage_config("pixel-decoder", training_base, training_data, training_base))


TWO_PROCESS_SCRIPT = """
import sys
from lavit_pipelines.training import TrainingConfig, train
model, data, output, batch_size = sys.argv[1:]
train(TrainingConfig(stage="pixel-decoder", model=model, data=data, output=output, max_steps=2,
                     batch_size=int(batch_size), learning_rate=1e-3))
"""


def test_two_processes_agree_with_one_on_the_same_global_batch(tokenizer_run, training_data, tmp_path):
    """`accelerate launch` with 2 CPU processes of batch 2 (DDP over gloo) against one process of batch 4:
    the same examples, the same per-example noise, the same losses and weights."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "train.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    args = [str(tokenizer_run), str(training_data)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    subprocess.run(
        [*TWO_PROCESS_LAUNCH, str(script), *args, str(tmp_path / "two"), "2"], env=env, check=True, capture_output=True
    )
    subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one"), "4"], check=True, capture_output=True)
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == 2 and one == pytest.approx(two, rel=1e-5)
    name = "pixel_decoder/diffusion_pytorch_model.safetensors"
    a, b, base = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name), load_file(tokenizer_run / name)
    key = "blocks.0.cross_attn.q_proj.weight"
    assert (a[key] - base[key]).abs().max() > 1e-3  # it trained; the two runs agree far more closely than that
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ command line


def test_cli_trains_and_applies_the_adapter(training_base, training_data, lora_runs, tokenizer_run, tmp_path, capsys):
    from lavit_pipelines.cli import main

    out = tmp_path / "out"
    argv = [
        "train",
        "visual-tokenizer",
        "--model",
        str(training_base),
        "--data",
        str(training_data),
        "--output",
        str(out),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--no-kmeans-init",
        "--target-keep-ratio",
        "0.5",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    assert json.loads((out / "training_config.json").read_text())["target_keep_ratio"] == 0.5
    assert [row["step"] for row in read_logs(out)] == [1]
    image = str(training_data / "0.png")
    assert main(["caption", image, "--model", str(tokenizer_run), "--lora", str(lora_runs["language_model"])]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["caption", image, "--model", str(tokenizer_run)]) == 0
    assert capsys.readouterr().out != with_adapter


def test_cli_names_bad_training_input(training_base, tmp_path, capsys):
    from lavit_pipelines.cli import main

    argv = [
        "train",
        "pixel-decoder",
        "--model",
        str(training_base),
        "--data",
        str(tmp_path / "nowhere"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    assert "`data`: " in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["train", "tokenizer", "--model", "m", "--data", "d", "--output", "o"])


def test_an_image_without_kept_tokens_trains_as_an_unconditional_row():
    """Gumbel keep/drop may keep no patch of an image: its row gets the decoder's negative condition, not a crash."""
    from diffusers import DDPMScheduler

    from lavit_pipelines.tiny import build_tiny_components
    from lavit_pipelines.training.pixel_decoder import PixelDecoderTrainingModule

    components = build_tiny_components()
    module = PixelDecoderTrainingModule(components, DDPMScheduler(), condition_dropout=0.0)
    codes = [torch.arange(5), torch.zeros(0, dtype=torch.long)]
    hidden, kwargs = module.condition(codes, torch.zeros(2, dtype=torch.bool), (64, 64))
    reference = components["pixel_decoder"]([torch.arange(5)])
    assert torch.allclose(hidden[0], reference.prompt_embeds[0], atol=1e-6)
    assert torch.equal(hidden[1], torch.zeros_like(hidden[1]))  # the high-res negative: zeros
    assert torch.equal(
        kwargs["added_cond_kwargs"]["text_embeds"][1], torch.zeros_like(reference.pooled_prompt_embeds[0])
    )


def test_min_snr_weighting_follows_diffusers_formula():
    """snr_gamma weights each example's MSE by min(SNR, γ) / SNR (ε) or / (SNR + 1) (v), as diffusers' scripts do."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from lavit_pipelines.tiny import build_tiny_components
    from lavit_pipelines.training.pixel_decoder import PixelDecoderTrainingModule

    prediction, target, timesteps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([10, 500, 990])
    per_example = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    for prediction_type, denominator in (("epsilon", 0), ("v_prediction", 1)):
        scheduler = DDPMScheduler(prediction_type=prediction_type)
        module = PixelDecoderTrainingModule(build_tiny_components(), scheduler, 0.0, snr_gamma=5.0)
        snr = compute_snr(scheduler, timesteps)
        expected = (per_example * torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + denominator)).mean()
        torch.testing.assert_close(module.loss(prediction, target, timesteps, torch.ones(3)), expected)
    plain = PixelDecoderTrainingModule(build_tiny_components(), DDPMScheduler(), 0.0)
    torch.testing.assert_close(plain.loss(prediction, target, timesteps, torch.ones(3)), per_example.mean())
    weights = torch.tensor([1.0, 3.0, 0.0])  # class examples weighted 3 and 0 (prior preservation)
    torch.testing.assert_close(plain.loss(prediction, target, timesteps, weights), (per_example * weights).mean())


def test_decoder_input_starts_standardised_to_its_codebook():
    from lavit_pipelines.tiny import build_tiny_components
    from lavit_pipelines.training.pixel_decoder import standardize_decoder_input

    decoder = build_tiny_components()["pixel_decoder"]
    codes = decoder.codebook.weight.data
    codes.mul_(0.05).add_(1.0)  # codes close together, as an l2-normalised stage-1 codebook can be
    before = decoder.input_proj((codes - codes.mean(0)) / codes.std(0)).detach()
    standardize_decoder_input(decoder)
    torch.testing.assert_close(decoder.input_proj(codes).detach(), before, atol=2e-3, rtol=1e-3)
