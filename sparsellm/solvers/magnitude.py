"""Magnitude pruning: drop the smallest |w| of each layer (no calibration data)."""

from __future__ import annotations

import torch

from sparsellm.masks import SparsityTarget, select_mask
from sparsellm.solvers.base import LayerStatistics, SolveResult


def magnitude(
    weight: torch.Tensor, stats: LayerStatistics | None, target: SparsityTarget
) -> SolveResult:
    """Zero the smallest magnitudes, layer-wide top-k (or per N:M group)."""
    mask = select_mask(weight.abs(), target)
    return SolveResult(weight=weight.masked_fill(mask, 0))
