"""Accumulate input statistics of Linear layers through forward pre-hooks.

Layers that read the very same input tensor (q/k/v, gate/up) share one accumulator: the Gram
matrix is computed once per group, on its upper block triangle.

Each window's contribution is formed in float32 and added to a float64 sum. Sums of a few
float32 numbers are exact in float64 (for practically every entry), so the statistics do not
depend on how the windows are batched, nor on the order the batches are added in, nor on how
they are shared among ranks: K ranks get the very Hessian one process gets, bit for bit, and
so the same masks (at 70 % SparseGPT's mask choices are chaotic in the last bit of the
Hessian: float32 sums in another order moved SmolLM2's perplexity from 175.6 to 194.7).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsellm.distributed import all_reduce_sum_
from sparsellm.linalg import add_gram_upper, gram_blocks, mirror_upper
from sparsellm.solvers.base import LayerStatistics, Statistic


class StopForward(Exception):
    """Raised once every hooked layer has seen its input, when nothing after it is needed."""


class StatisticsCollector:
    """Context manager that hooks ``modules`` and accumulates :class:`LayerStatistics`.

    Call :meth:`next_batch` before each forward pass of the block. ``window``: tokens per
    calibration window, the unit each contribution is formed over. With ``stop_early`` the
    pass is cut short (by :class:`StopForward`) as soon as the last hooked layer has recorded
    its input, which spares that layer's matmul and anything after it.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        kind: Statistic,
        stop_early: bool = False,
        window: int | None = None,
    ):
        self.modules = modules
        self.kind = kind
        self.stop_early = stop_early
        self.window = window  # tokens per calibration window; None: a 3-D input's dim -2
        self._owner: dict[str, str] = {}  # layer -> layer whose accumulator it shares
        self._seen: list[tuple[str, torch.Tensor]] = []
        self._seen_count = 0
        self._learning = True
        self._sums: dict[str, torch.Tensor] = {}
        self._blocks: dict[str, list[tuple[int, int]]] = {}
        self._tokens: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> StatisticsCollector:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
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
        self._seen_count = 0

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            if self._learning:
                # Identity, not equality: only a literally shared input may share statistics.
                owner = next((other for other, t in self._seen if t is x), name)
                self._owner[name] = owner
                self._seen.append((name, x))
            self._seen_count += 1
            if self._owner[name] == name:
                self._accumulate(name, x)
            if self.stop_early and self._seen_count == len(self.modules):
                raise StopForward

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        width = x.shape[-1]
        if name not in self._sums:
            size = (width, width) if self.kind is Statistic.HESSIAN else (width,)
            self._sums[name] = torch.zeros(size, dtype=torch.float64, device=x.device)
            self._blocks[name] = gram_blocks(width, 128 if width <= 1024 else 256)
            self._tokens[name] = 0
        # One window (a sequence) at a time: each contribution is then the same float32
        # product however the windows were batched, and the float64 sum of them does not
        # depend on the batch size either (--offload disk uses smaller batches). Rows are cut
        # by count, not by shape: OPT flattens its FFN input to [tokens, width].
        rows = x.detach().reshape(-1, width)
        size = self.window or (x.shape[-2] if x.dim() > 2 else rows.shape[0])
        for window in rows.split(size):
            window = window.to(torch.float32)
            if self.kind is Statistic.HESSIAN:
                add_gram_upper(self._sums[name], window, self._blocks[name])
            else:
                self._sums[name].add_(window.square().sum(dim=0))
            self._tokens[name] += window.shape[0]

    def results(self) -> dict[str, LayerStatistics]:
        """Statistics per layer; layers of one sharing group hold the same tensors.

        Under ``torch.distributed`` the sums and token counts are all-reduced first, so every
        rank gets the statistics of all ranks' tokens (every rank must call this)."""
        by_owner: dict[str, LayerStatistics] = {}
        for owner, total in self._sums.items():
            counted = torch.tensor([self._tokens[owner]], dtype=torch.float64, device=total.device)
            all_reduce_sum_(total)
            tokens = int(all_reduce_sum_(counted).item())
            if self.kind is Statistic.HESSIAN:
                mirror_upper(total, self._blocks[owner])
                sq_norms = total.diagonal().to(torch.float32)
                hessian = total.div_(tokens).to(torch.float32)
                by_owner[owner] = LayerStatistics(tokens=tokens, hessian=hessian, sq_norms=sq_norms)
            else:
                by_owner[owner] = LayerStatistics(tokens=tokens, sq_norms=total.to(torch.float32))
            self._sums[owner] = None  # the float64 sum: twice the Hessian's bytes
        return {name: by_owner[owner] for name, owner in self._owner.items()}
