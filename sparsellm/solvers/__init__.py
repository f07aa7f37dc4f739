"""Pruning solvers, looked up by method name.

Adding a method means adding one file with a pure function and one entry in ``SOLVERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SolverSpec:
    """A method: its per-layer function and the statistic it needs."""

    name: str
    solve: Callable[..., SolveResult]
    statistic: Statistic


SOLVERS: dict[str, SolverSpec] = {
    spec.name: spec
    for spec in (
        SolverSpec("magnitude", magnitude, Statistic.NONE),
        SolverSpec("wanda", wanda, Statistic.NORMS),
        SolverSpec("sparsegpt", sparsegpt, Statistic.HESSIAN),
    )
}


def get_solver(name: str) -> SolverSpec:
    """The solver registered as ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(SOLVERS))}"
        ) from None


__all__ = [
    "SOLVERS",
    "LayerStatistics",
    "NumericalError",
    "SolveResult",
    "SolverSpec",
    "Statistic",
    "get_solver",
    "inverse_hessian_cholesky",
    "obs_prune",
    "relative_output_error",
]
