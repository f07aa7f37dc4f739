"""``wanda``: prune the lowest |w|·‖x‖ per output row (Sun et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsellm.engine import BlockPruner
from sparsellm.pruners.layerwise import layerwise_pruner
from sparsellm.pruners.registry import Method
from sparsellm.solvers import Statistic, wanda


@dataclass
class WandaOptions:
    """Wanda has no options."""


def _build(options: WandaOptions) -> BlockPruner:
    return layerwise_pruner(Statistic.NORMS, wanda)


METHOD = Method("wanda", "lowest |w|·‖x‖ per output row", True, WandaOptions, _build)
