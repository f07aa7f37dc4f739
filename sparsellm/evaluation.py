"""Perplexity of a causal LM over fixed token windows (each window evaluated alone).

A model that already sits on the evaluation device runs whole, batch by batch. Otherwise the
evaluation is *block-streamed* like pruning: the decoder blocks visit the device one at a time
and every window's hidden states move through each block before the next one loads, so a model
far larger than the device can be scored; the model's own head code (final norm, lm_head, any
logit scaling) then runs with the blocks replaced by stand-ins that hand on the final states.

:func:`record_evaluation` adds perplexities and lm-eval task scores (:mod:`sparsellm.lm_tasks`)
to a report JSON.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsellm.distributed import all_reduce_sum_, shard, world
from sparsellm.errors import UserError

if TYPE_CHECKING:
    from sparsellm.engine import BlockStore

LOGITS_BUDGET_BYTES = 256 * 2**20  # the model's logits of one batch
LOSS_CHUNK_BYTES = 32 * 2**20  # float32 logits the loss works on at once


def logits_batch_limit(model: torch.nn.Module, seqlen: int) -> int:
    """Windows per batch whose float32 logits fit the budget: with a 50k-token vocabulary the
    logits, not the model, dominate peak memory."""
    vocab = getattr(model.config, "vocab_size", None) or 1
    return max(1, LOGITS_BUDGET_BYTES // (seqlen * vocab * 4))


def summed_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood of ``ids`` [b, seqlen] under ``logits`` [b, seqlen,
    vocab], summed in float64 on the host.

    Positions go through the loss a few hundred at a time, so no float32 copy of the logits
    and no log-softmax of the whole batch exists at once (at a 128k vocabulary each would be
    as large as the logits); per-position losses are summed in float64, so the figure does
    not depend on how windows were batched."""
    labels = ids[:, 1:]
    rows = max(1, LOSS_CHUNK_BYTES // (logits.shape[-1] * 4))
    losses = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for window in range(labels.shape[0]):
        for start in range(0, labels.shape[1], rows):
            end = min(start + rows, labels.shape[1])
            losses[window, start:end] = F.cross_entropy(
                logits[window, start:end].float(), labels[window, start:end], reduction="none"
            )
    # float64 on the host: not every accelerator has it
    return losses.cpu().double().sum()


def on_device(model: nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer of ``model`` lives on ``device``."""
    tensors = [*model.parameters(), *model.buffers()]
    return all(_same_device(t.device, device) for t in tensors)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    # "cuda" and "cuda:0" name the same device when the current one is 0.
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current
    )


@torch.no_grad()
def windows_nll(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    streamed: bool | None = None,
    across_ranks: bool = False,
    store: BlockStore | None = None,
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over ``windows`` [n, seqlen] and the count of
    predicted tokens (``n × (seqlen − 1)``).

    ``device`` defaults to where the model is. ``streamed``: ``None`` (default) streams the
    decoder blocks through ``device`` when the model is not entirely there (it is not moved),
    ``True`` always streams, ``False`` runs the model whole (it must be on ``device``).
    ``across_ranks``: under ``torch.distributed`` each rank scores its share of the windows
    and the sums are all-reduced (every rank must call this and gets the same figures).
    ``store``: where the blocks wait between visits (an out-of-core
    :class:`~sparsellm.offload.DiskStore`); given, the evaluation is streamed.
    """
    if across_ranks:
        windows = shard(windows)
    if device is None:  # where the model is; an out-of-core skeleton (all on meta): the host
        real = (p.device for p in model.parameters() if not p.is_meta)
        device = next(real, torch.device("cpu"))
    device = torch.device(device)
    batch_size = min(batch_size, logits_batch_limit(model, windows.shape[1]))
    if streamed is None:
        streamed = store is not None or not on_device(model, device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        logits_batches = (
            _streamed_logits(model, windows, batch_size, device, progress, store)
            if streamed
            else _whole_model_logits(model, windows, batch_size, device, progress)
        )
        # closing(): on an error mid-way the streamed path must put the real blocks back now
        with contextlib.closing(logits_batches):
            for ids, logits in logits_batches:
                total += summed_nll(logits, ids)
                del logits  # before the next batch's are made
                count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    if across_ranks and world()[1] > 1:
        sums = all_reduce_sum_(
            torch.tensor([float(total), count], dtype=torch.float64, device=device)
        )
        return float(sums[0]), int(sums[1])
    return float(total), count


def _whole_model_logits(
    model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, progress: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        yield ids, model(input_ids=ids, use_cache=False).logits


class _HandOn(nn.Module):
    """Stands in for a decoder block: passes its input on, or (the last one) the stored final
    hidden states of the current batch, in the return format of the block it replaces."""

    def __init__(self, tuple_length: int | None, final: list[torch.Tensor] | None = None):
        super().__init__()
        self.tuple_length = tuple_length
        self.final = final
        self.batch = 0

    def forward(self, *args: object, **kwargs: object) -> object:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.final is not None:
            # The final states wait in host memory; the head runs where the input is.
            hidden = self.final[self.batch].to(hidden.device)
            self.batch += 1
        if self.tuple_length is None:
            return hidden
        return (hidden,) + (None,) * (self.tuple_length - 1)


def _streamed_logits(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    progress: bool,
    store: BlockStore | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from sparsellm.engine import (
        BlockStore,
        EngineOptions,
        blocks_replaced,
        capture_block_inputs,
        stream_blocks,
    )
    from sparsellm.models import get_adapter

    adapter = get_adapter(model)
    store = store or BlockStore()
    options = EngineOptions(device=device, batch_size=batch_size, progress=False, store=store)
    inputs = capture_block_inputs(model, adapter, windows, options)
    formats: list[int | None] = []
    blocks = stream_blocks(adapter, device, "perplexity (streamed)", progress, store)
    for _, block, _ in blocks:
        inputs.hidden = inputs.run(block)
        formats.append(inputs.output_format)
    stand_ins = nn.ModuleList(_HandOn(f) for f in formats[:-1])
    stand_ins.append(_HandOn(formats[-1], final=inputs.hidden))
    with store.rest(adapter, device), blocks_replaced(adapter, stand_ins):
        start = 0  # in the capture's batches (an out-of-core run may have cut them smaller)
        for final in inputs.hidden:
            ids = windows[start : start + final.shape[0]].to(device)
            start += final.shape[0]
            yield ids, model(input_ids=ids, use_cache=False).logits


def windows_perplexity(model: torch.nn.Module, windows: torch.Tensor, **options: Any) -> float:
    """``exp(sum NLL / predicted tokens)`` over ``windows`` [n, seqlen] of token ids; the
    keyword options are those of :func:`windows_nll` (``batch_size``, ``device``,
    ``progress``, ``streamed``, ``across_ranks``, ``store``)."""
    nll, count = windows_nll(model, windows, **options)
    return math.exp(nll / count)


def check_report_path(path: str | Path) -> None:
    """Refuse, before any work, a report destination that cannot be read or written: an
    existing file that is not a JSON object, a directory, or a place no file can be created
    (:func:`~sparsellm.preflight.check_output_location`). Missing directories are created on
    writing."""
    from sparsellm.preflight import check_output_location
    from sparsellm.settings import ConfigError

    path = Path(path)
    _read_report(path, "")
    if path.is_dir():
        raise UserError(f"cannot write report {str(path)!r}: it is a directory")
    try:
        check_output_location(str(path))
    except ConfigError as exc:
        raise UserError(f"cannot write report {str(path)!r}: {exc}") from None


def _read_report(path: Path, model: str) -> dict[str, Any]:
    """The report at ``path`` (a new one naming ``model`` when there is none)."""
    from sparsellm.jsonfile import read_json_object

    if not path.is_file():
        return {"model": model}
    return read_json_object(path, hint="the report the results are added to")


def record_evaluation(
    path: str | Path,
    model: str,
    perplexity: dict[str, dict[str, Any]] | None = None,
    tasks: dict[str, Any] | None = None,
) -> Path:
    """Add evaluation results to the JSON report ``path`` (created, with its directory, when
    absent) under ``"evaluation"``: ``perplexity`` by dataset and lm-eval ``tasks`` by name,
    merged with what an earlier evaluation put there. The file is replaced in one rename."""
    import json
    import os

    path = Path(path)
    report = _read_report(path, model)
    entry = report.setdefault("evaluation", {})
    if perplexity:
        entry.setdefault("perplexity", {}).update(perplexity)
    if tasks:
        entry.setdefault("tasks", {}).update(tasks.get("tasks", {}))
        entry["lm_eval_version"] = tasks.get("lm_eval_version", "")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise UserError(f"cannot write report {str(path)!r}: {exc.strerror or exc}") from None
    return path
