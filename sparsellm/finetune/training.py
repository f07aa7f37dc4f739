"""The training steps of a fine-tuning run."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from sparsellm.errors import TrainingDivergedError
from sparsellm.finetune.settings import RunSettings
from sparsellm.finetune.setup import Training

__all__ = ["batches", "train", "train_step"]


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of window indices: a fresh seeded permutation per pass over the data,
    batches running on across pass boundaries so every batch is full."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def train_step(run: Training, ids: torch.Tensor, step: int, max_grad_norm: float | None) -> float:
    """Forward, backward, clipping, optimizer and LR-schedule step on the batch ``ids``; returns
    its loss. Raises :class:`~sparsellm.errors.TrainingDivergedError` (a ``FloatingPointError``)
    on a non-finite loss."""
    dtype = run.autocast_dtype
    with torch.autocast(run.device.type, dtype=dtype, enabled=dtype is not None):
        loss = run.model(input_ids=ids, labels=ids, use_cache=False).loss
    value = float(loss.detach())
    if not math.isfinite(value):
        # Before any update the model or the data are at fault; after updates, the step size.
        why = (
            "before any update: the model gives non-finite values on this data"
            if step == 0
            else f"after {step} update(s): training diverged; a lower learning rate (--lr) or "
            "more warm-up steps (--warmup-steps) usually helps"
        )
        raise TrainingDivergedError(f"training loss is {value} at step {step}, {why}")
    scaler, optimizer = run.scaler, run.optimizer
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    # Frozen entries' gradients are discarded by the step anyway; they must not inflate the
    # norm that clipping sees.
    optimizer.mask_gradients()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(run.trainable, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def train(
    run: Training, train_windows: torch.Tensor, settings: RunSettings, progress: bool
) -> list[float]:
    """All the training steps, in train mode (eval mode after, even on an error); returns the
    per-step losses."""
    generator = torch.Generator().manual_seed(settings.seed)
    order = batches(train_windows.shape[0], settings.batch_size, generator)
    losses: list[float] = []
    run.model.train()
    bar = tqdm(range(settings.steps), desc="finetune", unit="step", disable=not progress)
    try:
        for step in bar:
            ids = train_windows[next(order)].to(run.device)
            step_lr = run.optimizer.param_groups[0]["lr"]  # the LR this step uses
            value = train_step(run, ids, step, settings.max_grad_norm)
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{step_lr:.2e}")
    finally:
        bar.close()
        run.model.eval()
    return losses
