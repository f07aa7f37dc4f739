"""Set-up of a fine-tuning run: the sparse AdamW, its LR schedule and the gradient scaler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsellm.finetune.settings import RunSettings, lr_factor
from sparsellm.optim import SparseOptimizer, sparsifiable_parameters, zero_fraction

__all__ = ["Training", "lr_schedule", "set_up", "sparse_adamw"]


@dataclass
class Training:
    """What the training steps work with."""

    model: nn.Module
    device: torch.device
    precision: str  # "bf16", "fp16" or "no": the autocast actually used
    optimizer: SparseOptimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None  # fp16 only: bf16 has float32's exponent range
    trainable: list[nn.Parameter]
    selected: list[tuple[str, nn.Parameter]]  # the weights the optimizer sparsifies

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, ``None`` for none."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


def sparse_adamw(
    model: nn.Module, trainable: list[nn.Parameter], settings: RunSettings
) -> tuple[SparseOptimizer, list[tuple[str, nn.Parameter]]]:
    """AdamW over ``trainable`` (weight decay on ≥2-D weights only) under the frozen mask of the
    decoder's Linear weights, or ramping them to ``target_sparsity``; and those weights.

    The ramp starts when the LR warm-up ends, so the Fisher saliency has averaged over the
    warm-up batches before the first cut, and by default ends at 3/4 of the steps.
    """
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    base = torch.optim.AdamW(groups, lr=settings.lr)
    selected = [(n, p) for n, p in sparsifiable_parameters(model) if p.requires_grad]
    target = settings.target_sparsity
    if target is None:
        optimizer = SparseOptimizer(base, params_to_sparsify=selected, model=model, keep_mask=True)
        return optimizer, selected
    warmup, steps = settings.warmup_steps, settings.steps
    optimizer = SparseOptimizer(
        base,
        params_to_sparsify=selected,
        model=model,
        keep_mask=True,  # zeros already there stay; the ramp adds to them
        target_sparsity=target,
        initial_sparsity=min(zero_fraction(p for _, p in selected), target),
        schedule_start=warmup,
        schedule_steps=settings.schedule_steps or max(1, (3 * steps) // 4 - warmup),
    )
    return optimizer, selected


def lr_schedule(
    optimizer: SparseOptimizer, settings: RunSettings
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then decay of the LR, per :func:`~sparsellm.finetune.settings.lr_factor`."""
    steps, warmup, kind = settings.steps, settings.warmup_steps, settings.lr_schedule
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps=steps, warmup_steps=warmup, schedule=kind)
    )


def set_up(
    model: nn.Module, settings: RunSettings, device: torch.device, precision: str
) -> Training:
    """Everything the training steps need, for ``model`` already on ``device``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, selected = sparse_adamw(model, trainable, settings)
    return Training(
        model=model,
        device=device,
        precision=precision,
        optimizer=optimizer,
        scheduler=lr_schedule(optimizer, settings),
        scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
        trainable=trainable,
        selected=selected,
    )
