"""``wanda``: prune the lowest |w|·‖x‖ per output row (Sun et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsellm.pruners.layerwise import layerwise_pruner
from sparsellm.pruners.registry import Method
from sparsellm.solvers import Statistic, wanda


@dataclass
class WandaOptions:
    """Wanda has no options."""


METHOD = Method(
    name="wanda",
    summary="lowest |w|·‖x‖ per output row",
    needs_calibration=True,
    options=WandaOptions,
    build=lambda options: layerwise_pruner(Statistic.NORMS, wanda),
)
