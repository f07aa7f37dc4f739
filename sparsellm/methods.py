"""Map a method name to the block pruner the engine runs for each decoder block."""

from __future__ import annotations

from sparsellm.config import PruneConfig
from sparsellm.engine import BlockPruner, layerwise_pruner
from sparsellm.solvers import get_solver


def block_pruner(config: PruneConfig) -> BlockPruner:
    """The block pruner for ``config.method``."""
    return layerwise_pruner(get_solver(config.method))
