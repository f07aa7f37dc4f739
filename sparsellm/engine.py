"""The layer-by-layer engine: one decoder block on the device at a time.

1. Check on a short dense forward that the blocks form a chain (block i's output is block
   i + 1's input), then capture what block 0 receives (hidden states and every keyword
   argument the model passes: masks, rotary embeddings, ...) with a pre-hook that stops the
   forward pass there.
2. For each block: move it to the device, let a *block pruner* rewrite its weights under the
   divergence guard (:mod:`sparsellm.guard`), recompute the block's outputs with the pruned
   weights (unless the pruner formed them), move it back. Outputs feed the next block, so
   later blocks see earlier pruning.
3. With a record (the CLI's, :mod:`sparsellm.resume`), each finished block is recorded once
   released, and the blocks an interrupted run finished are restored instead of pruned again.

The engine knows neither a model family (that is the adapter) nor a solver's math (that is the
block pruner and the solvers behind it).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsellm.masks import SparsityTarget
from sparsellm.memory import (
    BlockShape,
    Budget,
    block_sized_windows,
    return_freed_memory,
    to_host,
)
from sparsellm.models import Adapter
from sparsellm.report import BlockResult, PruneReport

if TYPE_CHECKING:
    from sparsellm.resume import RunRecord

CHAIN_CHECK_TOKENS = 16  # tokens of the dense forward that checks blocks form a chain


class _Captured(Exception):
    """Raised by the block-0 pre-hook once its inputs are recorded."""


@dataclass
class BlockInputs:
    """Activations entering the current block, one entry per calibration batch.

    They live in host memory (pinned for CUDA) and visit the device one batch at a time, so
    the device holds one block and one batch of activations whatever the calibration size.
    """

    hidden: list[torch.Tensor]  # on the host
    args: list[tuple]  # further positional arguments (GPT-2 passes its mask positionally)
    kwargs: list[dict]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # What the last block run returned besides hidden states: tuple length, None for a tensor
    # (stand-in blocks must answer in the same format).
    output_format: int | None = None

    def batches(self) -> Iterator[tuple[torch.Tensor, tuple, dict]]:
        """Each batch's hidden states and arguments, on the device."""
        for hidden, args, kwargs in zip(self.hidden, self.args, self.kwargs, strict=True):
            yield (
                hidden.to(self.device, non_blocking=True),
                _to_device(args, self.device),
                _to_device(kwargs, self.device),
            )

    @property
    def shapes(self) -> list[torch.Size]:
        """Each batch's hidden-state shape (spilled batches say theirs without being read)."""
        spilled = getattr(self.hidden, "shapes", None)
        return spilled if spilled is not None else [h.shape for h in self.hidden]

    @property
    def tokens(self) -> int:
        """Tokens over all batches (of this rank)."""
        return sum(math.prod(shape[:-1]) for shape in self.shapes)

    @torch.no_grad()
    def run(
        self,
        block: nn.Module,
        collect: Callable[[torch.Tensor], None] | None = None,
        outputs: list | None = None,
    ) -> list[torch.Tensor]:
        """``block`` over every batch; the outputs (on the host, appended to ``outputs``:
        by default a new list), unless ``collect`` takes each one (on the device)."""
        outputs = [] if outputs is None else outputs
        for hidden, args, kwargs in self.batches():
            raw = block(hidden, *args, **kwargs)
            self.output_format = len(raw) if isinstance(raw, tuple | list) else None
            out = block_output(raw)
            if collect is None:
                outputs.append(to_host(out))
            else:
                collect(out)
        return outputs


@dataclass
class EngineOptions:
    """What the engine needs of a run's settings (methods carry their own options)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 32
    skip: str | None = None  # regex on full layer names: matching layers stay dense
    progress: bool = True
    guard: bool = True  # re-do or stop on a diverging block (see sparsellm.guard)
    store: BlockStore | None = None  # where blocks live between visits (None: in memory)
    budget: Budget = field(default_factory=lambda: Budget(None))  # device bytes to use
    record: RunRecord | None = None  # where finished blocks are recorded for --resume


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
    # Per-layer sparsities by relative name (an allocation rule's); None: ``target`` for all.
    sparsities: dict[str, float] | None = None
    # The dense model's outputs of this block (dense weights on the dense model's own
    # activations), host batches like ``inputs.hidden``; only for pruners that asked for them
    # (``prune_blocks(reference=True)``), else None.
    reference: list[torch.Tensor] | None = None

    def full_name(self, relative: str) -> str:
        return f"{self.adapter.block_name(self.index)}.{relative}"

    def target_of(self, relative: str) -> SparsityTarget:
        """What layer ``relative`` is pruned to: its allocated sparsity, else the target."""
        if self.sparsities is None or relative not in self.sparsities:
            return self.target
        return SparsityTarget(sparsity=self.sparsities[relative])

    def forward(self, collect: Callable[[torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        """The block over every calibration batch (see :meth:`BlockInputs.run`); the outputs
        go where the store keeps a pass's outputs (an out-of-core store: in a file)."""
        outputs = self.output_batches() if collect is None else None
        return self.inputs.run(self.block, collect, outputs)

    def output_batches(self) -> list:
        """Where a pass over this block keeps its outputs: the store's container (a file for
        an out-of-core store), a list in memory without one."""
        store = self.options.store
        return store.output_batches() if store is not None else []


# A block pruner rewrites the weights of ``job.layers`` and says what it did.
BlockPruner = Callable[[BlockJob], BlockResult]


class SparsityAllocator(Protocol):
    """An allocation rule's collector: :func:`dense_pass` shows it every dense block, then it
    says each layer's sparsity (:mod:`sparsellm.allocation`)."""

    def visit(self, job: BlockJob, keep_outputs: bool) -> list[torch.Tensor]:
        """Read what it needs of the dense block; its outputs (host) when ``keep_outputs``."""
        ...

    def sparsities(self) -> dict[str, float]:
        """Each prunable layer's sparsity by full name, once every block was visited."""
        ...


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


def block_shape(adapter: Adapter, block: nn.Module, hidden: int) -> BlockShape:
    """The memory-relevant sizes of ``block`` (see :mod:`sparsellm.memory`)."""
    config = adapter.model.config
    heads = next(
        (getattr(config, k) for k in ("num_attention_heads", "n_head") if hasattr(config, k)),
        max(1, hidden // 64),
    )
    dtype_bytes = next(block.parameters()).element_size()
    eager = getattr(config, "_attn_implementation", None) == "eager"
    return BlockShape.of_block(block, hidden, heads, dtype_bytes, eager)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor, options: EngineOptions
) -> BlockInputs:
    """Run the model up to block 0 for each batch of ``windows`` and record what block 0 gets,
    in host memory. Batches hold ``batch_size`` windows, fewer where the device budget says so
    or an out-of-core run on the CPU keeps them to about a block's bytes
    (each run of ``batch_size`` windows is then cut into pieces; a batch never spans two runs,
    so ranks holding whole runs, ``distributed.shard``, see the batches one process sees).

    Only the modules outside the decoder blocks (embeddings, rotary tables, ...) visit the
    device, and only for this step.
    """
    blocks = adapter.blocks()
    shape = block_shape(adapter, blocks[0], _hidden_width(model))
    seqlen = windows.shape[1]
    per_batch = options.budget.forward_windows(shape, seqlen, options.batch_size)
    if options.store is not None and options.store.out_of_core and options.device.type == "cpu":
        per_batch = min(per_batch, block_sized_windows(shape, seqlen))
    hidden, args_list, kwargs_list = [], [], []
    host = torch.device("cpu")

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        states = kwargs.pop("hidden_states", None)
        if states is None:
            states, args = args[0], args[1:]
        hidden.append(to_host(states.detach()))
        args_list.append(_to_device(tuple(args), host))
        kwargs_list.append(_to_device(kwargs, host))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with (options.store or BlockStore()).rest(adapter, options.device):
            for run in windows.split(options.batch_size):
                for part in run.split(per_batch):
                    with contextlib.suppress(_Captured):
                        model(input_ids=part.to(options.device), use_cache=False)
    finally:
        handle.remove()
    return BlockInputs(hidden, args_list, kwargs_list, device=options.device)


def _hidden_width(model: nn.Module) -> int:
    """The width of the hidden states between blocks (the embedding width may differ)."""
    config = model.config.get_text_config()
    width = getattr(config, "hidden_size", None)
    return width if isinstance(width, int) else model.get_input_embeddings().weight.shape[1]


class BlockStore:
    """Where decoder blocks live between visits. This one keeps them in memory: a block is
    moved to the device for its visit and back home afterwards. Out-of-core stores read a
    block's tensors when it is fetched and write or drop them when it is released."""

    out_of_core = False  # True: host memory is short (CPU forward batches are kept small)

    def __init__(self) -> None:
        self._home: dict[int, torch.device] = {}

    def fetch(self, index: int, block: nn.Module, device: torch.device) -> None:
        """Make block ``index``'s weights real and put them on ``device``."""
        self._home[index] = next(block.parameters()).device
        block.to(device)

    def release(self, index: int, block: nn.Module, completed: bool) -> None:
        """The caller is done with block ``index``; ``completed``: its visit ended normally
        (the weights are final), not by an exception."""
        block.to(self._home.pop(index))

    def output_batches(self) -> list:
        """An empty list for a pass's block outputs (the guard's dense reference, the next
        block's inputs), one tensor per batch, appended in order; here in host memory."""
        return []

    def rest(self, adapter: Adapter, device: torch.device) -> contextlib.AbstractContextManager:
        """Everything outside the decoder blocks (embeddings, final norm, head) on ``device``
        for the duration: capture and evaluation need it, a block's pruning does not."""
        return rest_on_device(adapter, device)


def stream_blocks(
    adapter: Adapter,
    device: torch.device,
    desc: str,
    progress: bool,
    store: BlockStore | None = None,
    start: int = 0,
    released: Callable[[int, nn.Module], None] | None = None,
    keep: bool = True,
) -> Iterator[tuple[int, nn.Module, tqdm]]:
    """Each decoder block in order from ``start``, fetched to ``device`` from ``store`` while
    the caller works on it and released afterwards: the one loop by which pruning, the dense
    pre-pass and streamed evaluation visit blocks. ``released(index, block)`` runs once a visit
    that ended normally is released (an offloaded block's shard is written by then).
    ``keep=False``: the visits change nothing worth keeping (the dense pre-pass), so a store
    that writes blocks drops them instead."""
    store = store or BlockStore()
    blocks = adapter.blocks()
    rest = blocks[start:]
    bar = tqdm(rest, desc, len(blocks), disable=not progress, unit="block", initial=start)
    with bar:  # closed when the caller stops early, so a message after it gets its own line
        for index, block in enumerate(bar, start):
            store.fetch(index, block, device)
            try:
                yield index, block, bar
            except BaseException:
                store.release(index, block, completed=False)
                raise
            store.release(index, block, completed=keep)
            if released is not None:
                released(index, block)


def _reference_stream(inputs: BlockInputs) -> BlockInputs:
    """The dense model's activations, a stream beside ``inputs``: the same batches and
    arguments, hidden states of their own (block 0's are the captured ones, copied)."""
    hidden = [h.clone() for h in inputs.hidden]
    return BlockInputs(hidden, inputs.args, inputs.kwargs, device=inputs.device)


def _prunable(
    adapter: Adapter, block: nn.Module, index: int, skip: re.Pattern | None
) -> dict[str, nn.Module]:
    """The block's prunable layers that ``--skip`` leaves to prune."""
    return {
        name: module
        for name, module in adapter.prunable(block).items()
        if not (skip and skip.search(f"{adapter.block_name(index)}.{name}"))
    }


def dense_pass(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor,
    target: SparsityTarget,
    options: EngineOptions,
    allocator: SparsityAllocator,
) -> None:
    """Stream the dense blocks over the calibration ``windows`` once, showing each (with its
    inputs and ``--skip``'s prunable layers) to ``allocator``; nothing is pruned or written.

    Memory is the pruning pass's: one block on the device, one block's inputs on the host
    (captured here and replaced by the block's dense outputs as the pass goes on).
    """
    skip = re.compile(options.skip) if options.skip else None
    inputs = capture_block_inputs(model, adapter, windows, options)
    last = len(adapter.blocks()) - 1
    blocks = stream_blocks(
        adapter, options.device, "allocating sparsity", options.progress, options.store, keep=False
    )
    with contextlib.closing(blocks):
        for index, block, _ in blocks:
            layers = _prunable(adapter, block, index, skip)
            job = BlockJob(index, block, layers, inputs, adapter, target, options)
            outputs = allocator.visit(job, keep_outputs=index < last)
            if index < last:
                inputs.hidden = outputs
            del job, outputs
            return_freed_memory()


def _check_and_allocate(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor,
    target: SparsityTarget,
    options: EngineOptions,
    report: PruneReport,
    allocator: SparsityAllocator | None,
) -> dict[str, float] | None:
    """Before any block is pruned: check that the blocks form a chain, then let ``allocator``
    (if any) see the dense model (before --resume restores anything) and return its per-layer
    sparsities."""
    from sparsellm.layout import check_block_chain

    ids = windows[:1, :CHAIN_CHECK_TOKENS]
    store = options.store
    with store.rest(adapter, torch.device("cpu")) if store else contextlib.nullcontext():
        check_block_chain(model, adapter.blocks(), ids, store)
    if allocator is None:
        return None
    started = time.perf_counter()
    dense_pass(model, adapter, windows, target, options, allocator)
    sparsities = allocator.sparsities()
    report.timings["allocation"] = time.perf_counter() - started
    return sparsities


def prune_blocks(
    model: nn.Module,
    adapter: Adapter,
    windows: torch.Tensor | None,
    prune_block: BlockPruner,
    target: SparsityTarget,
    options: EngineOptions,
    report: PruneReport,
    fallback: BlockPruner | None = None,
    *,
    data_free: bool = False,
    allocator: SparsityAllocator | None = None,
    reference: bool = False,
) -> None:
    """Prune every decoder block in order with ``prune_block``, guarded by ``fallback``.

    ``windows`` [n, seqlen] are calibration token ids; ``None`` for data-free methods, which
    then skip all forward passes (and the divergence guard, which needs outputs).
    ``data_free``: the pruner needs no data although ``windows`` are given (they serve the
    ``allocator`` alone). ``allocator`` sees every dense block in a :func:`dense_pass` before
    anything is pruned, then gives each layer's sparsity, which the block pruners receive as
    ``BlockJob.sparsities``. ``reference``: a second stream of activations follows the dense
    model (each block's dense weights run on it before they are pruned) and every job gets the
    dense model's outputs of its block as ``BlockJob.reference``; one more ``[N, d]`` on the
    host (or in the store's files).
    """
    from sparsellm.guard import prune_guarded
    from sparsellm.resume import block_entry

    skip = re.compile(options.skip) if options.skip else None
    inputs, sparsities = None, None
    if windows is not None:
        sparsities = _check_and_allocate(
            model, adapter, windows, target, options, report, allocator
        )
        if data_free:
            windows = None
        else:
            inputs = capture_block_inputs(model, adapter, windows, options)
    last = len(adapter.blocks()) - 1
    # The dense model's activations entering the current block (``reference``).
    dense_model = _reference_stream(inputs) if reference and inputs is not None else None
    record = options.record
    start, previous_error = 0, None
    if record is not None:  # --resume: finished blocks, their entries and activations back
        start, previous_error = record.restore(adapter, inputs, windows, report, dense_model)
    finished: dict[int, dict] = {}  # a block's report entry, until its record is written

    def released(index: int, block: nn.Module) -> None:
        # After release: an offloaded block's shard (part of the record) is on disk by now.
        hidden = inputs.hidden if inputs is not None and index < last else None
        dense_hidden = dense_model.hidden if dense_model is not None and index < last else None
        record.record(index, block, finished.pop(index), hidden, previous_error, dense_hidden)

    desc = f"pruning {target}"
    on_release = released if record is not None else None
    store, progress = options.store, options.progress
    blocks = stream_blocks(adapter, options.device, desc, progress, store, start, on_release)
    # closing(): on an exception the generator releases its block and bar at once
    with contextlib.closing(blocks):
        for index, block, bar in blocks:
            layers = _prunable(adapter, block, index, skip)
            job = BlockJob(index, block, layers, inputs, adapter, target, options)
            if sparsities is not None:
                prefix = f"{adapter.block_name(index)}."
                job.sparsities = {name: sparsities[prefix + name] for name in layers}
            if dense_model is not None:  # before pruning: the block's weights are dense
                job.reference = dense_model.run(block, outputs=job.output_batches())
                dense_model.hidden = job.reference  # the next block's (its inputs are done)
            result = prune_guarded(job, prune_block, fallback, previous_error)
            report.add_block(index, result)
            if record is not None:
                finished[index] = block_entry(index, result)
            previous_error = result.output_error or previous_error
            if inputs is not None and index < last:
                inputs.hidden = result.outputs if result.outputs is not None else job.forward()
            result.outputs = result.dense_outputs = None
            del result, job
            return_freed_memory()  # else the heap's fragments make the resident size creep
            if options.progress:
                bar.set_postfix(report.block_postfix())
