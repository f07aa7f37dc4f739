"""The Python entry points; the CLI is a thin layer over these."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparsellm.allocation import allocator
from sparsellm.config import EvalConfig, PruneConfig, check_device, prune_config
from sparsellm.data import (
    TENSOR_SOURCE,
    calibration_windows,
    check_token_tensor,
    evaluation_windows,
)
from sparsellm.distributed import shard, shared_run, world
from sparsellm.engine import BlockStore, EngineOptions, prune_blocks
from sparsellm.evaluation import windows_perplexity
from sparsellm.memory import Budget
from sparsellm.models import Adapter, get_adapter
from sparsellm.preflight import check_windows
from sparsellm.pruners import fallback_pruner, get_method
from sparsellm.report import PruneReport
from sparsellm.settings import ConfigError, check_value, declared, shown, type_name

if TYPE_CHECKING:
    from sparsellm.resume import RunRecord


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def prune_model(
    model: nn.Module,
    tokenizer: object | None = None,
    *,
    sparsity: float | None = None,
    pattern: str | None = None,
    method: str = "sparsegpt",
    calibration: str | torch.Tensor = "builtin",
    progress: bool = True,
    **options: object,
) -> PruneReport:
    """Prune ``model`` in place, one decoder block at a time, and return a report.

    Args:
        model: a ``transformers`` causal LM, on the host or the device; only one block at a
            time is moved to ``device``.
        tokenizer: needed when ``calibration`` is text rather than token ids.
        sparsity: fraction of zeros over the pruned layers (default 0.5 unless ``pattern`` is
            given); each layer's with the default ``allocation="uniform"``.
        pattern: ``"N:M"``: keep at most N of every M consecutive input weights.
        method: a registered method (:data:`sparsellm.pruners.METHODS`): ``magnitude``,
            ``wanda``, ``sparsegpt`` (local, layer by layer) or ``sparsellm`` (global:
            attention by ADMM, FFN layers jointly).
        calibration: a text source name or path (see :mod:`sparsellm.data`) or an integer
            tensor ``[n, seqlen]`` of token ids.
        progress: show tqdm progress bars.
        **options: any other setting of :class:`~sparsellm.config.PruneConfig` (``nsamples``,
            ``seqlen``, ``seed``, ``device``, ``batch_size``, ``skip``, ``guard``;
            ``allocation`` ``"uniform"``/``"owl"``/``"error"`` and ``allocation_spread``: the
            per-layer sparsities, see :mod:`sparsellm.allocation`) and the
            method's own options (``dampening``, ``blocksize``; for ``sparsellm`` also
            ``epochs``, ``alpha``, ``beta``, ``gamma``). Unknown names raise ``ConfigError``.
    """
    for name in ("model", "output", "overwrite", "eval", "eval_seqlen", "eval_windows"):
        if name in options:
            raise ConfigError(f"{name!r} is a setting of the CLI, not of prune_model()")
    # Anything but a source name is token ids, checked (once, for every caller) by prune().
    named = isinstance(calibration, str)
    ids, source = (None, calibration) if named else (calibration, TENSOR_SOURCE)
    values = dict(options, method=method, sparsity=sparsity, pattern=pattern, calibration=source)
    config = prune_config({k: v for k, v in values.items() if v is not None}, require_io=False)
    return prune(model, tokenizer, config, calibration_ids=ids, progress=progress)


def prune(
    model: nn.Module,
    tokenizer: object | None,
    config: PruneConfig,
    *,
    calibration_ids: torch.Tensor | None = None,
    progress: bool = True,
    store: BlockStore | None = None,
    record: RunRecord | None = None,
) -> PruneReport:
    """Prune ``model`` in place as a checked ``config`` says (see :func:`prune_model`);
    ``calibration_ids`` [n, seqlen], when given (or when ``config.calibration`` is
    ``"<tensor>"``), replace ``config.calibration``. ``store``:
    where the blocks wait between visits (default: in memory; an out-of-core model's
    :meth:`~sparsellm.offload.OffloadedModel.pruning_store` reads and writes them on disk).
    ``record``: where each finished block is recorded, and the blocks an interrupted run
    finished are restored from (:func:`sparsellm.resume.open_record`; the CLI's ``--resume``)."""
    check_api_arguments(model, tokenizer, "calibration")
    if config.options is None:  # built by hand rather than by prune_config(): check it now
        config = prune_config(config.to_dict(), require_io=False)
    method = get_method(config.method)
    adapter = get_adapter(model)
    _check_skip(adapter, config.skip)
    report = PruneReport(
        model=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        architecture=adapter.family,
        method=method.name,
        target=str(config.target()),
        config=config.to_dict(),
    )
    windows, batch_size = None, config.batch_size
    if config.uses_calibration:
        windows, batch_size = _calibration(model, tokenizer, config, calibration_ids, report)
    device = default_device(config.device)
    engine_options = EngineOptions(
        device=device,
        budget=Budget.resolve(config.device_memory, device),
        batch_size=batch_size,
        skip=config.skip,
        progress=progress,
        guard=config.guard,
        store=store,
        record=record,
    )
    started = time.perf_counter()
    pruner = method.build(config.options)
    fallback = fallback_pruner(method.name, config.options)
    rule = allocator(config.allocation, config.target(), config.allocation_spread)
    prune_blocks(
        model,
        adapter,
        windows,
        pruner,
        config.target(),
        engine_options,
        report,
        fallback,
        data_free=not method.needs_calibration,
        allocator=rule,
        reference=getattr(config.options, "follows_dense_model", False),
    )
    if rule is not None:
        report.set_allocation(rule.allocation.summary(), rule.allocation.layers)
    report.timings["prune"] = time.perf_counter() - started
    report.finish()
    return report


def check_api_arguments(model: object, tokenizer: object, text_argument: str = "") -> None:
    """The Python API's first two arguments (``prune``, ``evaluate_perplexity``,
    ``finetune``), checked before any work: a hub id passed where
    the loaded model belongs, or a text source passed positionally into the tokenizer's place
    (``evaluate_perplexity(model, "eval.txt")`` would otherwise score the default dataset)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a loaded causal LM (a torch nn.Module), got "
            f"{shown(model)} ({type_name(model)}); load it first, e.g. with "
            "transformers.AutoModelForCausalLM.from_pretrained or sparsellm.load_model"
        )
    if tokenizer is not None and not callable(tokenizer):
        text = isinstance(tokenizer, str) and text_argument
        hint = f"; pass a text source as {text_argument}=" if text else ""
        raise TypeError(
            f"tokenizer must be a tokenizer (callable) or None, got {shown(tokenizer)} "
            f"({type_name(tokenizer)}){hint}"
        )


def _check_skip(adapter: Adapter, skip: str | None) -> None:
    """A ``skip`` that matches no prunable layer leaves the whole model to prune, which is
    nearly always a typo (``layer\\.0\\.`` for ``layers\\.0\\.``): refuse it before any work,
    with a name it could have matched."""
    if skip is None:
        return
    pattern = re.compile(skip)
    names = [
        f"{adapter.block_name(index)}.{name}"
        for index, block in enumerate(adapter.blocks())
        for name in adapter.prunable(block)
    ]
    if names and not any(pattern.search(name) for name in names):
        raise ConfigError(
            f"skip {skip!r} matches none of the model's {len(names)} prunable layers "
            f"(named like {names[0]!r}), so it would leave nothing dense"
        )


def _calibration(
    model: nn.Module,
    tokenizer: object | None,
    config: PruneConfig,
    ids: torch.Tensor | None,
    report: PruneReport,
) -> tuple[torch.Tensor, int]:
    """The calibration windows (this rank's share under torch.distributed) and the windows per
    batch (``batch_size``; under torch.distributed the runs ranks share them in, so that every
    batch is one rank's and the statistics equal one process's). Windows the model cannot
    read (ids outside its vocabulary, longer than its positions) are refused here, before any
    work, however they came (the CLI checks them before loading the model too)."""
    started = time.perf_counter()
    if ids is None and config.calibration != TENSOR_SOURCE:
        source = config.calibration
        if not source.endswith(".pt") and tokenizer is None:
            raise ConfigError("a tokenizer is needed to use text calibration data")
        ids = calibration_windows(source, tokenizer, config.nsamples, config.seqlen, config.seed)
    else:
        source = TENSOR_SOURCE
        ids = check_token_tensor(ids, source)
    check_windows(ids, source, model.config)
    report.timings["calibration_data"] = time.perf_counter() - started
    report.config["calibration_windows"] = list(ids.shape)
    ranks, batch_size = world()[1], config.batch_size
    if ranks > 1:
        batch_size = shared_run(ids.shape[0], config.batch_size)
        ids = shard(ids, batch_size)
        report.config["ranks"] = ranks
        report.config["batch_size"] = batch_size
    return ids, batch_size


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: object | None = None,
    dataset: str | torch.Tensor = "wikitext2",
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
    across_ranks: bool = False,
) -> float:
    """Perplexity on consecutive ``seqlen`` windows of ``dataset``'s test split (each window
    evaluated alone). ``dataset`` is a source name, a path, or a token tensor ``[n, seqlen]``.

    The model is not moved: if it is not on ``device`` its decoder blocks stream through the
    device one at a time (see :mod:`sparsellm.evaluation`), so models larger than the device
    can be scored. ``across_ranks``: under ``torch.distributed`` each rank scores a share of
    the windows (see :func:`~sparsellm.evaluation.windows_nll`). Bad arguments raise
    ``TypeError`` (model, tokenizer) or ``ConfigError`` naming the value, before any work."""
    check_api_arguments(model, tokenizer, "dataset")
    fields = {field.name: field for field in declared(EvalConfig)}
    arguments = {"seqlen": seqlen, "max_windows": max_windows, "batch_size": batch_size}
    for name, value in arguments.items():
        check_value(fields[name], value)
    check_device(device)
    windows = evaluation_windows(dataset, tokenizer, seqlen, max_windows)
    source = dataset if isinstance(dataset, str) else TENSOR_SOURCE
    check_windows(windows, source, model.config)
    device = default_device(device)
    return windows_perplexity(
        model,
        windows,
        batch_size=batch_size,
        device=device,
        progress=progress,
        across_ranks=across_ranks,
    )
