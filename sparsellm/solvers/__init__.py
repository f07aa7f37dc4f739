"""Per-layer pruning math: pure tensor functions, no modules, hooks or devices.

Each solver takes one weight ``[out, in]`` (float32), its input statistics and a target, plus
its own keyword options, and returns a :class:`SolveResult`. The block-level methods that use
them are declared in :mod:`sparsellm.pruners`.
"""

from __future__ import annotations

from sparsellm.solvers.base import (
    LayerStatistics,
    NumericalError,
    SolveResult,
    Statistic,
    inverse_hessian_cholesky,
    relative_output_error,
)
from sparsellm.solvers.magnitude import magnitude
from sparsellm.solvers.sparsegpt import obs_prune, sparsegpt
from sparsellm.solvers.wanda import wanda

__all__ = [
    "LayerStatistics",
    "NumericalError",
    "SolveResult",
    "Statistic",
    "inverse_hessian_cholesky",
    "magnitude",
    "obs_prune",
    "relative_output_error",
    "sparsegpt",
    "wanda",
]
