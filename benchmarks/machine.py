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


def describe_machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"CPU: {cpu_model()}; {torch.get_num_threads()} torch threads; {gpu}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")
