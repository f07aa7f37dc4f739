"""``magnitude``: drop the smallest |w| of each layer; no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

from sparsellm.pruners.layerwise import layerwise_pruner
from sparsellm.pruners.registry import Method
from sparsellm.solvers import Statistic, magnitude


@dataclass
class MagnitudeOptions:
    """Magnitude pruning has no options."""


METHOD = Method(
    name="magnitude",
    summary="smallest |w| per layer (data-free)",
    needs_calibration=False,
    options=MagnitudeOptions,
    build=lambda options: layerwise_pruner(Statistic.NONE, magnitude),
)
