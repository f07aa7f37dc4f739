"""The layer-by-layer engine: one decoder block on the device at a time.

1. Check on a short dense forward that the blocks form a chain (block i's output is block
   i + 1's input), then capture what block 0 receives (hidden states and every keyword
   argument the model passes: masks, rotary embeddings, ...) with a pre-hook that stops the
   forward pass there.
2. For each block: move it to the device, let a *block pruner* rewrite its weights under the
   divergence guard (:mod:`sparsellm.guard`), recompute the block's outputs with the pruned
   weights (unless the pruner formed them), move it back. Outputs feed the next block, so
   later blocks see earlier pruning.

The engine knows neither a model family (that is the adapter) nor a solver's math (that is the
block pruner and the solvers behind it).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsellm.distributed import broadcast_
from sparsellm.masks import SparsityTarget
from sparsellm.models import Adapter, UnsupportedModelError, linear_weight, set_linear_weight
from sparsellm.report import BlockResult, LayerReport, PruneReport
from sparsellm.solvers import (
    LayerStatistics,
    NumericalError,
    SolverSpec,
    Statistic,
    relative_output_error,
)
from sparsellm.statistics import StatisticsCollector, StopForward

CHAIN_CHECK_TOKENS = 16  # tokens of the dense forward that checks blocks form a chain


class _Captured(Exception):
    """Raised by the block-0 pre-hook once its inputs are recorded."""


@dataclass
class BlockInputs:
    """Activations entering the current block, one entry per calibration batch."""

    hidden: list[torch.Tensor]
    args: list[tuple]  # further positional arguments (GPT-2 passes its mask positionally)
    kwargs: list[dict]

    def batches(self) -> Iterator[tuple[torch.Tensor, tuple, dict]]:
        yield from zip(self.hidden, self.args, self.kwargs, strict=True)


@dataclass
class EngineOptions:
    """Knobs shared by every method."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 32
    dampening: float = 0.01
    blocksize: int = 128
    skip: str | None = None  # regex on full layer names: matching layers stay dense
    progress: bool = True
    guard: bool = True  # re-do or stop on a diverging block (see sparsellm.guard)


@dataclass
class BlockJob:
    """Everything a block pruner may use for one block."""

    index: int
    block: nn.Module
    layers: dict[str, nn.Module]  # prunable layers left after --skip, by relative name
    inputs: BlockInputs | None  # None for data-free methods
    adapter: Adapter
    target: SparsityTarget
    options: EngineOptions

    def full_name(self, relative: str) -> str:
        return f"{self.adapter.block_name(self.index)}.{relative}"

    @torch.no_grad()
    def forward(self, collect: Callable[[torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        """Run the block over every calibration batch; keep outputs unless ``collect`` eats them."""
        outputs = []
        for hidden, args, kwargs in self.inputs.batches():
            out = block_output(self.block(hidden, *args, **kwargs))
            if collect is None:
                outputs.append(out)
            else:
                collect(out)
        return outputs


# A block pruner rewrites the weights of ``job.layers`` and says what it did.
BlockPruner = Callable[[BlockJob], BlockResult]


def block_output(out: object) -> torch.Tensor:
    """Hidden states from a block's return value (a tensor or a tuple led by one)."""
    return out[0] if isinstance(out, tuple | list) else out


def _to_device(value: object, device: torch.device) -> object:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {key: _to_device(v, device) for key, v in value.items()}
    return value


@contextlib.contextmanager
def blocks_replaced(adapter: Adapter, replacement: nn.ModuleList) -> Iterator[None]:
    """Temporarily put ``replacement`` where the adapter's decoder blocks live."""
    blocks = adapter.blocks()
    parent_name, _, attr = adapter.blocks_path.rpartition(".")
    parent = adapter.model.get_submodule(parent_name)
    setattr(parent, attr, replacement)
    try:
        yield
    finally:
        setattr(parent, attr, blocks)


@contextlib.contextmanager
def rest_on_device(adapter: Adapter, device: torch.device) -> Iterator[None]:
    """Move everything outside the decoder blocks (embeddings, rotary tables, final norm,
    head) to ``device`` for the duration; the blocks stay where they are."""
    model = adapter.model
    # Detach the blocks so that moving "the rest of the model" leaves them where they are.
    with blocks_replaced(adapter, nn.ModuleList()):
        home = next(model.parameters()).device
        model.to(device)
    try:
        yield
    finally:
        with blocks_replaced(adapter, nn.ModuleList()):
            model.to(home)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor, options: EngineOptions
) -> BlockInputs:
    """Run the model up to block 0 for each batch of ``windows`` and record what block 0 gets.

    Only the modules outside the decoder blocks (embeddings, rotary tables, ...) visit the
    device, and only for this step.
    """
    blocks = adapter.blocks()
    hidden, args_list, kwargs_list = [], [], []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        states = kwargs.pop("hidden_states", None)
        if states is None:
            states, args = args[0], args[1:]
        hidden.append(states.detach())
        args_list.append(_to_device(tuple(args), options.device))
        kwargs_list.append(_to_device(kwargs, options.device))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with rest_on_device(adapter, options.device):
            for start in range(0, windows.shape[0], options.batch_size):
                ids = windows[start : start + options.batch_size].to(options.device)
                with contextlib.suppress(_Captured):
                    model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return BlockInputs(hidden=hidden, args=args_list, kwargs=kwargs_list)


def prune_blocks(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor | None,
    prune_block: BlockPruner,
    target: SparsityTarget,
    options: EngineOptions,
    report: PruneReport,
    fallback: BlockPruner | None = None,
) -> None:
    """Prune every decoder block in order with ``prune_block``, guarded by ``fallback``.

    ``windows`` [n, seqlen] are calibration token ids; ``None`` for data-free methods, which
    then skip all forward passes (and the divergence guard, which needs outputs).
    """
    from sparsellm.guard import prune_guarded
    from sparsellm.layout import check_block_chain

    skip = re.compile(options.skip) if options.skip else None
    inputs = None
    if windows is not None:
        check_block_chain(model, adapter.blocks(), windows[:1, :CHAIN_CHECK_TOKENS])
        inputs = capture_block_inputs(model, adapter, windows, options)
    blocks = adapter.blocks()
    bar = tqdm(blocks, desc=f"pruning {str(target)}", unit="block", disable=not options.progress)
    previous_error = None
    for index, block in enumerate(bar):
        home = next(block.parameters()).device
        block.to(options.device)
        layers = {
            name: module
            for name, module in adapter.prunable(block).items()
            if not (skip and skip.search(f"{adapter.block_name(index)}.{name}"))
        }
        job = BlockJob(index, block, layers, inputs, adapter, target, options)
        result = prune_guarded(job, prune_block, fallback, previous_error)
        report.add_block(index, result)
        previous_error = result.output_error or previous_error
        if inputs is not None and index + 1 < len(blocks):
            inputs.hidden = result.outputs if result.outputs is not None else job.forward()
        result.outputs = result.dense_outputs = None
        block.to(home)
        if options.progress:
            bar.set_postfix(report.block_postfix())


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
                outputs.append(block_output(out))
    stats = collector.results()
    unseen = [name for name in layers if name not in stats]
    if unseen:
        raise UnsupportedModelError(
            f"unsupported layout: {job.full_name(unseen[0])} is never called as a module in a "
            "forward pass (not run for causal LM use, or its weight is used directly), so its "
            "inputs cannot be observed; "
            f"leave it dense with --skip '{re.escape(unseen[0])}$'"
        )
    return stats, outputs


def solve_layers(
    job: BlockJob,
    layers: dict[str, nn.Module],
    stats: dict[str, LayerStatistics],
    solver: SolverSpec,
) -> list[LayerReport]:
    """Prune each of ``layers`` on its own statistics with ``solver`` and write it back."""
    rows = []
    for name, module in layers.items():
        original = linear_weight(module).detach().to(torch.float32, copy=True)
        result = solver.solve(
            original,
            stats.get(name),
            job.target,
            blocksize=job.options.blocksize,
            dampening=job.options.dampening,
        )
        # Ranks solved the same problem; rank 0's answer makes their models bit-identical.
        weight = broadcast_(result.weight.contiguous())
        rows.append(
            write_solution(
                job,
                name,
                original,
                weight,
                stats.get(name),
                damping=result.damping,
                damping_retries=result.damping_retries,
            )
        )
    return rows


def layerwise_pruner(solver: SolverSpec) -> BlockPruner:
    """A block pruner that solves each Linear on its own inputs (magnitude, Wanda, SparseGPT)."""

    def prune_block(job: BlockJob) -> BlockResult:
        stats: dict[str, LayerStatistics] = {}
        dense = None
        if solver.statistic is not Statistic.NONE:
            # The dense outputs cost the pass its early stop, and buy the divergence guard.
            keep = job.options.guard
            stats, dense = collect_statistics(job, job.layers, solver.statistic, keep_outputs=keep)
        rows = solve_layers(job, job.layers, stats, solver)
        return BlockResult(layers=rows, dense_outputs=dense or None)

    return prune_block
