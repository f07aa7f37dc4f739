"""What a fine-tuning run is asked to do: its settings, the LR schedule and the autocast."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

__all__ = ["MIXED_PRECISION", "RunSettings", "lr_factor", "resolve_mixed_precision"]

MIXED_PRECISION = ("auto", "bf16", "fp16", "no")


@dataclass(frozen=True)
class RunSettings:
    """The training keywords of :func:`~sparsellm.finetune.finetune`, which documents them,
    carried between the steps of a run (the CLI's ``FinetuneConfig`` maps onto them)."""

    steps: int
    lr: float = 1e-4
    batch_size: int = 4
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    lr_schedule: str = "cosine"
    max_grad_norm: float | None = 1.0
    eval_batch_size: int | None = None
    seed: int = 0
    target_sparsity: float | None = None
    schedule_steps: int | None = None
    mixed_precision: str = "auto"

    def checked(self, train_windows: torch.Tensor) -> RunSettings:
        """These settings with the defaults that depend on others filled in (``warmup_steps``:
        10% of ``steps``; ``eval_batch_size``: ``batch_size``), after checking them and
        ``train_windows`` [n, seqlen]. Raises ``ValueError`` on anything unusable."""
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if train_windows.ndim != 2 or train_windows.shape[0] == 0 or train_windows.shape[1] < 2:
            shape = tuple(train_windows.shape)
            raise ValueError(f"train_windows must be [n >= 1, seqlen >= 2], got {shape}")
        if train_windows.is_floating_point() or train_windows.is_complex():
            raise ValueError(
                f"train_windows must hold integer token ids, not {train_windows.dtype}"
            )
        # A negative clipping norm flips every gradient (the step would climb the loss).
        norm = self.max_grad_norm
        if norm is not None and not (math.isfinite(norm) and norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number, got {norm}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay}")
        for name in ("eval_batch_size", "schedule_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {getattr(self, name)}")
        warmup = self.steps // 10 if self.warmup_steps is None else self.warmup_steps
        if not 0 <= warmup <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps], got {warmup}")
        # Fails on an unknown schedule name now rather than at the first post-warm-up step.
        lr_factor(warmup, steps=self.steps, warmup_steps=warmup, schedule=self.lr_schedule)
        return replace(
            self, warmup_steps=warmup, eval_batch_size=self.eval_batch_size or self.batch_size
        )


def lr_factor(step: int, *, steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """Multiplier of the peak LR for 0-based ``step``: linear warmup reaching 1 on the last
    warmup step, then ``"cosine"`` or ``"linear"`` decay towards 0 (``"constant"``: stay 1).

    No step gets a zero LR, so every one of the ``steps`` updates does something.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"lr schedule must be 'cosine', 'linear' or 'constant', not {schedule!r}")


def resolve_mixed_precision(choice: str, model: nn.Module, device: torch.device) -> str:
    """The autocast a :func:`~sparsellm.finetune.finetune` run uses: ``"bf16"``, ``"fp16"`` or
    ``"no"``.

    ``"auto"`` picks bf16 autocast when the weights are float32 and the device has fast bf16
    matrix multiplies (CUDA with bf16 support; a CPU whose oneDNN reports bf16, i.e.
    AVX512-BF16 or AMX, where it runs a training step about twice as fast as float32), and
    no autocast otherwise. Master weights, optimizer state and the loss stay float32.
    """
    if choice not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, not {choice!r}")
    if choice != "auto":
        return choice
    if next(model.parameters()).dtype != torch.float32:
        return "no"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device.type == "cpu":
        return "bf16" if torch.backends.mkldnn.is_available() and _cpu_has_fast_bf16() else "no"
    return "no"


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op; absent from some builds
        return False
