"""Accumulate input statistics of Linear layers through forward hooks.

Layers that read the very same input tensor (q/k/v, gate/up) share one accumulator: the Gram
matrix is computed once per group with one matmul per batch, in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsellm.solvers.base import LayerStatistics, Statistic


class StatisticsCollector:
    """Context manager that hooks ``modules`` and accumulates :class:`LayerStatistics`.

    Call :meth:`next_batch` before each forward pass of the block.
    """

    def __init__(self, modules: dict[str, nn.Module], kind: Statistic):
        self.modules = modules
        self.kind = kind
        self._owner: dict[str, str] = {}  # layer -> layer whose accumulator it shares
        self._seen: list[tuple[str, torch.Tensor]] = []
        self._learning = True
        self._sums: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> StatisticsCollector:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def next_batch(self) -> None:
        """Mark the start of a new forward pass (sharing is learned on the first one)."""
        if self._owner:
            self._learning = False
        self._seen.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            x = inputs[0]
            if self._learning:
                # Identity, not equality: only a literally shared input may share statistics.
                owner = next((other for other, t in self._seen if t is x), name)
                self._owner[name] = owner
                self._seen.append((name, x))
            if self._owner[name] != name:
                return
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            if name not in self._sums:
                size = (x.shape[1],) * (2 if self.kind is Statistic.HESSIAN else 1)
                self._sums[name] = torch.zeros(size, dtype=torch.float32, device=x.device)
                self._tokens[name] = 0
            if self.kind is Statistic.HESSIAN:
                self._sums[name].addmm_(x.t(), x)
            else:
                self._sums[name].add_(x.square().sum(dim=0))
            self._tokens[name] += x.shape[0]

        return hook

    def results(self) -> dict[str, LayerStatistics]:
        """Statistics per layer; layers of one sharing group hold the same tensors."""
        by_owner: dict[str, LayerStatistics] = {}
        for owner, total in self._sums.items():
            tokens = self._tokens[owner]
            if self.kind is Statistic.HESSIAN:
                by_owner[owner] = LayerStatistics(
                    tokens=tokens, hessian=total / tokens, sq_norms=total.diagonal() * 1.0
                )
            else:
                by_owner[owner] = LayerStatistics(tokens=tokens, sq_norms=total)
        return {name: by_owner[owner] for name, owner in self._owner.items()}
