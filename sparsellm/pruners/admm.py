"""``admm``: ADMM with a rising penalty and conjugate-gradient refinement, layer by layer
(ALPS-style; the math is in :mod:`sparsellm.solvers.admm`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sparsellm.engine import BlockPruner
from sparsellm.pruners.layerwise import layerwise_pruner
from sparsellm.pruners.registry import Method
from sparsellm.settings import setting
from sparsellm.solvers import Statistic
from sparsellm.solvers.admm import admm


@dataclass
class ADMMOptions:
    """Settings of the ADMM layer solve."""

    dampening: float = setting(
        0.01, "Hessian damping, fraction of its mean diagonal", "non_negative_number"
    )
    admm_iterations: int = setting(60, "most ADMM iterations per layer", "positive_int")
    cg_iterations: int = setting(
        40, "conjugate-gradient steps on the final support", "non_negative_int"
    )


def admm_pruner(options: ADMMOptions) -> BlockPruner:
    """The ADMM solve on every Linear of a block."""
    solve = functools.partial(
        admm,
        iterations=options.admm_iterations,
        cg_iterations=options.cg_iterations,
        dampening=options.dampening,
    )
    return layerwise_pruner(Statistic.HESSIAN, solve)


SUMMARY = "ADMM with a rising penalty, then CG on the support, layer by layer (ALPS-style)"
METHOD = Method("admm", SUMMARY, True, ADMMOptions, admm_pruner)
