"""The processes of `accelerate launch`: their shared state, and how they leave together (used by the CLI's batch
generation and by the evaluations)."""

import torch


def process_state():
    """accelerate's `PartialState`, on the CPU (gloo) when `ACCELERATE_USE_CPU` is set or there is no GPU: a plain
    `PartialState()` would not see the processes of `accelerate launch --multi_gpu` on a CPU-only machine."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def leave_together(state) -> None:
    """The end of a successful `accelerate launch` run: every process waits for the others, then leaves the
    process group. A process that exits while another is still working makes gloo abort that one."""
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()
