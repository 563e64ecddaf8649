"""The documentation site builds with no warnings (`mkdocs build --strict`), API pages included."""

import html
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "LavitText2ImagePipeline" in api and "generate_visual_tokens" in api
    text = " ".join(re.sub(r"<[^>]+>", " ", html.unescape(api)).split())
    # one row per argument, with its default (griffe warns, and --strict fails, on any other docstring entry)
    assert "num_inference_steps int number of denoising steps" not in text  # sanity of the pattern below
    assert re.search(r"num_inference_steps int denoising steps\. 25", text)
    assert re.search(r"width int \| None output width, as height \. None", text)
    assert re.search(r"no_repeat_ngram_size", text) and re.search(r"top_p float \| None nucleus sampling", text)
