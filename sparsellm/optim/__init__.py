"""Sparsity-inducing optimizer wrapper: sparsity rules after any ``torch.optim`` update.

:class:`SparseOptimizer` lets the wrapped optimizer take the gradient step and then applies its
rules to the selected weights: proximal steps (:class:`L1Proximal`, :class:`HardThreshold`), a
schedule to an exact sparsity (:class:`GradualSparsity`) and frozen zeros (:class:`FrozenMask`).
The flag-style constructor builds these rules; ``rules=[...]`` passes them directly.
"""

from sparsellm.optim.flags import SparsityFlags
from sparsellm.optim.optimizer import SparseOptimizer
from sparsellm.optim.rules import FrozenMask, HardThreshold, L1Proximal, SparsityRule
from sparsellm.optim.schedule import FisherSaliency, GradualSparsity, MagnitudeSaliency
from sparsellm.optim.selection import decoder_layers, sparsifiable_parameters, zero_fraction

__all__ = [
    "FisherSaliency",
    "FrozenMask",
    "GradualSparsity",
    "HardThreshold",
    "L1Proximal",
    "MagnitudeSaliency",
    "SparseOptimizer",
    "SparsityFlags",
    "SparsityRule",
    "decoder_layers",
    "sparsifiable_parameters",
    "zero_fraction",
]
