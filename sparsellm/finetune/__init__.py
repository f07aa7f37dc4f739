"""Sparse fine-tuning of a pruned causal LM: AdamW under a frozen sparsity mask.

After one-shot pruning the zeros of the decoder's Linear weights are held exactly at zero
(:class:`~sparsellm.optim.SparseOptimizer` with ``keep_mask=True``) while every trainable
parameter, including embeddings, norms and ``lm_head``, learns to recover the lost quality.

A run is a sequence of short steps, one module each: the settings are checked
(:mod:`.settings`, with the LR schedule and the autocast choice), the optimizer is set up
(:mod:`.setup`), the model evaluated, trained one batch at a time (:mod:`.training`), evaluated
again and reported (:mod:`.report`).
"""

from __future__ import annotations

import time
from dataclasses import fields

import torch
from torch import nn

from sparsellm.finetune.report import Before, FinetuneReport, build_report, perplexity
from sparsellm.finetune.settings import (
    MIXED_PRECISION,
    RunSettings,
    lr_factor,
    resolve_mixed_precision,
)
from sparsellm.finetune.setup import set_up
from sparsellm.finetune.training import train

__all__ = [
    "MIXED_PRECISION",
    "FinetuneReport",
    "finetune",
    "finetune_from_config",
    "lr_factor",
    "resolve_mixed_precision",
]


def finetune(
    model: nn.Module,
    train_windows: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    eval_windows: torch.Tensor | None = None,
    weight_decay: float = 0.0,
    warmup_steps: int | None = None,
    lr_schedule: str = "cosine",
    max_grad_norm: float | None = 1.0,
    eval_batch_size: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    target_sparsity: float | None = None,
    schedule_steps: int | None = None,
    mixed_precision: str = "auto",
) -> FinetuneReport:
    """Fine-tune ``model`` on ``train_windows`` [n, seqlen] of token ids with its zeros frozen.

    AdamW (``weight_decay`` on ≥2-D weights only) wrapped in ``SparseOptimizer(keep_mask=True)``
    over :func:`~sparsellm.optim.sparsifiable_parameters`: every zero in those weights stays
    exactly zero, and all parameters with ``requires_grad`` train, on the causal-LM loss of
    batches drawn in a ``seed``-ed order. LR follows :func:`lr_factor` (``warmup_steps``: 10% of
    ``steps`` by default); gradients, frozen entries masked first, are clipped to
    ``max_grad_norm``. With ``target_sparsity`` the run *sparsifies while training* instead: a
    cubic Fisher-ranked schedule (:class:`~sparsellm.optim.GradualSparsity`) from the current
    sparsity, starting after the warm-up and lasting ``schedule_steps`` (default: until 3/4 of
    ``steps``). ``mixed_precision``: ``"auto"`` (:func:`resolve_mixed_precision`), ``"bf16"``,
    ``"fp16"`` (with a gradient scaler) or ``"no"``.

    ``device``: where to train (the model is moved there); default: where the model is.
    Perplexity before/after (never autocast) is measured on ``eval_windows`` if given. The model
    is left in eval mode. Raises :class:`~sparsellm.errors.TrainingDivergedError` (a
    ``FloatingPointError``) on a non-finite training loss.
    """
    # The keywords are RunSettings' fields by name; read them before any other local exists.
    given = locals()
    settings = RunSettings(**{f.name: given[f.name] for f in fields(RunSettings)})
    return _run(model, train_windows, settings, eval_windows, device, progress)


def finetune_from_config(
    model: nn.Module,
    train_windows: torch.Tensor,
    config: object,
    *,
    eval_windows: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> FinetuneReport:
    """:func:`finetune` with the settings held by ``config`` (the CLI's
    :class:`~sparsellm.config.FinetuneConfig`): each training setting it has, by name."""
    names = [f.name for f in fields(RunSettings)]
    settings = RunSettings(**{n: getattr(config, n) for n in names if hasattr(config, n)})
    return _run(model, train_windows, settings, eval_windows, device, progress)


def _run(
    model: nn.Module,
    train_windows: torch.Tensor,
    settings: RunSettings,
    eval_windows: torch.Tensor | None,
    device: str | torch.device | None,
    progress: bool,
) -> FinetuneReport:
    """Check, set up, evaluate, train, evaluate again and report (see :func:`finetune`)."""
    from sparsellm.api import check_api_arguments
    from sparsellm.config import check_device
    from sparsellm.preflight import check_windows

    check_api_arguments(model, None)
    settings = settings.checked(train_windows)
    # Ids past the vocabulary fail in the embedding lookup (an IndexError, or a device assert).
    check_windows(train_windows, "train_windows", model.config)
    if eval_windows is not None:
        check_windows(eval_windows, "eval_windows", model.config)
    check_device(device)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    precision = resolve_mixed_precision(settings.mixed_precision, model, device)
    started = time.perf_counter()
    run = set_up(model, settings, device, precision)
    sparsity = run.optimizer.sparsity()
    before = Before(started, sparsity, perplexity(run, eval_windows, settings, progress))
    losses = train(run, train_windows, settings, progress)
    after = perplexity(run, eval_windows, settings, progress)
    return build_report(run, settings, train_windows, losses, before, after)
