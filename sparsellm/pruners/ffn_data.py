"""The data of SparseLLM's joint FFN solve, on the host: what the FFN is fitted to (the goal
``B* = B₀ + λ (Bₘ − B₀)`` and each token's weight), the pass that captures the FFN's inputs
and targets, and the pruned block's outputs formed from them without another forward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sparsellm.distributed import all_reduce_sum_
from sparsellm.engine import BlockJob
from sparsellm.memory import host_empty, to_host
from sparsellm.models import FeedForward, linear_weight
from sparsellm.solvers.sparsellm import RowDifference, blend

_FFN_ROWS = 4096  # rows per chunk when the pruned FFN's outputs are formed


@dataclass
class FFNData:
    """What the joint FFN solve works on, as ``[N, d]`` host tensors (tokens as rows)."""

    X: torch.Tensor  # FFN inputs, model dtype
    # What the FFN should output: float32 rows of F₀ (general path), or B* − r formed from
    # the dense outputs and the residual as it is read (residual path: no stored copy).
    target: torch.Tensor | RowDifference
    residual: torch.Tensor | None  # float32 r: the block output, FFN output 0 (residual path)


@dataclass
class Goal:
    """The block output the FFN is fitted to, ``B* = B₀ + λ (Bₘ − B₀)``, as its parts."""

    dense: list[torch.Tensor]  # B₀: the dense block on the pruned inputs
    model: list[torch.Tensor] | None  # Bₘ: the dense model's output of the block
    correction: float  # λ


class _FFNRecorder:
    """Fills the host buffers of :class:`FFNData` batch by batch during one forward pass.

    Only ``X`` and the residual (residual path) or the float32 target (general path) are
    kept: the FFN output and the block output of a batch live on the device until its rows
    are formed, so the host holds two ``[N, d]`` tensors besides the engine's own. On the
    residual path the FFN's layers output zeros (:func:`_zero_outputs`), so the block output
    is ``r`` itself.
    """

    def __init__(self, job: BlockJob, goal: Goal, residual: bool):
        self.job, self.goal, self.residual_path = job, goal, residual
        self.tokens = job.inputs.tokens
        self.data: FFNData | None = None
        self.ffn_out: torch.Tensor | None = None
        self.x_rows = self.rows = 0

    def _buffers(self, x: torch.Tensor) -> FFNData:
        shape, device = (self.tokens, x.shape[-1]), self.job.options.device
        X = host_empty(shape, x.dtype, device)
        if self.residual_path:
            residual = host_empty(shape, torch.float32, device)
            goal = self.goal
            target = RowDifference(goal.dense, residual, goal.model, goal.correction)
            return FFNData(X, target, residual)
        return FFNData(X, host_empty(shape, torch.float32, device), None)

    def on_input(self, module: nn.Module, inputs: tuple, output: object) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
        self.data = self.data or self._buffers(x)
        self.data.X[self.x_rows : self.x_rows + x.shape[0]].copy_(x)
        self.x_rows += x.shape[0]

    def on_output(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # A copy: some blocks (Falcon) add into the FFN output in place afterwards.
        self.ffn_out = output.detach().clone()

    def on_block(self, block_out: torch.Tensor) -> None:
        """The batch's block output: its residual rows ``r`` (the FFN output zero) or its
        target rows ``F₀`` (general path)."""
        d = block_out.shape[-1]
        source = block_out if self.residual_path else self.ffn_out
        rows = slice(self.rows, self.rows + source.numel() // d)
        # residual path: the target Y = B* − r is read from B₀, Bₘ and r (RowDifference)
        store = self.data.residual if self.residual_path else self.data.target
        store[rows].copy_(source.reshape(-1, d))
        self.rows, self.ffn_out = rows.stop, None


@contextlib.contextmanager
def _zero_outputs(modules: list[nn.Module]) -> Iterator[None]:
    """Each module returns zeros of its output shape instead of computing (hooks still run).

    On the residual path the layout check showed the block output moves by exactly what is
    added to the FFN output, so with a zero FFN output the block returns ``r`` itself: no
    ``B − F`` rounding, and the capture pass skips the FFN's matmuls (most of a block's work).
    """

    def zeros(module: nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], linear_weight(module).shape[0])

    # An instance ``forward`` may be someone's wrapper (accelerate's offload hooks): restored.
    previous = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = functools.partial(zeros, module)
    try:
        yield
    finally:
        for module, forward in zip(modules, previous, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def capture_ffn(job: BlockJob, ffn: FeedForward, goal: Goal, residual: bool) -> FFNData:
    """FFN inputs and targets (and the residual) over the calibration batches, on the host."""
    recorder = _FFNRecorder(job, goal, residual)
    handles = [job.layers[ffn.up].register_forward_hook(recorder.on_input)]
    if not residual:
        handles.append(job.layers[ffn.down].register_forward_hook(recorder.on_output))
    silenced = [job.layers[name] for name in ffn.names] if residual else []
    try:
        with _zero_outputs(silenced):
            job.forward(collect=recorder.on_block)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.data


def pruned_outputs(job: BlockJob, ffn: FeedForward, data: FFNData) -> list[torch.Tensor]:
    """Block outputs ``r + FFN(X)`` with the pruned FFN, written over the residual, cut back
    into the engine's batches; the FFN runs on the device a chunk of rows at a time."""
    rows = _FFN_ROWS
    for start in range(0, data.X.shape[0], rows):
        x = data.X[start : start + rows].to(job.options.device, non_blocking=True)
        data.residual[start : start + rows] += to_host(ffn.forward(x, job.layers, chunk=rows))
    return _as_batches(data.residual, job.inputs.hidden)


def token_weights(goal: Goal, device: torch.device | None = None) -> torch.Tensor:
    """Each token's weight ``1 / ‖B*_t‖²``, scaled to mean 1 over every rank's tokens.

    Whatever reads the block's output normalises each token first (the next block's norm, the
    final norm), so what a token's error costs is its size relative to the token's norm. A
    plain sum lets a few huge tokens rule the fit: SmolLM2's first token of every window
    (an attention sink) carries 67-98 % of the energy of blocks 11-27's outputs.
    """
    squares = []
    for i, dense in enumerate(goal.dense):
        rows = dense.float()
        if goal.model is not None and goal.correction:
            rows = blend(rows, goal.model[i], goal.correction)  # B*, as the target forms it
        squares.append(rows.square().sum(-1).reshape(-1).double())
    sq = torch.cat(squares)
    weights = 1.0 / sq.clamp_min(float(sq.median()) * 1e-2)  # a zero output: not infinite
    # on the work device: NCCL reduces device tensors only
    total = torch.tensor([float(weights.sum()), float(weights.numel())], device=device)
    all_reduce_sum_(total)
    return (weights * float(total[1] / total[0])).float()


def _as_batches(rows: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``rows`` [N, d] cut back into tensors shaped and typed as the batches in ``like``."""
    sizes = [t.numel() // t.shape[-1] for t in like]
    return [part.view(t.shape).to(t.dtype) for part, t in zip(rows.split(sizes), like, strict=True)]
