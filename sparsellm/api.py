"""The Python entry points; the CLI is a thin layer over these."""

from __future__ import annotations

import time
from dataclasses import fields

import torch
from torch import nn

from sparsellm.config import ConfigError, PruneConfig, validate_prune
from sparsellm.data import calibration_windows, evaluation_windows
from sparsellm.distributed import shard, world
from sparsellm.engine import EngineOptions, prune_blocks
from sparsellm.evaluation import windows_perplexity
from sparsellm.methods import block_pruner, fallback_pruner, needs_calibration
from sparsellm.models import get_adapter
from sparsellm.report import PruneReport


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
        model: a ``transformers`` causal LM (LLaMA-family, OPT, GPT-2 layouts), on the host or
            the device; only one block at a time is moved to ``device``.
        tokenizer: needed when ``calibration`` is text rather than token ids.
        sparsity: fraction of zeros per layer (default 0.5 unless ``pattern`` is given).
        pattern: ``"N:M"``: keep at most N of every M consecutive input weights.
        method: ``magnitude``, ``wanda``, ``sparsegpt`` (local, layer by layer) or
            ``sparsellm`` (global: attention by SparseGPT, FFN layers jointly).
        calibration: a text source name or path (see :mod:`sparsellm.data`) or an integer
            tensor ``[n, seqlen]`` of token ids.
        progress: show tqdm progress bars.
        **options: any other :class:`~sparsellm.config.PruneConfig` field (``nsamples``,
            ``seqlen``, ``seed``, ``device``, ``dampening``, ``blocksize``, ``batch_size``,
            ``skip``, ``guard``; for ``sparsellm``: ``epochs``, ``alpha``, ``beta``, ``gamma``).
    """
    known = {f.name for f in fields(PruneConfig)} - {"model", "output", "overwrite", "eval"}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    config = PruneConfig(
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        calibration=calibration if isinstance(calibration, str) else "<tensor>",
        **options,
    )
    target = validate_prune(config, require_io=False)
    adapter = get_adapter(model)
    device = default_device(config.device)

    report = PruneReport(
        model=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        architecture=adapter.family,
        method=method,
        target=str(target),
        config=config.to_dict(),
    )
    windows = None
    if needs_calibration(method):
        started = time.perf_counter()
        if isinstance(calibration, str) and not calibration.endswith(".pt") and tokenizer is None:
            raise ConfigError("a tokenizer is needed to use text calibration data")
        windows = calibration_windows(
            calibration, tokenizer, config.nsamples, config.seqlen, config.seed
        )
        report.timings["calibration_data"] = time.perf_counter() - started
        report.config["calibration_windows"] = list(windows.shape)
        ranks = world()[1]
        if ranks > 1:
            windows = shard(windows)
            report.config["ranks"] = ranks

    engine_options = EngineOptions(
        device=device,
        batch_size=config.batch_size,
        dampening=config.dampening,
        blocksize=config.blocksize,
        skip=config.skip,
        progress=progress,
        guard=config.guard,
    )
    started = time.perf_counter()
    method_options = (
        {k: getattr(config, k) for k in ("epochs", "alpha", "beta", "gamma")}
        if method == "sparsellm"
        else {}
    )
    pruner = block_pruner(method, method_options)
    fallback = fallback_pruner(method)
    prune_blocks(model, adapter, windows, pruner, target, engine_options, report, fallback)
    report.timings["prune"] = time.perf_counter() - started
    paths = report.paths_note()
    if paths:
        report.notes.insert(0, paths)
    retried = [layer.name for layer in report.layers if layer.damping_retries]
    if retried:
        report.notes.append(
            f"{len(retried)} layer(s) needed more Hessian damping than requested: "
            + ", ".join(retried)
        )
    return report


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
    the windows (see :func:`~sparsellm.evaluation.windows_nll`)."""
    windows = evaluation_windows(dataset, tokenizer, seqlen, max_windows)
    device = default_device(device)
    return windows_perplexity(
        model,
        windows,
        batch_size=batch_size,
        device=device,
        progress=progress,
        across_ranks=across_ranks,
    )
