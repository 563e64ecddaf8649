"""The release converter: the fixture converts and loads, the CLI fails cleanly, and an unseen
release-layout checkpoint with other dimensions converts with every dimension inferred."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from lavit_pipelines import LavitConfig, LavitForCausalLM, LavitPixelDecoder, LavitVisualTokenizer, load_lavit_tokenizer
from lavit_pipelines.conversion import (
    DECODER_KEYS,
    EVA_KEYS,
    STAGE1_KEYS,
    STAGE2_KEYS,
    convert,
    convert_pixel_decoder,
    convert_visual_tokenizer,
    map_key,
)
from lavit_pipelines.pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "conversion" / "convert_lavit_to_diffusers.py"
IMG = 32000  # the fixture's [IMG] id, only to read its references


def load_cli():
    spec = importlib.util.spec_from_file_location("convert_lavit_to_diffusers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT)


def linked_copy(src: Path, dst: Path) -> Path:
    """A writable copy of the release folder `src` whose files are symlinks (replace one to modify it)."""
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return dst


def safetensors_of(folder: Path) -> dict:
    """All tensors of a converted component folder, by key."""
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def public_config(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    """One `error: ` line from the script and no traceback (other lines may be the libraries' import-time warnings,
    e.g. diffusers' when torchao is installed)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------- the fixture


@torch.no_grad()
def test_fixture_conversion_loads_every_component(converted_dir, converted_lowres_dir, reference):
    ref, tensors = reference
    for folder, variant, cross_dim in ((converted_dir, "highres", 80), (converted_lowres_dir, "lowres", 32)):
        assert not list(folder.rglob("*.bin")), "weights are written as safetensors only"
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "LavitText2ImagePipeline"
        tokenizer = load_lavit_tokenizer(folder / "tokenizer")
        assert tokenizer(ref["t2i_prompt"], add_special_tokens=False).input_ids == ref["t2i_prompt_ids"]
        assert (tokenizer.padding_side, tokenizer.pad_token_id) == ("left", 2)
        lm = LavitForCausalLM.from_pretrained(folder / "language_model")
        assert (lm.config.image_start_token_id, lm.config.visual_vocab_size, lm.config.vocab_size) == (
            IMG,
            16384,
            48386,
        )
        logits = lm(torch.tensor([ref["t2i_prompt_ids"] + [IMG]])).logits[0]
        assert (logits - tensors["t2i_prompt_logits"]).abs().max() / tensors["t2i_prompt_logits"].abs().max() < 1e-4
        assert LavitVisualTokenizer.from_pretrained(folder / "visual_tokenizer").dtype == torch.float32
        assert LavitPixelDecoder.from_pretrained(folder / "pixel_decoder").config.variant == variant
        assert UNet2DConditionModel.from_pretrained(folder / "unet").config.cross_attention_dim == cross_dim
        assert AutoencoderKL.from_pretrained(folder / "vae").config.latent_channels == 4
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        release = dict(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
        )
        assert {k: scheduler.config[k] for k in release} == release
    pipe = LavitText2ImagePipeline.from_pretrained(converted_dir)
    assert isinstance(pipe.language_model, LavitForCausalLM) and isinstance(pipe.visual_tokenizer, LavitVisualTokenizer)


def test_cli_missing_source_folder(tmp_path):
    result = run_cli("--checkpoint_path", str(tmp_path / "nowhere"), "--dump_path", str(tmp_path / "out"))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "nowhere")
    assert sorted(os.listdir(tmp_path)) == []


def test_cli_bfloat16(checkpoint_dir, tmp_path):
    out = tmp_path / "bf16"
    result = run_cli("--checkpoint_path", str(checkpoint_dir), "--dump_path", str(out), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    files = sorted(out.rglob("*.safetensors"))
    assert len(files) == 5  # language_model, visual_tokenizer, pixel_decoder, unet, vae
    for path in files:
        with safe_open(path, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, path
    assert LavitForCausalLM.from_pretrained(out / "language_model").dtype == torch.bfloat16


@pytest.mark.parametrize(
    "missing, variant",
    [
        ("language_model/visual_weight.bin", "highres"),
        ("language_model/tokenizer.model", "highres"),
        ("language_model/pytorch_model.bin", "highres"),
        ("visual_tokenizer/eva_vitg_psz14.bin", "highres"),
        ("visual_tokenizer/highres_tokenizer_decoder.bin", "highres"),
        ("highres_pixel_decoding/unet/diffusion_pytorch_model.bin", "highres"),
        ("pixel_decoding/uncond_embeddings.bin", "lowres"),
    ],
)
def test_missing_release_file(checkpoint_dir, tmp_path, capsys, missing, variant):
    src = linked_copy(checkpoint_dir, tmp_path / "src")
    (src / missing).unlink()
    (tmp_path / "out").mkdir()
    code = load_cli().main(
        ["--checkpoint_path", str(src), "--dump_path", str(tmp_path / "out" / "lavit"), "--pixel_decoder", variant]
    )
    assert code == 1
    assert_one_line_error(capsys.readouterr().err, "Missing release file", missing)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "corrupt",
    [
        "visual_tokenizer/tokenizer_encoder.bin",
        "language_model/pytorch_model.bin",
        "highres_pixel_decoding/vae/diffusion_pytorch_model.safetensors",
    ],
)
def test_truncated_tensor_file_leaves_nothing(checkpoint_dir, tmp_path, capsys, corrupt):
    src = linked_copy(checkpoint_dir, tmp_path / "src")
    data = (src / corrupt).read_bytes()
    (src / corrupt).unlink()
    (src / corrupt).write_bytes(data[: len(data) // 2])
    parent = tmp_path / "out"
    parent.mkdir()
    code = load_cli().main(["--checkpoint_path", str(src), "--dump_path", str(parent / "lavit")])
    assert code == 1
    assert_one_line_error(capsys.readouterr().err, corrupt)
    assert list(parent.iterdir()) == [], "no partial output and no temporary folder"


def reshard(lm_dir: Path) -> None:
    """Replace `pytorch_model.bin` by two `.bin` shards and a `pytorch_model.bin.index.json`."""
    state = torch.load(lm_dir / "pytorch_model.bin", weights_only=True)
    (lm_dir / "pytorch_model.bin").unlink()
    keys = list(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, lm_dir / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (lm_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


@torch.no_grad()
def test_existing_output_overwrite_and_sharded_source(checkpoint_dir, converted_dir, tmp_path, capsys):
    src = linked_copy(checkpoint_dir, tmp_path / "src")
    reshard(src / "language_model")
    out = tmp_path / "out" / "lavit"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    argv = ["--checkpoint_path", str(src), "--dump_path", str(out)]
    cli = load_cli()

    assert cli.main(argv) == 1
    assert_one_line_error(capsys.readouterr().err, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"

    assert cli.main(argv + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["lavit"], "no backup or temporary folder left"
    lm_files = sorted(
        p.name for p in (out / "language_model").iterdir() if "model" in p.name and "config" not in p.name
    )
    assert lm_files == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    sharded = LavitForCausalLM.from_pretrained(out / "language_model")
    single = LavitForCausalLM.from_pretrained(converted_dir / "language_model")
    expected = single.state_dict()
    assert all(v.equal(expected[k]) for k, v in sharded.state_dict().items())
    ids = torch.arange(10)[None]
    assert sharded(ids).logits.equal(single(ids).logits)


# --------------------------------------------------------------------------- an unseen checkpoint with other dimensions

CODEBOOK = (64, 16)
LLM_DIMS = dict(hidden_size=16, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    for parameter in model.parameters():
        if not parameter.count_nonzero():
            torch.nn.init.normal_(parameter)
    return model


def release_names(fixture_file: Path, num_blocks: int) -> list[str]:
    """The key names of a fixture file with its `blocks.0.` entries repeated for `num_blocks` blocks."""
    names = []
    for name in torch.load(fixture_file, mmap=True, weights_only=True):
        block = re.search(r"blocks\.(\d+)\.", name)
        if block is None:
            names.append(name)
        elif block.group(1) == "0":
            names += [name.replace("blocks.0.", f"blocks.{i}.", 1) for i in range(num_blocks)]
    return names


def release_file(path: Path, names: list[str], ours: dict, mapping: list, ignored_shape) -> None:
    """Save, as a bf16 pickle, the tensor of ours that the converter maps each release name to (random for
    the names it ignores, with shape `ignored_shape(name)`)."""
    state = {}
    for name in names:
        key = map_key(name, mapping, path)
        state[name] = ours[key] if key is not None else torch.randn(ignored_shape(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, path)


@pytest.fixture(scope="module")
def unseen_checkpoint(checkpoint_dir, tmp_path_factory):
    """A release-layout checkpoint with other dimensions (width 264 = 3 heads, 3 EVA layers, 1 merger layer,
    codebook 64×16, decoder width 88 with 3 layers and 64 queries, sharded LLM, bf16), built from our own
    randomly initialised components -> (folder, {component: our bf16 state dict}, {component: our config})."""
    torch.manual_seed(0)
    tokenizer = randomized(
        LavitVisualTokenizer(
            hidden_size=264,
            encoder_layers=3,
            encoder_mlp_dim=128,
            merger_layers=1,
            merger_mlp_dim=96,
            codebook_size=CODEBOOK[0],
            codebook_dim=CODEBOOK[1],
            llm_hidden_size=LLM_DIMS["hidden_size"],
        )
    )
    decoder = randomized(
        LavitPixelDecoder(
            codebook_size=CODEBOOK[0],
            codebook_dim=CODEBOOK[1],
            hidden_size=88,
            num_layers=3,
            mlp_dim=72,
            num_queries=64,
            output_dim=88,
            prompt_embed_dims=(32, 48),
            pooled_embed_dim=48,
        )
    )
    decoder.codebook.weight.data.copy_(tokenizer.codebook.weight.data)
    vocab = 32000 + 2 + CODEBOOK[0]
    lm_config = LavitConfig(vocab_size=vocab, visual_vocab_size=CODEBOOK[0], **LLM_DIMS)
    lm = LavitForCausalLM(lm_config)

    src = linked_copy(checkpoint_dir, tmp_path_factory.mktemp("unseen") / "src")
    for name in ("language_model/pytorch_model.bin", "language_model/config.json", "language_model/visual_weight.bin"):
        (src / name).unlink()
    for name in (
        "eva_vitg_psz14.bin",
        "tokenizer_encoder.bin",
        "highres_tokenizer_decoder.bin",
        "tokenizer_decoder.bin",
    ):
        (src / "visual_tokenizer" / name).unlink()
    fixture = checkpoint_dir / "visual_tokenizer"
    ours = tokenizer.state_dict()
    width = tokenizer.config.hidden_size
    eva_ignored = {"norm.weight": (width,), "norm.bias": (width,), "head.weight": (64, width), "head.bias": (64,)}
    release_file(
        src / "visual_tokenizer/eva_vitg_psz14.bin",
        release_names(fixture / "eva_vitg_psz14.bin", 3),
        ours,
        EVA_KEYS,
        eva_ignored.get,
    )
    stage_names = release_names(fixture / "tokenizer_encoder.bin", 1)
    release_file(
        src / "visual_tokenizer/tokenizer_encoder.bin",
        stage_names,
        ours,
        STAGE1_KEYS,
        lambda name: ours[map_key(name, STAGE2_KEYS, src)].shape,
    )
    release_file(
        src / "language_model/visual_weight.bin",
        stage_names,
        ours,
        STAGE2_KEYS,
        lambda name: ours[map_key(name, STAGE1_KEYS, src)].shape,
    )
    release_file(
        src / "visual_tokenizer/highres_tokenizer_decoder.bin",
        release_names(fixture / "highres_tokenizer_decoder.bin", 3),
        decoder.state_dict(),
        DECODER_KEYS,
        None,
    )

    lm_dir = src / "language_model"
    release_config = json.loads((checkpoint_dir / "language_model/config.json").read_text())
    (lm_dir / "config.json").write_text(
        json.dumps({**release_config, **LLM_DIMS, "vocab_size": vocab, "torch_dtype": "bfloat16"})
    )
    torch.save({k: v.bfloat16() for k, v in lm.state_dict().items()}, lm_dir / "pytorch_model.bin")
    reshard(lm_dir)

    states = {
        name: {k: v.bfloat16() for k, v in model.state_dict().items()}
        for name, model in (("visual_tokenizer", tokenizer), ("pixel_decoder", decoder), ("language_model", lm))
    }
    configs = {"visual_tokenizer": public_config(tokenizer.config), "pixel_decoder": public_config(decoder.config)}
    return src, states, configs


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in actual.items():
        assert value.dtype == torch.bfloat16 and value.equal(expected[key]), key


def test_unseen_dimensions_vision_components(unseen_checkpoint):
    """Every dimension of the visual tokenizer and the pixel decoder is read off tensor shapes; tensors round-trip exactly."""
    src, states, configs = unseen_checkpoint
    tokenizer = convert_visual_tokenizer(src, None)
    assert public_config(tokenizer.config) == configs["visual_tokenizer"]
    assert_same_state(tokenizer.state_dict(), states["visual_tokenizer"])
    decoder = convert_pixel_decoder(src, "highres", None)
    assert public_config(decoder.config) == configs["pixel_decoder"]
    assert_same_state(decoder.state_dict(), states["pixel_decoder"])


@torch.no_grad()
def test_unseen_dimensions_convert_end_to_end(unseen_checkpoint, tmp_path):
    src, states, configs = unseen_checkpoint
    out = convert(str(src), str(tmp_path / "converted"))
    for name in ("visual_tokenizer", "pixel_decoder", "language_model"):
        assert_same_state(safetensors_of(out / name), states[name])
    config = LavitConfig.from_pretrained(out / "language_model")
    assert {k: getattr(config, k) for k in LLM_DIMS} == LLM_DIMS
    assert (config.vocab_size, config.visual_vocab_size, config.visual_token_offset) == (32066, 64, 32002)
    assert len(list((out / "language_model").glob("model-*-of-00002.safetensors"))) == 2
    pipe = LavitText2ImagePipeline.from_pretrained(out)
    assert public_config(pipe.visual_tokenizer.config) == configs["visual_tokenizer"]
    assert public_config(pipe.pixel_decoder.config) == configs["pixel_decoder"]

    # Both pipelines run on it: an image+text prompt to an image, and a caption.
    pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.new("RGB", (40, 30), (200, 100, 0))
    result = pipe(
        "<image> in the snow",
        image=image,
        max_new_tokens=30,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert result.images.shape == (1, 64, 64, 3) and np.isfinite(result.images).all()
    assert 20 <= len(result.visual_token_ids[0]) <= 30 and result.visual_token_ids[0].max() < CODEBOOK[0]
    understanding = LavitUnderstandingPipeline.from_pretrained(out)
    understanding.set_progress_bar_config(disable=True)
    assert len(understanding.caption(image, max_new_tokens=9)) == 1


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_converted_folder_gets_the_permissions_of_the_umask(checkpoint_dir, tmp_path, umask):
    """Like any folder the user makes (a staging folder from `tempfile.mkdtemp` would be 0700)."""
    dst = tmp_path / "out"
    code = f"import os; os.umask({umask}); from lavit_pipelines.conversion import convert; convert({str(checkpoint_dir)!r}, {str(dst)!r})"
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    for path in [dst, *dst.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, path
