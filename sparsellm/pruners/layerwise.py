"""Layer-by-layer pruning: each Linear solved on its own inputs, and the pieces every block
pruner shares (one statistics pass, writing a solution back with its report row)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn

from sparsellm.distributed import balanced_owners, broadcast_, world
from sparsellm.engine import BlockJob, BlockPruner, block_output
from sparsellm.errors import NonFiniteError
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


def _check_finite_inputs(job: BlockJob, stats: dict[str, LayerStatistics]) -> None:
    """Name the first layer whose inputs held NaN/Inf (their squared norms say so), rather than
    let a solver fail on a Gram matrix that does not say whose it is."""
    for name, layer_stats in stats.items():
        if not torch.isfinite(layer_stats.sq_norms).all():
            dtype = str(next(job.block.parameters()).dtype).removeprefix("torch.")
            raise NonFiniteError(
                f"the inputs of {job.full_name(name)} hold NaN/Inf on the calibration text: "
                f"the block overflows in {dtype}; try --dtype bfloat16 or float32"
            )


def collect_statistics(
    job: BlockJob,
    layers: dict[str, nn.Module],
    kind: Statistic,
    keep_outputs: bool = False,
    spill: bool = False,
) -> tuple[dict[str, LayerStatistics], list[torch.Tensor]]:
    """One forward pass over the calibration batches with hooks on ``layers``; returns their
    statistics and, with ``keep_outputs``, the block's outputs (weights as they are now).
    ``spill``: the outputs are only read back batch by batch, so the block store may keep
    them out of memory (an out-of-core store spills them to a file).

    Without ``keep_outputs`` each pass stops once the last hooked layer has seen its input
    (typically skipping the down projection's matmul: a quarter of a LLaMA block's FLOPs).
    """
    outputs = job.output_batches() if spill else []
    stop_early = not keep_outputs
    first = job.inputs.shapes[0]
    window = first[-2] if len(first) > 2 else None  # [windows, tokens, width]
    collector = StatisticsCollector(layers, kind, stop_early=stop_early, window=window)
    with torch.no_grad(), collector:
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
    _check_finite_inputs(job, stats)
    return stats, outputs


def statistics_groups(
    layers: dict[str, nn.Module], stats: dict[str, LayerStatistics]
) -> list[list[str]]:
    """``layers`` grouped by the statistics object they share (q/k/v, gate/up), in order of
    first appearance; a layer without statistics is a group of its own."""
    groups: dict[int, list[str]] = {}
    for name in layers:
        shared = stats.get(name)
        groups.setdefault(id(shared) if shared is not None else id(name), []).append(name)
    return list(groups.values())


def _group_cost(
    layers: dict[str, nn.Module], names: list[str], stats: LayerStatistics | None
) -> float:
    """Rough FLOPs of solving a group: an OBS sweep costs rows × cols² (plus cols³ for the
    shared factor), a solve without a Gram (Wanda, magnitude) rows × cols."""
    shapes = [linear_weight(layers[name]).shape for name in names]
    if stats is None or stats.hessian is None:
        return float(sum(rows * cols for rows, cols in shapes))
    cols = shapes[0][1]
    return float(sum(rows * cols * cols for rows, _ in shapes) + cols**3)


def _solve_group(
    job: BlockJob,
    names: list[str],
    stats: dict[str, LayerStatistics],
    solve: LayerSolve,
    shared: bool,
) -> dict[str, SolveResult | NumericalError]:
    """Solve the layers of one group; their shared statistics' memo is freed afterwards.

    With ``shared`` (other ranks wait for the answers) a numerical failure is returned in
    place of the layer's result, so that it reaches every rank (:func:`_receive`).
    """
    results: dict[str, SolveResult | NumericalError] = {}
    try:
        for name in names:
            original = linear_weight(job.layers[name]).detach().to(torch.float32, copy=True)
            results[name] = solve(original, stats.get(name), job.target_of(name))
    except NumericalError as exc:
        if not shared:
            raise
        results[name] = exc
    finally:
        if stats.get(names[0]) is not None:
            stats[names[0]].memo.clear()  # the group's inverse factor: no other layer needs it
    return results


def _figures(result: SolveResult) -> dict[str, object]:
    return dict(damping=result.damping, damping_retries=result.damping_retries)


def _receive(
    result: SolveResult | NumericalError | None, like: torch.Tensor, owner: int, name: str
) -> tuple[torch.Tensor, dict[str, object]]:
    """The owner rank's weight and figures on every rank (``result`` is None on the others,
    which receive into buffers shaped and typed like the float32 weight ``like``). A failed
    solve raises on every rank, so that the guard's fallback runs on all of them."""
    figures = torch.zeros(3, dtype=torch.float64)  # damping (NaN: none), retries, failed
    if isinstance(result, SolveResult):
        damping = math.nan if result.damping is None else result.damping
        figures = torch.tensor([damping, result.damping_retries, 0.0], dtype=torch.float64)
    elif result is not None:
        figures[2] = 1.0
    damping, retries, failed = broadcast_(figures.to(like.device), src=owner).tolist()
    if failed:
        if result is not None:
            raise result
        raise NumericalError(f"{name}: the solve failed on rank {owner}")
    weight = result.weight.contiguous() if result is not None else torch.empty_like(like)
    broadcast_(weight, src=owner)
    return weight, dict(
        damping=None if math.isnan(damping) else damping, damping_retries=int(retries)
    )


def solve_layers(
    job: BlockJob,
    layers: dict[str, nn.Module],
    stats: dict[str, LayerStatistics],
    solve: LayerSolve,
) -> list[LayerReport]:
    """Prune each of ``layers`` on its own statistics with ``solve`` and write it back.

    Layers sharing statistics form a group (they share the solver's inverse factor). Under
    ``torch.distributed`` each group is solved by one rank (:func:`balanced_owners` on its
    cost), then every layer's weight and figures are broadcast from its owner, in layer
    order, and every rank writes every layer: each layer is solved once, the ranks' models and
    reports are identical.
    """
    rank, size = world()
    groups = statistics_groups(layers, stats)
    costs = [_group_cost(layers, names, stats.get(names[0])) for names in groups]
    owners = balanced_owners(costs, size)
    owner_of = {name: owner for names, owner in zip(groups, owners, strict=True) for name in names}
    solved: dict[str, SolveResult] = {}
    rows: dict[str, LayerReport] = {}
    for names, owner in zip(groups, owners, strict=True):
        if owner == rank:
            solved.update(_solve_group(job, names, stats, solve, shared=size > 1))
        if size == 1:  # nothing to share: write now, hold one group's results at most
            for n in names:
                original = linear_weight(layers[n]).detach().to(torch.float32, copy=True)
                result = solved.pop(n)
                rows[n] = write_solution(
                    job, n, original, result.weight, stats.get(n), **_figures(result)
                )
    # Each rank solved all its groups before the first broadcast, so none waits on another's
    # queue: the broadcasts follow one order (the layers') that every rank knows.
    for n in layers:
        if n not in rows:
            original = linear_weight(layers[n]).detach().to(torch.float32, copy=True)
            result = solved.pop(n, None)
            weight, figures = _receive(result, original, owner_of[n], job.full_name(n))
            rows[n] = write_solution(job, n, original, weight, stats.get(n), **figures)
    return [rows[name] for name in layers]


def layerwise_pruner(statistic: Statistic, solve: LayerSolve) -> BlockPruner:
    """A block pruner that solves each Linear on its own inputs with ``solve``, given the
    ``statistic`` of its calibration inputs (magnitude, Wanda, SparseGPT)."""

    def prune_block(job: BlockJob) -> BlockResult:
        stats: dict[str, LayerStatistics] = {}
        dense = None
        if statistic is not Statistic.NONE:
            # The dense outputs cost the pass its early stop, and buy the divergence guard.
            keep = job.options.guard
            # Read back only by the guard, a batch at a time: they may spill.
            stats, dense = collect_statistics(job, job.layers, statistic, keep, spill=True)
        rows = solve_layers(job, job.layers, stats, solve)
        return BlockResult(layers=rows, dense_outputs=dense or None)

    return prune_block
