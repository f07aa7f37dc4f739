"""The Linear layers pruning rewrites, seen uniformly as ``[out, in]`` weights."""

from __future__ import annotations

import torch
from torch import nn


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D stores its weight as [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or transformers ``Conv1D`` with a 2-D weight: what pruning rewrites."""
    weight = getattr(module, "weight", None)
    kind = isinstance(module, nn.Linear) or _is_conv1d(module)
    return kind and isinstance(weight, torch.Tensor) and weight.ndim == 2


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` (a view for ``nn.Linear``)."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight`` given as ``[out, in]`` into the layer, in the layer's dtype."""
    data = weight.t() if _is_conv1d(module) else weight
    with torch.no_grad():
        module.weight.copy_(data.to(module.weight.dtype))
