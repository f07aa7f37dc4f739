"""Wanda (Sun et al., 2023): score |w_ij|·‖x_j‖, compared within each output row."""

from __future__ import annotations

import torch

from sparsellm.masks import SparsityTarget, select_mask
from sparsellm.solvers.base import LayerStatistics, SolveResult


def wanda(weight: torch.Tensor, stats: LayerStatistics, target: SparsityTarget) -> SolveResult:
    """Prune the lowest |w|·‖x‖ scores per output row (per N:M group for patterns)."""
    scores = weight.abs() * stats.sq_norms.sqrt().unsqueeze(0)
    mask = select_mask(scores, target, per_row=True)
    return SolveResult(weight=weight.masked_fill(mask, 0))
