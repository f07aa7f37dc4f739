"""``sparsegpt``: OBS pruning with error compensation, layer by layer (Frantar & Alistarh)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sparsellm.engine import BlockPruner
from sparsellm.masks import SparsityTarget
from sparsellm.pruners.layerwise import layerwise_pruner
from sparsellm.pruners.registry import Method
from sparsellm.settings import ConfigError, setting
from sparsellm.solvers import Statistic, sparsegpt


@dataclass
class SparseGPTOptions:
    """Settings of the OBS sweep."""

    dampening: float = setting(
        0.01, "Hessian damping, fraction of its mean diagonal", "non_negative_number"
    )
    blocksize: int = setting(128, "SparseGPT column block size", "positive_int")

    def check(self, target: SparsityTarget) -> None:
        if target.is_nm and self.blocksize % target.m:
            raise ConfigError(f"blocksize {self.blocksize} is not a multiple of M={target.m}")


def sparsegpt_pruner(options: SparseGPTOptions) -> BlockPruner:
    """SparseGPT on every Linear of a block; also the divergence guard's fallback."""
    solve = functools.partial(sparsegpt, blocksize=options.blocksize, dampening=options.dampening)
    return layerwise_pruner(Statistic.HESSIAN, solve)


SUMMARY = "OBS with error compensation, layer by layer"
METHOD = Method("sparsegpt", SUMMARY, True, SparseGPTOptions, sparsegpt_pruner)
