"""Map a method name to the block pruner the engine runs for each decoder block."""

from __future__ import annotations

from sparsellm.engine import BlockPruner, layerwise_pruner
from sparsellm.solvers import SOLVERS, Statistic, get_solver

GLOBAL_METHODS = ("sparsellm",)
METHODS = (*sorted(SOLVERS), *GLOBAL_METHODS)


def needs_calibration(method: str) -> bool:
    """False for data-free methods, which skip calibration data and all forward passes."""
    return method in GLOBAL_METHODS or get_solver(method).statistic is not Statistic.NONE


def fallback_pruner(method: str) -> BlockPruner | None:
    """What the divergence guard re-does a diverging block with: SparseGPT, unless that is
    the method already."""
    return None if method == "sparsegpt" else layerwise_pruner(get_solver("sparsegpt"))


def block_pruner(method: str, options: dict) -> BlockPruner:
    """The block pruner for ``method``; ``options`` are the method's own settings."""
    if method == "sparsellm":
        from sparsellm.global_pruner import sparsellm_pruner

        return sparsellm_pruner(**options)
    return layerwise_pruner(get_solver(method))
