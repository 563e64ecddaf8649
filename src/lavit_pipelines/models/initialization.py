"""Weight initialisation for models trained from scratch (the release's definitions leave some parameters at zero)."""

import torch


def randomize_zero_parameters(model: torch.nn.Module, std: float = 0.02) -> None:
    """Give parameters that their module initialises to zeros (positions, queries, biases) random values,
    so that no key mapping or position can hide behind a constant."""
    for parameter in model.parameters():
        if not parameter.count_nonzero():
            torch.nn.init.normal_(parameter, std=std)
