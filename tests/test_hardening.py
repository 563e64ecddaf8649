"""Issue 10: nothing imported from a model folder, nothing of the user's lost, nothing silent.

Each test names the finding it covers; every bad input is refused before any model runs (models are guarded by
hooks that raise) with an error naming the argument, file or component.
"""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline, conversion
from lavit_pipelines.cli import main
from lavit_pipelines.tiny import tiny_pipeline_path


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a folder whose files are hard links (cheap); edit files only through `rewrite`."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def rewrite(path: Path, data: bytes) -> None:
    """Replace a (hard-linked) file by a new one, leaving the original untouched."""
    path.unlink()
    path.write_bytes(data)


def edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    rewrite(path, json.dumps(config).encode())


def tree(folder: Path) -> dict:
    """Relative path -> bytes of every file: a snapshot to compare for 'nothing was touched'."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    PIL.Image.new("RGB", (40, 30), (200, 30, 10)).save(path)
    return path


@pytest.fixture(scope="module")
def truncated_photo(photo) -> Path:
    path = photo.with_name("truncated.png")
    path.write_bytes(photo.read_bytes()[: len(photo.read_bytes()) // 2])
    return path


# ------------------------------------------------------------------------------------------------ security


PIPELINES = [LavitText2ImagePipeline, LavitUnderstandingPipeline]


@pytest.mark.parametrize("pipeline_cls", PIPELINES)
@pytest.mark.parametrize(
    "component, entry, payload",
    [
        ("unet", ["payload", "UNet2DConditionModel"], "payload.py"),  # a module beside model_index.json
        ("unet", ["payload", "UNet2DConditionModel"], "unet/payload.py"),  # in the component's folder
        ("language_model", ["payload", "LavitForCausalLM"], "payload/__init__.py"),
        ("not_a_component", ["payload", "Anything"], "payload.py"),  # an entry the pipeline does not even use
        ("tokenizer", ["payload.sub", "X"], "payload/sub.py"),
        ("visual_tokenizer", ["payload", "LavitVisualTokenizer"], "payload.py"),  # not loaded by text-to-image
    ],
)
def test_model_index_never_imports_a_payload(converted_dir, tmp_path, pipeline_cls, component, entry, payload):
    folder = linked_copy(converted_dir, tmp_path / "model")
    marker = tmp_path / "payload-ran"
    (folder / payload).parent.mkdir(exist_ok=True)
    (folder / payload).write_text(f"open({str(marker)!r}, 'w').close()\n")
    edit_json(folder / "model_index.json", **{component: entry})
    sys.path.insert(0, str(folder))  # even where the folder is importable, nothing is imported from it
    try:
        with pytest.raises(ValueError) as raised:
            pipeline_cls.from_pretrained(folder)
    finally:
        sys.path.remove(str(folder))
    assert f"`{component}`" in str(raised.value)
    assert not marker.exists(), "the payload ran"
    assert "payload" not in sys.modules


@pytest.mark.parametrize("pipeline_cls", PIPELINES)
def test_model_index_naming_a_stdlib_module_imports_nothing(converted_dir, tmp_path, capsys, pipeline_cls):
    folder = linked_copy(converted_dir, tmp_path / "model")
    edit_json(folder / "model_index.json", unet=["this", "X"])
    assert "this" not in sys.modules
    with pytest.raises(ValueError, match="`unet` names the module 'this'"):
        pipeline_cls.from_pretrained(folder)
    assert "this" not in sys.modules
    assert "Beautiful is better" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(language_model=["diffusers", "UNet2DConditionModel"]), "`language_model` must be a LavitForCausalLM"),
        (dict(unet=["transformers", "LlamaForCausalLM"]), "`unet` must be a UNet2DConditionModel"),
        (dict(unet=["diffusers", "NoSuchClass"]), "`unet` names diffusers.NoSuchClass"),
        (dict(unet=["diffusers"]), "the entry of `unet` must be [library, class name]"),
        (dict(unet="diffusers.UNet2DConditionModel"), "the entry of `unet` must be [library, class name]"),
        (dict(_class_name=["payload", "Pipeline"]), "`_class_name` must be"),
    ],
)
def test_model_index_entries_must_be_the_declared_classes(converted_dir, tmp_path, changes, words):
    folder = linked_copy(converted_dir, tmp_path / "model")
    edit_json(folder / "model_index.json", **changes)
    with pytest.raises(ValueError) as raised:
        LavitText2ImagePipeline.from_pretrained(folder)
    assert words in str(raised.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("[1, 2]", "got a list"),
        ('"lavit"', "got a str"),
        ("{not json", "is not valid JSON"),
        (b"\xff\xfe", "is not valid JSON"),
    ],
)
def test_malformed_model_index_is_named(converted_dir, tmp_path, text, words):
    folder = linked_copy(converted_dir, tmp_path / "model")
    rewrite(folder / "model_index.json", text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as raised:
        LavitUnderstandingPipeline.from_pretrained(folder)
    assert "model_index.json" in str(raised.value) and words in str(raised.value)


def test_pickles_are_read_with_weights_only(checkpoint_dir, tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pickle-ran"), "w"))

    release = linked_copy(checkpoint_dir, tmp_path / "release")
    (release / "language_model" / "pytorch_model.bin").unlink()
    torch.save({"model.embed_tokens.weight": Payload()}, release / "language_model" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        conversion.convert(str(release), str(tmp_path / "out"))
    assert not (tmp_path / "pickle-ran").exists()
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ component checks


def drop_layer_tensors(path: Path, prefix: str) -> None:
    rewrite_safetensors(path, lambda state: {k: v for k, v in state.items() if not k.startswith(prefix)})


def rewrite_safetensors(path: Path, change) -> None:
    state = change(load_file(path))
    path.unlink()
    save_file(state, path, metadata={"format": "pt"})


LM_DAMAGE = [
    (lambda f: edit_json(f / "config.json", num_hidden_layers=3), "lack 9 tensors"),
    (lambda f: edit_json(f / "config.json", num_hidden_layers=1), "hold unexpected 9 tensors"),
    (lambda f: drop_layer_tensors(f / "model.safetensors", "model.norm"), "lack 1 tensors (model.norm.weight)"),
    (lambda f: edit_json(f / "config.json", intermediate_size=48), "of shape"),
    (lambda f: truncate(f / "model.safetensors"), "is not a readable weight file"),
    (lambda f: rewrite(f / "config.json", b"{"), "could not build LavitForCausalLM"),
]
VISUAL_TOKENIZER_DAMAGE = [
    (lambda f: edit_json(f / "config.json", encoder_layers=3), "lack 13 tensors"),
    (lambda f: edit_json(f / "config.json", encoder_layers=1), "hold unexpected 13 tensors"),
    (
        lambda f: rewrite_safetensors(
            f / "diffusion_pytorch_model.safetensors", lambda s: {**s, "extra.weight": torch.ones(2)}
        ),
        "hold unexpected 1 tensors (extra.weight)",
    ),
    (lambda f: (f / "diffusion_pytorch_model.safetensors").unlink(), "has no weights (*.safetensors or *.bin)"),
]


def assert_refused(pipeline_cls, folder: Path, component: str, words: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        pipeline_cls.from_pretrained(folder)
    assert f"`{component}`" in str(raised.value) and words in str(raised.value)


@pytest.mark.parametrize("pipeline_cls", PIPELINES)
@pytest.mark.parametrize("edit, words", LM_DAMAGE)
def test_language_model_weights_must_fit_its_config(converted_dir, tmp_path, pipeline_cls, edit, words):
    folder = linked_copy(converted_dir, tmp_path / "model")
    edit(folder / "language_model")
    assert_refused(pipeline_cls, folder, "language_model", words)


@pytest.mark.parametrize("edit, words", VISUAL_TOKENIZER_DAMAGE)
def test_visual_tokenizer_weights_must_fit_its_config(converted_dir, tmp_path, edit, words):
    folder = linked_copy(converted_dir, tmp_path / "model")
    edit(folder / "visual_tokenizer")
    assert_refused(LavitUnderstandingPipeline, folder, "visual_tokenizer", words)


@pytest.mark.parametrize("component", ["pixel_decoder", "unet", "vae"])
def test_diffusion_components_missing_weights_are_named(converted_dir, tmp_path, component):
    folder = linked_copy(converted_dir, tmp_path / "model")
    path = folder / component / "diffusion_pytorch_model.safetensors"
    first = sorted(load_file(path))[0]
    rewrite_safetensors(path, lambda state: {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match=f"`{component}` does not match its config"):
        LavitText2ImagePipeline.from_pretrained(folder)


def truncate(path: Path) -> None:
    rewrite(path, path.read_bytes()[:-100])


# ------------------------------------------------------------------------------------------------ float arguments


FLOAT_NAMES = [
    "eta",
    "guidance_scale",
    "length_penalty",
    "llm_guidance_scale",
    "repetition_penalty",
    "temperature",
    "top_p",
]


def test_float_names_are_the_checked_ones():
    from lavit_pipelines.pipelines.validation import FLOAT_ARGUMENTS

    assert sorted(FLOAT_ARGUMENTS) == FLOAT_NAMES


@pytest.mark.parametrize("name", FLOAT_NAMES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1.0", True, None])
def test_every_float_argument_must_be_finite(name, value):
    from lavit_pipelines.pipelines.validation import check_float

    with pytest.raises(ValueError, match=f"`{name}` must be a finite number"):
        check_float(name, value)


def test_numpy_floats_are_accepted():
    from lavit_pipelines.pipelines.validation import check_float

    check_float("guidance_scale", np.float32(7.5))
    check_float("top_p", np.float64(1.0))


T2I_BAD_FLOATS = [
    dict(guidance_scale=math.nan),
    dict(guidance_scale=math.inf),
    dict(guidance_scale=-0.5),
    dict(eta=math.nan),
    dict(eta=-0.1),
    dict(eta=1.5),
    dict(eta=math.inf),
]
LLM_BAD_FLOATS = [
    dict(llm_guidance_scale=math.nan),
    dict(llm_guidance_scale=math.inf),
    dict(llm_guidance_scale=-1.0),
    dict(temperature=math.inf),
    dict(temperature=math.nan),
    dict(top_p=math.nan),
    dict(top_p=math.inf),
]


@pytest.mark.parametrize("kwargs", T2I_BAD_FLOATS + LLM_BAD_FLOATS)
def test_text2image_floats_checked_before_any_model_runs(guarded_t2i, kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"`{name}` must be a finite number"):
        guarded_t2i("a duck", **kwargs)


@pytest.mark.parametrize("kwargs", T2I_BAD_FLOATS)
def test_decoding_given_tokens_checks_floats(guarded_t2i, kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"`{name}`"):
        guarded_t2i(visual_token_ids=[torch.arange(9)], **kwargs)


@pytest.mark.parametrize("kwargs", LLM_BAD_FLOATS)
def test_generate_visual_tokens_checks_floats(guarded_t2i, kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"`{name}`"):
        guarded_t2i.generate_visual_tokens("a duck", **kwargs)


@pytest.mark.parametrize(
    "kwargs", [dict(guidance_scale=math.nan), dict(eta=-1.0), dict(num_inference_steps=0), dict(image=[])]
)
def test_reconstruct_checks_before_the_visual_tokenizer_runs(guarded_t2i, kwargs):
    kwargs = {"image": PIL.Image.new("RGB", (8, 8)), **kwargs}
    with pytest.raises(ValueError):
        guarded_t2i.reconstruct(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(do_sample=True, temperature=math.inf), "temperature"),
        (dict(do_sample=True, top_p=math.nan), "top_p"),
        (dict(repetition_penalty=math.nan), "repetition_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(length_penalty=math.inf), "length_penalty"),
    ],
)
def test_understanding_floats_checked_before_any_model_runs(guarded_understanding, photo, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must be a finite number"):
        guarded_understanding(photo, **kwargs)
    with pytest.raises(ValueError, match=f"`{name}`"):
        guarded_understanding.caption(photo, **kwargs)


# ------------------------------------------------------------------------------------------------ other inputs


def test_preprocessed_tensor_image_prompt(t2i):
    codes = t2i.generate_visual_tokens(
        "<image> in the snow", image=torch.zeros(1, 3, 224, 224), do_sample=False, max_new_tokens=21
    )
    assert len(codes) == 1 and 0 < len(codes[0]) <= 21


def test_max_new_tokens_bounded_by_the_decoder_queries(guarded_t2i):
    queries = guarded_t2i.pixel_decoder.config.num_queries
    with pytest.raises(ValueError, match=f"at most the pixel decoder's {queries} visual tokens"):
        guarded_t2i("a duck", max_new_tokens=queries + 1)
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        guarded_t2i.generate_visual_tokens("a duck", max_new_tokens=queries + 1)


def test_a_generation_without_visual_tokens_names_the_prompt(t2i):
    end = t2i.language_model.config.image_end_token_id

    def always_end(module, args, output):
        output.logits[..., end] = 1e4
        return output

    handle = t2i.language_model.register_forward_hook(always_end)
    try:
        with pytest.raises(ValueError, match="no visual token for the prompt 'a lonely duck'"):
            t2i("a lonely duck", min_new_tokens=0, max_new_tokens=5, num_inference_steps=1)
    finally:
        handle.remove()


def test_narrow_integer_token_ids_decode_like_long(t2i):
    ids = torch.tensor([3, 250, 7, 100])
    common = dict(num_inference_steps=1, output_type="np", height=64, width=64)
    expected = t2i(visual_token_ids=[ids], generator=torch.Generator().manual_seed(0), **common).images
    for dtype in (torch.int32, torch.int16, torch.uint8):
        narrow = t2i(visual_token_ids=[ids.to(dtype)], generator=torch.Generator().manual_seed(0), **common).images
        np.testing.assert_array_equal(narrow, expected, err_msg=str(dtype))


def test_non_finite_latents_are_refused(guarded_t2i):
    latents = torch.zeros(1, 4, 8, 8)
    latents[0, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="`latents` must hold finite values"):
        guarded_t2i(visual_token_ids=[torch.arange(9)], latents=latents, height=64, width=64)


def test_bool_token_ids_and_wrapped_values_are_refused(guarded_t2i):
    with pytest.raises(TypeError, match=r"`visual_token_ids\[0\]` must be a 1-D integer tensor, got torch.bool"):
        guarded_t2i(visual_token_ids=[torch.ones(4, dtype=torch.bool)])
    codebook = guarded_t2i.pixel_decoder.config.codebook_size
    with pytest.raises(ValueError, match=rf"in \[0, {codebook}\), got values in \[0, {codebook + 5}\]"):
        guarded_t2i(visual_token_ids=[[0, codebook + 5]])


@pytest.mark.parametrize(
    "image, words",
    [
        (PIL.Image.new("RGB", (0, 0)), "at least 1×1 pixels"),
        (PIL.Image.new("RGB", (0, 12)), "at least 1×1 pixels"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "at least 1×1 pixels"),
        (torch.full((1, 3, 224, 224), math.nan), "finite pixel values"),
    ],
)
def test_empty_or_nan_images_are_refused(guarded_t2i, guarded_understanding, image, words):
    with pytest.raises(ValueError, match=words):
        guarded_understanding(image)
    with pytest.raises(ValueError, match=words):
        guarded_t2i("<image> x", image=image)


def test_truncated_image_file_is_named(guarded_t2i, guarded_understanding, truncated_photo):
    with pytest.raises(ValueError, match="truncated.png"):
        guarded_understanding(truncated_photo)
    with pytest.raises(ValueError, match="truncated.png"):
        guarded_t2i("<image> x", image=truncated_photo)


def test_understanding_prompt_longer_than_the_context_is_refused(guarded_understanding, photo):
    context = guarded_understanding.language_model.config.max_position_embeddings
    prompt = " ".join(["wool"] * (context * 2))
    with pytest.raises(ValueError, match=f"exceed the language model's {context}-token context"):
        guarded_understanding(photo, prompt=prompt)
    with pytest.raises(ValueError, match="context"):
        guarded_understanding.answer(photo, prompt)


# ------------------------------------------------------------------------------------------------ CLI


def unavailable_cuda() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "a duck", "--output", "{tmp}/x.png", "--device", "foo"], "--device must be a torch device"),
        (["generate", "a duck", "--output", "{tmp}/x.png", "--device", "CUDA_NOW"], "is available on this machine"),
        (["caption", "{photo}", "--device", "CUDA_NOW"], "is available on this machine"),
        (
            ["reconstruct", "{photo}", "--output", "{tmp}/x.png", "--device", "cuda:-1"],
            "--device must be a torch device",
        ),
        (["caption", "{photo}", "--seed", str(2**64)], "--seed must be an integer"),
        (
            ["generate", "a duck", "--output", "{tmp}/x.png", "--guidance-scale", "nan"],
            "--guidance-scale must be a finite number",
        ),
        (
            ["generate", "a duck", "--output", "{tmp}/x.png", "--guidance-scale", "inf"],
            "--guidance-scale must be a finite number",
        ),
        (
            ["generate", "a duck", "--output", "{tmp}/x.png", "--llm-guidance-scale", "nan"],
            "--llm-guidance-scale must be",
        ),
        (
            ["generate", "a duck", "--output", "{tmp}/x.png", "--llm-guidance-scale=-inf"],
            "--llm-guidance-scale must be",
        ),
        (
            ["generate", "--prompts", "{tmp}/p.txt", "--output-dir", "{tmp}/out", "--guidance-scale", "nan"],
            "--guidance-scale",
        ),
        (["generate", "a duck", "--output", "{tmp}/folder.png"], "is a folder"),
        (["generate", "a duck", "--output", "{tmp}/x.png", "--num-images", "2"], "x-1.png' is a folder"),
        (["reconstruct", "{photo}", "--output", "{tmp}/folder.png"], "is a folder"),
        (["generate", "a duck", "--output", "/proc/x.png"], "cannot write in folder '/proc'"),
        (["generate", "--prompts", "{tmp}/latin1.txt", "--output-dir", "{tmp}/out"], "latin1.txt' is not UTF-8 text"),
        (["generate", "--prompts", "{tmp}/p.txt", "--output-dir", "{tmp}/p.txt"], "exists and is not a folder"),
        (["generate", "<image> x", "--image", "{truncated}", "--output", "{tmp}/x.png"], "truncated.png"),
        (["caption", "{truncated}"], "truncated.png"),
        (["ask", "{truncated}", "what?"], "truncated.png"),
        (["reconstruct", "{truncated}", "--output", "{tmp}/x.png"], "truncated.png"),
    ],
)
def test_cli_argument_errors_are_one_line_before_loading(
    tmp_path, capsys, monkeypatch, photo, truncated_photo, args, message
):
    monkeypatch.setattr(LavitText2ImagePipeline, "from_pretrained", None)  # loading a model would fail loudly
    monkeypatch.setattr(LavitUnderstandingPipeline, "from_pretrained", None)
    (tmp_path / "p.txt").write_text("a duck\n")
    (tmp_path / "latin1.txt").write_bytes("un café\n".encode("latin-1"))
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "x-1.png").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [
        a.format(tmp=tmp_path, photo=photo, truncated=truncated_photo).replace("CUDA_NOW", unavailable_cuda())
        for a in args
    ]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_decompression_bomb_is_named(tmp_path, capsys, monkeypatch, photo):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # the 40×30 photo is then over twice the limit
    monkeypatch.setattr(LavitUnderstandingPipeline, "from_pretrained", None)
    assert main(["caption", str(photo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "photo.png" in err[0] and "decompression bomb" in err[0]


# ------------------------------------------------------------------------------------------------ converter


@pytest.fixture
def release(checkpoint_dir, tmp_path) -> Path:
    return linked_copy(checkpoint_dir, tmp_path / "release")


@pytest.mark.parametrize("output", ["{src}", "{src}/language_model", "{src}/new", "{src}/..", "{tmp}", "{cwd}", "."])
def test_convert_refuses_outputs_overlapping_source_or_cwd(release, tmp_path, capsys, monkeypatch, output):
    monkeypatch.chdir(release / "visual_tokenizer")
    before = tree(tmp_path)
    dst = output.format(src=release, tmp=tmp_path, cwd=release / "visual_tokenizer")
    assert main(["convert", str(release), dst, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("overlaps the source" in err[0] or "current directory" in err[0])
    assert tree(tmp_path) == before


def test_convert_never_replaces_a_folder_that_appeared_meanwhile(release, tmp_path, monkeypatch):
    dst = tmp_path / "out" / "lavit"
    original = conversion.write_components

    def someone_else_writes(src, out, *args):
        original(src, out, *args)
        dst.mkdir(parents=True)
        (dst / "theirs.txt").write_text("precious")

    monkeypatch.setattr(conversion, "write_components", someone_else_writes)
    with pytest.raises(FileExistsError, match="appeared during the conversion"):
        conversion.convert(str(release), str(dst))
    assert tree(dst.parent) == {"lavit/theirs.txt": b"precious"}, "nothing replaced, no staging left"


def test_overwrite_replaces_only_the_output_checked_at_the_start(release, tmp_path, monkeypatch):
    dst = tmp_path / "out" / "lavit"
    dst.mkdir(parents=True)
    (dst / "old.txt").write_text("old")
    original = conversion.write_components

    def someone_else_swaps(src, out, *args):
        original(src, out, *args)
        shutil.rmtree(dst)
        dst.mkdir()
        (dst / "theirs.txt").write_text("precious")

    monkeypatch.setattr(conversion, "write_components", someone_else_swaps)
    with pytest.raises(FileExistsError, match="was replaced during the conversion"):
        conversion.convert(str(release), str(dst), overwrite=True)
    assert tree(dst.parent) == {"lavit/theirs.txt": b"precious"}


def test_language_model_tensor_of_the_wrong_shape_is_refused(release, tmp_path):
    path = release / "language_model" / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key] = state[key][:, :-1].clone()
    path.unlink()
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"{key} has shape"):
        conversion.convert(str(release), str(tmp_path / "out" / "lavit"))
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "component, damage, words",
    [
        ("pixel_decoder", lambda f: edit_json(f / "config.json", num_layers=3), "`pixel_decoder` does not match"),
        ("unet", lambda f: edit_json(f / "config.json", cross_attention_dim=40), "`unet`"),
        (
            "language_model",
            lambda f: rewrite_safetensors(
                f / "model.safetensors", lambda s: {**s, "model.norm.weight": s["model.norm.weight"] * math.nan}
            ),
            "NaN",
        ),
        ("scheduler", lambda f: rewrite(f / "scheduler_config.json", b"["), "scheduler_config.json"),
    ],
)
def test_staged_components_are_validated_before_publishing(release, tmp_path, monkeypatch, component, damage, words):
    original = conversion.write_components

    def damaged(src, out, *args):
        original(src, out, *args)
        damage(out / component)

    monkeypatch.setattr(conversion, "write_components", damaged)
    with pytest.raises((ValueError, OSError)) as raised:
        conversion.convert(str(release), str(tmp_path / "out" / "lavit"))
    assert words in str(raised.value)
    assert list((tmp_path / "out").iterdir()) == []


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_convert_cleans_staging_of_killed_conversions(release, tmp_path):
    parent = tmp_path / "out"
    host = socket.gethostname().replace("-", "_")
    stale = parent / f".lavit.building-{host}-{dead_pid()}-abc"
    live = parent / f".lavit.building-{host}-{os.getpid()}-def"
    elsewhere = parent / f".lavit.building-{host}x-{dead_pid()}-ghi"  # another machine sharing the folder
    moved_aside = parent / f".previous.replaced-{host}-{dead_pid()}-jkl" / "previous"
    for folder in (stale, live, elsewhere, moved_aside):
        folder.mkdir(parents=True)
        (folder / "data.bin").write_bytes(b"x" * 10)
    conversion.convert(str(release), str(parent / "lavit"))
    names = sorted(p.name for p in parent.iterdir())
    assert names == sorted(["lavit", live.name, elsewhere.name, "previous"])
    assert (parent / "previous" / "data.bin").read_bytes() == b"x" * 10, "a moved-aside output is put back"


KILLED_CONVERSION = """
import sys, time
from lavit_pipelines import conversion
def stall(*args):
    print("staging", flush=True)
    time.sleep(600)
conversion.convert_vae = stall
conversion.convert(sys.argv[1], sys.argv[2])
"""


def test_staging_of_killed_conversions_is_cleaned_by_the_next(release, tmp_path):
    parent = tmp_path / "out"
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-c", KILLED_CONVERSION, str(release), str(parent / name)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("killed", "terminated")
    }
    for process in processes.values():
        assert process.stdout.readline().strip() == "staging"
    staged = sorted(p.name for p in parent.iterdir())
    assert len(staged) == 2 and staged[0].startswith(".killed.") and staged[1].startswith(".terminated.")
    processes["killed"].send_signal(signal.SIGKILL)
    processes["terminated"].send_signal(signal.SIGTERM)
    for process in processes.values():
        process.wait(timeout=60)
    conversion.convert(str(release), str(parent / "next"))
    assert sorted(p.name for p in parent.iterdir()) == ["next"]


# ------------------------------------------------------------------------------------------------ tiny-model cache


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: truncate(f / "unet" / "diffusion_pytorch_model.safetensors"),
        lambda f: (f / "tokenizer" / "tokenizer.json").write_text("{"),
        lambda f: (f / "model_index.json").unlink(),
        lambda f: (f / "lavit_manifest.json").write_text("not json"),
        lambda f: (f / "vae" / "extra.safetensors").write_bytes(b"junk"),
    ],
)
def test_corrupt_tiny_cache_rebuilds_itself(tmp_path, damage):
    folder = tiny_pipeline_path(tmp_path)
    intact = tree(folder)
    damage(folder)
    assert tiny_pipeline_path(tmp_path) == folder
    assert tree(folder) == intact
    LavitText2ImagePipeline.from_pretrained(folder)


def test_tiny_cache_cleans_staging_of_dead_processes(tmp_path):
    host = socket.gethostname().replace("-", "_")
    stale = tmp_path / f".tiny.building-{host}-{dead_pid()}-abc"
    live = tmp_path / f".tiny.building-{host}-{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
    folder = tiny_pipeline_path(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, live.name])
