"""Block-level pruning methods, each declared once in the registry.

A method is one file here (its options and its block pruner, see :class:`Method`) plus one
registration line below. The per-layer math behind them lives in :mod:`sparsellm.solvers`.
"""

from __future__ import annotations

from typing import Any

from sparsellm.engine import BlockPruner
from sparsellm.pruners import admm, magnitude, sparsegpt, sparsellm, wanda
from sparsellm.pruners.registry import (
    METHODS,
    Method,
    get_method,
    methods_with,
    option_fields,
    register,
    unregister,
)

register(magnitude.METHOD)
register(wanda.METHOD)
register(sparsegpt.METHOD)
register(sparsellm.METHOD)
register(admm.METHOD)

FALLBACK = "sparsegpt"  # what the divergence guard re-does a diverging block with


def fallback_pruner(method: str, options: Any) -> BlockPruner | None:
    """SparseGPT for the divergence guard, with the run's ``dampening``/``blocksize`` where
    the method has them; ``None`` when the method is SparseGPT already."""
    if method == FALLBACK:
        return None
    spec = get_method(FALLBACK)
    shared = {f: getattr(options, f) for f in ("dampening", "blocksize") if hasattr(options, f)}
    return spec.build(spec.options(**shared))


__all__ = [
    "FALLBACK",
    "METHODS",
    "Method",
    "fallback_pruner",
    "get_method",
    "methods_with",
    "option_fields",
    "register",
    "unregister",
]
