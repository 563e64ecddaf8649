"""The `lavit` command line: outputs on the embedded demo model, one-line errors, multi-process batches."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import TWO_PROCESS_LAUNCH

from lavit_pipelines.cli import main

FAST = ["--steps", "2", "--max-new-tokens", "8"]


# One thread per process, so that one process and two processes compute the same floats.
SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lavit_pipelines.cli", *args], capture_output=True, text=True, env=SINGLE_THREAD
    )


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    PIL.Image.new("RGB", (40, 30), (200, 30, 10)).save(path)
    return path


def test_generate_on_embedded_model_is_reproducible(tmp_path, capsys):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "a duck", "--output", str(first), "--seed", "3", *FAST]) == 0
    assert main(["generate", "a duck", "--output", str(second), "--seed", "3", *FAST]) == 0
    assert first.read_bytes() == second.read_bytes()
    assert PIL.Image.open(first).size == (64, 64)


def test_generate_compile_draws_the_same_image_with_a_compiled_static_step(tmp_path, aot_eager_compile):
    """`--compile` decodes through the static cache and a torch.compile'd step (aot_eager here, to keep the test
    short; the benchmarks use inductor) and draws the image of the eager path."""
    compiled = aot_eager_compile
    eager, static = tmp_path / "eager.png", tmp_path / "static.png"
    assert main(["generate", "a red circle", "--output", str(eager), "--seed", "3", *FAST]) == 0
    assert not compiled
    assert main(["generate", "a red circle", "--output", str(static), "--seed", "3", "--compile", *FAST]) == 0
    assert compiled and eager.read_bytes() == static.read_bytes()


def test_generate_warns_of_unseen_words_on_stderr(tmp_path, capsys):
    assert main(["generate", "a red duck in the snow", "--output", str(tmp_path / "x.png"), *FAST]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lavit")]  # not progress bars
    assert err == [
        "lavit generate: warning: the model was never trained on the words 'duck', 'snow': expect a "
        "picture of something else"
    ]
    assert main(["generate", "A red circle in the center.", "--output", str(tmp_path / "y.png"), *FAST]) == 0
    assert "lavit generate: warning" not in capsys.readouterr().err


def test_unseen_words_only_for_a_model_that_declares_its_words(converted_dir):
    from transformers import AutoTokenizer

    from lavit_pipelines.demo import default_model_path
    from lavit_pipelines.tokenization import unseen_words

    demo = AutoTokenizer.from_pretrained(default_model_path() / "tokenizer")
    assert unseen_words(demo, "<image> a Red DOG, on the left of a dog's bone") == ["dog", "dog's", "bone"]
    release_layout = AutoTokenizer.from_pretrained(converted_dir / "tokenizer")  # declares none, as LaVIT-7B's
    assert unseen_words(release_layout, "a zyxwv qqq") == []


def test_generate_several_images_and_image_prompt(tmp_path, photo):
    out = tmp_path / "duck.png"
    assert (
        main(
            ["generate", "<image> in the snow", "--image", str(photo), "--num-images", "2", "--output", str(out), *FAST]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["duck-0.png", "duck-1.png"]


@pytest.mark.parametrize("command", [["caption"], ["ask", "QUESTION"]])
def test_caption_and_ask_print_one_line(photo, capsys, command):
    argv = [command[0], str(photo), *command[1:]]
    assert main([a.replace("QUESTION", "what is it?") for a in argv]) == 0
    out = capsys.readouterr().out  # a plain red picture is not of the shapes world: any one line
    assert out.endswith("\n") and out.count("\n") == 1


def test_caption_several_images_one_line_each(photo, tmp_path, capsys):
    other = tmp_path / "other.png"
    PIL.Image.new("RGB", (20, 50), (0, 90, 200)).save(other)
    assert main(["caption", str(photo), str(other)]) == 0
    assert capsys.readouterr().out.count("\n") == 2


HELP_IMPORTS = """
import sys
from lavit_pipelines.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["--version"]])
def test_help_and_version_import_no_heavy_library(args):
    out = subprocess.run([sys.executable, "-c", HELP_IMPORTS, *args], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"


def test_version_and_defaults_in_help(capsys):
    from lavit_pipelines import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"lavit {__version__}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "denoising steps (default: 25)" in text
        and "decoder guidance (default: the model's: 7.0 for LaVIT, 2.5 for the demo model)" in text
    )
    assert "NAME-0.png" in text and "(default: None)" not in text


def test_reconstruct(tmp_path, photo):
    out = tmp_path / "rec.png"
    assert main(["reconstruct", str(photo), "--output", str(out), "--steps", "2"]) == 0
    assert PIL.Image.open(out).size == (64, 64)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "a duck", "--output", "{tmp}/x.png", "--height", "30"], "--height must be a multiple of 8"),
        (["generate", "a duck", "--output", "{tmp}/x.png", "--aspect-ratio", "5:1"], "--aspect-ratio must be one of"),
        (["generate", "a duck", "--output", "{tmp}/x.gif2"], "--output must end in one of"),
        (["generate", "a duck", "--output", "{tmp}/missing/x.png"], "does not exist"),
        (["generate", "a duck"], "--output is required"),
        (["generate", "<image> a duck", "--output", "{tmp}/x.png"], "1 <image> placeholders but 0 --image"),
        (["generate", "<image> a duck", "--image", "{tmp}/nope.png", "--output", "{tmp}/x.png"], "no such file"),
        (["generate", "--prompts", "{tmp}/p.txt"], "--prompts needs --output-dir"),
        (["caption", "{tmp}/nope.jpg"], "no such file"),
        (["convert", "{tmp}/no-checkpoint", "{tmp}/out"], "neither a folder nor a Hub repo id"),
        (
            ["generate", "a duck", "--output", "{tmp}/x.png", "--model", "{tmp}/no-model"],
            "neither a converted LaVIT folder",
        ),
        (["generate", "a duck", "--output", "{tmp}/x.png", "--guidance-scale", "-2"], "--guidance-scale must be"),
    ],
)
def test_bad_arguments_give_one_line_and_no_output(tmp_path, capsys, args, message):
    (tmp_path / "p.txt").write_text("a duck\n")
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "out").exists()


def test_argparse_errors_exit_nonzero_without_traceback():
    result = run_cli("generate", "a duck", "--steps", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "positive integer" in result.stderr


def test_convert_command(checkpoint_dir, tmp_path):
    out = tmp_path / "converted"
    assert main(["convert", str(checkpoint_dir), str(out)]) == 0
    assert (out / "model_index.json").is_file()
    assert main(["convert", str(checkpoint_dir), str(out)]) == 2  # exists: refused without --overwrite


def test_prompt_file_sharded_across_two_processes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a duck\na cat\na dog\n")
    args = ["generate", "--prompts", str(prompts), *FAST]
    single = run_cli(*args, "--output-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    # `--cpu --num_processes 2` starts one process in accelerate 1.15: two CPU processes need --multi_gpu.
    launch = [
        *TWO_PROCESS_LAUNCH,
        "-m",
        "lavit_pipelines.cli",
        *args,
        "--output-dir",
        str(tmp_path / "two"),
    ]
    double = subprocess.run(launch, capture_output=True, text=True, env={**SINGLE_THREAD, "ACCELERATE_USE_CPU": "1"})
    assert double.returncode == 0, double.stderr[-8000:]
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png"]
    for name in names:  # float sums may round one grey level apart between two processes and one
        one, two = (np.asarray(PIL.Image.open(tmp_path / run / name), dtype=np.int16) for run in ("one", "two"))
        assert np.abs(one - two).max() <= 1


REFUSAL_IMPORTS = """
import sys
from lavit_pipelines.cli import main
code = main(sys.argv[1:])
print(code, sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize("output", ["folder", "folder.png"])
def test_generate_refuses_an_existing_folder_as_output_before_importing_torch(tmp_path, output):
    (tmp_path / output).mkdir()
    result = subprocess.run(
        [sys.executable, "-c", REFUSAL_IMPORTS, "generate", "a red circle", "--output", str(tmp_path / output)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines()[-1] == "2 []"
    assert result.stderr.startswith("lavit generate: error: --output") and result.stderr.count("\n") == 1


def test_ask_refuses_a_question_longer_than_the_context_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import PIL.Image

    from lavit_pipelines import LavitUnderstandingPipeline

    def loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(LavitUnderstandingPipeline, "from_pretrained", loading)
    image = tmp_path / "image.png"
    PIL.Image.new("RGB", (64, 64), "white").save(image)
    assert main(["ask", str(image), "what colour is the circle? " * 2000]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lavit ask: error: `prompt` (") and "token context" in err and err.count("\n") == 1
