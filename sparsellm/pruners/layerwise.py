"""Layer-by-layer pruning: each Linear solved on its own inputs, and the pieces every block
pruner shares (one statistics pass, writing a solution back with its report row)."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from sparsellm.distributed import broadcast_
from sparsellm.engine import BlockJob, BlockPruner, block_output
from sparsellm.masks import SparsityTarget
from sparsellm.memory import to_host
from sparsellm.models import UnsupportedModelError, linear_weight, set_linear_weight
from sparsellm.report import BlockResult, LayerReport
from sparsellm.solvers import (
    LayerStatistics,
    NumericalError,
    SolveResult,
    Statistic,
    relative_output_error,
)
from sparsellm.statistics import StatisticsCollector, StopForward

# A per-layer solver with its options bound: (float32 weight, statistics, target) -> result.
LayerSolve = Callable[[torch.Tensor, LayerStatistics | None, SparsityTarget], SolveResult]


def write_solution(
    job: BlockJob,
    name: str,
    original: torch.Tensor,
    result_weight: torch.Tensor,
    stats: LayerStatistics | None,
    **figures: object,
) -> LayerReport:
    """Check a solver's weight, write it into layer ``name``; its row for the report."""
    module = job.layers[name]
    full = job.full_name(name)
    if not torch.isfinite(result_weight).all():
        raise NumericalError(f"{full}: solver produced NaN/Inf weights; nothing was written")
    set_linear_weight(module, result_weight)
    written = linear_weight(module)
    error = (
        relative_output_error(original, written.float(), stats.hessian)
        if stats is not None and stats.hessian is not None
        else None
    )
    return LayerReport(
        name=full,
        block=job.index,
        shape=list(written.shape),
        sparsity=float((written == 0).float().mean()),
        zeros=int((written == 0).sum()),
        numel=written.numel(),
        relative_error=error,
        **figures,
    )


def _unseen_error(job: BlockJob, name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"unsupported layout: {job.full_name(name)} is never called as a module in a "
        "forward pass (not run for causal LM use, or its weight is used directly), so its "
        "inputs cannot be observed; "
        f"leave it dense with --skip '{re.escape(name)}$'"
    )


def collect_statistics(
    job: BlockJob, layers: dict[str, nn.Module], kind: Statistic, keep_outputs: bool = False
) -> tuple[dict[str, LayerStatistics], list[torch.Tensor]]:
    """One forward pass over the calibration batches with hooks on ``layers``; returns their
    statistics and, with ``keep_outputs``, the block's outputs (weights as they are now).

    Without ``keep_outputs`` each pass stops once the last hooked layer has seen its input
    (typically skipping the down projection's matmul: a quarter of a LLaMA block's FLOPs).
    """
    outputs = []
    stop_early = not keep_outputs
    with torch.no_grad(), StatisticsCollector(layers, kind, stop_early=stop_early) as collector:
        for hidden, args, kwargs in job.inputs.batches():
            collector.next_batch()
            try:
                out = job.block(hidden, *args, **kwargs)
            except StopForward:
                continue
            if keep_outputs:
                outputs.append(to_host(block_output(out)))
    stats = collector.results()
    unseen = [name for name in layers if name not in stats]
    if unseen:
        raise _unseen_error(job, unseen[0])
    return stats, outputs


def solve_layers(
    job: BlockJob,
    layers: dict[str, nn.Module],
    stats: dict[str, LayerStatistics],
    solve: LayerSolve,
) -> list[LayerReport]:
    """Prune each of ``layers`` on its own statistics with ``solve`` and write it back."""
    rows = []
    for name, module in layers.items():
        original = linear_weight(module).detach().to(torch.float32, copy=True)
        result = solve(original, stats.get(name), job.target)
        # Ranks solved the same problem; rank 0's answer makes their models bit-identical.
        weight = broadcast_(result.weight.contiguous())
        figures = dict(damping=result.damping, damping_retries=result.damping_retries)
        rows.append(write_solution(job, name, original, weight, stats.get(name), **figures))
    return rows


def layerwise_pruner(statistic: Statistic, solve: LayerSolve) -> BlockPruner:
    """A block pruner that solves each Linear on its own inputs with ``solve``, given the
    ``statistic`` of its calibration inputs (magnitude, Wanda, SparseGPT)."""

    def prune_block(job: BlockJob) -> BlockResult:
        stats: dict[str, LayerStatistics] = {}
        dense = None
        if statistic is not Statistic.NONE:
            # The dense outputs cost the pass its early stop, and buy the divergence guard.
            keep = job.options.guard
            stats, dense = collect_statistics(job, job.layers, statistic, keep_outputs=keep)
        rows = solve_layers(job, job.layers, stats, solve)
        return BlockResult(layers=rows, dense_outputs=dense or None)

    return prune_block
