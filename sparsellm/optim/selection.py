"""Which tensors a :class:`~sparsellm.optim.SparseOptimizer` sparsifies, and how sparse they are."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from sparsellm.models.base import decoder_layers
from sparsellm.models.linear import is_linear

__all__ = [
    "ParamSelection",
    "decoder_layers",
    "select_parameters",
    "sparsifiable_parameters",
    "zero_fraction",
]

ParamSelection = (
    Iterable[torch.Tensor]
    | Iterable[tuple[str, torch.Tensor]]
    | Callable[[str, torch.Tensor], bool]
    | None
)


def sparsifiable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights pruning is meant for: the 2-D ``weight`` of every ``nn.Linear`` (and
    transformers ``Conv1D``) inside the decoder blocks (see :func:`decoder_layers`).

    Embeddings, norms, biases and ``lm_head`` live outside the blocks or are not Linear weights,
    so they are never returned. Names are the model's own ``named_parameters`` names, in model
    order; tied weights appear once.
    """
    wanted = {id(m.weight) for m in decoder_layers(model).modules() if is_linear(m)}
    return [(name, p) for name, p in model.named_parameters() if id(p) in wanted]


def zero_fraction(tensors: Iterable[torch.Tensor]) -> float:
    """Fraction of exact zeros over all entries of ``tensors`` (0 for none)."""
    zeros = total = 0
    for t in tensors:
        zeros += int((t.detach() == 0).sum())
        total += t.numel()
    return zeros / total if total else 0.0


def select_parameters(
    selection: ParamSelection,
    model: nn.Module | None,
    param_groups: list[dict[str, Any]],
) -> list[tuple[str, torch.Tensor]]:
    """Resolve a ``params_to_sparsify`` argument to named tensors, each once, in given order.

    ``None`` means :func:`sparsifiable_parameters` of ``model`` or, without a model, every
    tensor in ``param_groups``; a callable ``(name, param) -> bool`` filters
    ``model.named_parameters()``; otherwise an iterable of tensors or ``(name, tensor)`` pairs.
    Unnamed tensors take their name in ``model``, else ``param<i>``.
    """
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    if selection is None:
        if model is not None:
            try:
                chosen = list(sparsifiable_parameters(model))
            except ValueError as exc:  # not a decoder stack: the caller must choose
                raise ValueError(f"{exc}; pass params_to_sparsify= to choose the tensors") from None
        else:
            chosen = [(None, p) for g in param_groups for p in g["params"]]
    elif callable(selection):
        if model is None:
            raise ValueError("a callable params_to_sparsify needs model=")
        chosen = [(n, p) for n, p in model.named_parameters() if selection(n, p)]
    else:
        chosen = [item if isinstance(item, tuple) else (None, item) for item in selection]
    result: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for name, p in chosen:
        if not isinstance(p, torch.Tensor):
            hint = (
                "; to choose by name pass a callable, e.g. lambda name, p: name.endswith("
                "'proj.weight')"
                if isinstance(p, str)
                else ""
            )
            raise TypeError(
                f"params_to_sparsify must yield tensors, got {type(p).__name__} {p!r:.60}{hint}"
            )
        if id(p) in seen:
            continue
        seen.add(id(p))
        result.append((name or names.get(id(p)) or f"param{len(result)}", p))
    if not result:  # a filter that matches nothing would make every step a silent no-op
        raise ValueError("params_to_sparsify selects no tensor: nothing would be sparsified")
    return result
