"""The line every benchmark prints first: CPU model, torch thread count, GPU (if any) and library versions."""

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# The CPU features that decide which low-precision kernels run fast.
KERNEL_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "avx_vnni",
)


def cpu_flags() -> str:
    """Which of KERNEL_FLAGS the CPU has (from /proc/cpuinfo; 'unknown' elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return "unknown"
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), []
    )
    return " ".join(flag for flag in KERNEL_FLAGS if flag in flags) or "none of " + " ".join(KERNEL_FLAGS)


def describe_machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"CPU: {cpu_model()} ({cpu_flags()}); {torch.get_num_threads()} torch threads; {gpu}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
