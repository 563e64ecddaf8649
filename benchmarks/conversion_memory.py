"""Peak memory of converting a LaVIT release folder, against the size of its largest source file.

    python benchmarks/conversion_memory.py /path/to/LaVIT-7B-v2 [--pixel_decoder lowres] [--dtype bfloat16]

The conversion runs in a child process (output to a temporary folder); its peak resident set size comes from
`os.wait4`. A second child that only imports the converter gives the baseline, so that the streaming cost
(peak - baseline) can be read against the largest tensor file the conversion reads: near 1x means the
converter holds about one file at a time.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lavit_pipelines.conversion import DTYPES, PIXEL_DECODERS
from machine import describe_machine

# Everything the conversion imports, lazily loaded modules included.
IMPORT_ONLY = (
    "import lavit_pipelines.conversion as c, sentencepiece, transformers.models.llama.modeling_llama; "
    "c.UNet2DConditionModel, c.AutoencoderKL, c.DDIMScheduler"
)
CONVERT = "import sys; from lavit_pipelines.conversion import convert; convert(*sys.argv[1:4], sys.argv[4] or None)"
MIB = 2**20


def peak_rss(*args: str) -> tuple[int, float]:
    """Run `python -c args...` -> (peak RSS in bytes, wall seconds); raises if the child fails."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", *args])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"the child process failed with exit code {child.returncode}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return usage.ru_maxrss * scale, time.perf_counter() - start


def largest_source_file(src: Path, variant: str) -> Path:
    """The largest file under the folders this conversion reads."""
    folders = ("language_model", "visual_tokenizer", PIXEL_DECODERS[variant][0])
    return max(
        (p for folder in folders for p in (src / folder).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_path", type=Path, help="release folder (rain1011/LaVIT-7B-v2 layout)")
    parser.add_argument("--pixel_decoder", choices=sorted(PIXEL_DECODERS), default="highres")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="")
    args = parser.parse_args(argv)

    largest = largest_source_file(args.checkpoint_path, args.pixel_decoder)
    size = largest.stat().st_size
    baseline, _ = peak_rss(IMPORT_ONLY)
    with tempfile.TemporaryDirectory() as tmp:
        peak, seconds = peak_rss(
            CONVERT, str(args.checkpoint_path), str(Path(tmp) / "out"), args.pixel_decoder, args.dtype
        )
    print(describe_machine())
    print(f"largest source file : {size / MIB:10.1f} MiB  ({largest.relative_to(args.checkpoint_path)})")
    print(f"import-only peak RSS: {baseline / MIB:10.1f} MiB")
    print(f"conversion peak RSS : {peak / MIB:10.1f} MiB  ({seconds:.1f} s)")
    print(f"peak / largest file : {peak / size:10.2f}")
    print(f"(peak - import) / largest file: {(peak - baseline) / size:.2f}")


if __name__ == "__main__":
    main()
