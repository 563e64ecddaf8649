"""Stage breakdown of one full text-to-image call on CPU: visual tokens, pixel decoder, UNet steps, VAE decode,
with peak traced Python-side memory (tracemalloc) and peak RSS.

    python benchmarks/stage_breakdown.py [--pipeline PATH] [--steps 4] [--tokens 64]

Without `--pipeline`, the tiny fixture checkpoint (tests/fixtures/lavit-tiny-original) is converted into a
temporary folder first.
"""

import argparse
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from lavit_pipelines import LavitText2ImagePipeline
from machine import describe_machine

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "lavit-tiny-original" / "original_checkpoint"


class StageTimer:
    """Wraps a bound method and adds its wall time to `self.seconds`."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.seconds, self.calls = owner, name, 0.0, 0
        self.inner = getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def restore(self):
        setattr(self.owner, self.name, self.inner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", help="a converted LaVIT folder (default: convert the tiny fixture)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--size", type=int, default=None, help="height = width (default: the UNet's native size)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = args.pipeline
    if path is None:
        from lavit_pipelines.conversion import convert

        path = convert(str(FIXTURE), str(Path(tempfile.mkdtemp()) / "lavit-tiny"))
    pipe = LavitText2ImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        num_inference_steps=args.steps, min_new_tokens=args.tokens, max_new_tokens=args.tokens, output_type="np"
    )
    if args.size:
        kwargs.update(height=args.size, width=args.size)
    pipe("warm-up", generator=torch.Generator().manual_seed(0), **kwargs)

    timers = {
        "visual tokens (LLM)": StageTimer(pipe, "generate_visual_tokens"),
        "pixel decoder": StageTimer(pipe.pixel_decoder, "forward"),
        "UNet (all steps)": StageTimer(pipe.unet, "forward"),
        "VAE decode": StageTimer(pipe, "decode_latents"),
    }
    tracemalloc.start()
    start = time.perf_counter()
    out = pipe("a sculpture of a duck made of wool", generator=torch.Generator().manual_seed(0), **kwargs)
    total = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    for timer in timers.values():
        timer.restore()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    tokens = len(out.visual_token_ids[0])
    print(
        f"pipeline {path}; image {out.images.shape[1]}x{out.images.shape[2]}; {tokens} visual tokens; "
        f"{args.steps} UNet steps (CFG batch 2)"
    )
    print(describe_machine())
    print("| stage | calls | total ms | per call ms | share |")
    print("|---|---:|---:|---:|---:|")
    for name, timer in timers.items():
        per = timer.seconds / max(timer.calls, 1) * 1e3
        print(f"| {name} | {timer.calls} | {timer.seconds * 1e3:.1f} | {per:.2f} | {timer.seconds / total:.0%} |")
    rest = total - sum(t.seconds for t in timers.values())
    print(f"| rest (prompt, scheduler, post-processing) | | {rest * 1e3:.1f} | | {rest / total:.0%} |")
    print(f"| **total** | | {total * 1e3:.1f} | | |")
    print(
        f"per visual token: {timers['visual tokens (LLM)'].seconds / tokens * 1e3:.2f} ms; "
        f"per UNet step: {timers['UNet (all steps)'].seconds / args.steps * 1e3:.2f} ms"
    )
    print(
        f"peak traced allocations during the call (tracemalloc; tensors are not traced): {traced_peak / 2**20:.1f} MiB; "
        f"peak RSS of the process: {rss_peak:.0f} MiB"
    )


if __name__ == "__main__":
    main()
