"""Evaluation and the report of a fine-tuning run."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sparsellm.evaluation import windows_perplexity
from sparsellm.finetune.settings import RunSettings
from sparsellm.finetune.setup import Training

__all__ = ["Before", "FinetuneReport", "build_report", "perplexity"]


@dataclass
class FinetuneReport:
    """What a :func:`~sparsellm.finetune.finetune` run did and measured."""

    steps: int
    lr: float
    batch_size: int
    warmup_steps: int
    lr_schedule: str
    weight_decay: float
    max_grad_norm: float | None
    mixed_precision: str  # "bf16", "fp16" or "no": the autocast actually used
    train_windows: int
    seqlen: int
    tokens_seen: int
    sparsified_tensors: int
    sparsity_before: float  # fraction of zeros over the sparsified (masked) weights
    sparsity_after: float
    perplexity_before: float | None  # on eval_windows, when given
    perplexity_after: float | None
    train_loss_first: float  # loss of the first training batch
    train_loss_last: float  # mean loss of the last min(10, steps) batches
    seconds: float
    losses: list[float] = field(default_factory=list)  # per-step training loss

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` (JSON-serialisable)."""
        return asdict(self)


def perplexity(
    run: Training, eval_windows: torch.Tensor | None, settings: RunSettings, progress: bool
) -> float | None:
    """Perplexity of the model on ``eval_windows`` (never under autocast), ``None`` without."""
    if eval_windows is None:
        return None
    return windows_perplexity(
        run.model,
        eval_windows,
        batch_size=settings.eval_batch_size,
        device=run.device,
        progress=progress,
    )


@dataclass
class Before:
    """Measured before training."""

    started: float  # time.perf_counter() when the run was set up
    sparsity: float
    perplexity: float | None


# Settings of the run that the report repeats, under the same names.
_SETTINGS_REPORTED = (
    "steps",
    "lr",
    "batch_size",
    "warmup_steps",
    "lr_schedule",
    "weight_decay",
    "max_grad_norm",
)


def build_report(
    run: Training,
    settings: RunSettings,
    train_windows: torch.Tensor,
    losses: list[float],
    before: Before,
    perplexity_after: float | None,
) -> FinetuneReport:
    """The report of a finished run (``seconds`` counts from ``before.started`` to now)."""
    n, seqlen = (int(size) for size in train_windows.shape)
    tail = losses[-min(10, len(losses)) :]
    return FinetuneReport(
        **{name: getattr(settings, name) for name in _SETTINGS_REPORTED},
        mixed_precision=run.precision,
        train_windows=n,
        seqlen=seqlen,
        tokens_seen=settings.steps * settings.batch_size * seqlen,
        sparsified_tensors=len(run.selected),
        sparsity_before=before.sparsity,
        sparsity_after=run.optimizer.sparsity(),
        perplexity_before=before.perplexity,
        perplexity_after=perplexity_after,
        train_loss_first=losses[0],
        train_loss_last=sum(tail) / len(tail),
        seconds=time.perf_counter() - before.started,
        losses=losses,
    )
