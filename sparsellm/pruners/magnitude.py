"""``magnitude``: drop the smallest |w| of each layer; no calibration data."""

from __future__ import annotations

from dataclasses import dataclass

from sparsellm.engine import BlockPruner
from sparsellm.pruners.layerwise import layerwise_pruner
from sparsellm.pruners.registry import Method
from sparsellm.solvers import Statistic, magnitude


@dataclass
class MagnitudeOptions:
    """Magnitude pruning has no options."""


def _build(options: MagnitudeOptions) -> BlockPruner:
    return layerwise_pruner(Statistic.NONE, magnitude)


METHOD = Method("magnitude", "smallest |w| per layer (data-free)", False, MagnitudeOptions, _build)
