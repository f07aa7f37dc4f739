"""Sparse fine-tuning of a pruned causal LM: AdamW under a frozen sparsity mask.

After one-shot pruning the zeros of the decoder's Linear weights are held exactly at zero
(:class:`~sparsellm.optim.SparseOptimizer` with ``keep_mask=True``) while every trainable
parameter, including embeddings, norms and ``lm_head``, learns to recover the lost quality.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsellm.evaluation import windows_perplexity
from sparsellm.optim import SparseOptimizer, sparsifiable_parameters, zero_fraction

__all__ = ["MIXED_PRECISION", "FinetuneReport", "finetune", "lr_factor", "resolve_mixed_precision"]


@dataclass
class FinetuneReport:
    """What a :func:`finetune` run did and measured."""

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


MIXED_PRECISION = ("auto", "bf16", "fp16", "no")


def resolve_mixed_precision(choice: str, model: nn.Module, device: torch.device) -> str:
    """The autocast a :func:`finetune` run uses: ``"bf16"``, ``"fp16"`` or ``"no"``.

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


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless batches of window indices: a fresh seeded permutation per pass over the data,
    batches running on across pass boundaries so every batch is full."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


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

    AdamW (``weight_decay`` on ≥2-D weights only; norms and biases are not decayed) wrapped in
    ``SparseOptimizer(keep_mask=True)`` over :func:`~sparsellm.optim.sparsifiable_parameters`:
    every zero in those weights stays exactly zero, and all parameters with ``requires_grad``
    train. Loss is the plain causal-LM loss ``model(input_ids=x, labels=x).loss``; batches
    cycle through the windows in a seeded random order; LR follows :func:`lr_factor`
    (``warmup_steps`` defaults to 10% of ``steps``); gradients (with the frozen entries
    masked out first) are clipped to ``max_grad_norm``.

    With ``target_sparsity`` the run *sparsifies while training* instead: the selected weights
    follow the cubic schedule from their current sparsity to ``target_sparsity``, ranked by the
    Fisher saliency ``w²·F`` (see :class:`~sparsellm.optim.SparseOptimizer`). The ramp starts
    after the LR warm-up, so ``F`` has averaged over those batches before the first cut, and
    lasts ``schedule_steps`` (default: until 3/4 of ``steps``); the remaining steps train under
    the final mask.

    ``mixed_precision``: ``"auto"`` (default, see :func:`resolve_mixed_precision`), ``"bf16"``,
    ``"fp16"`` (with a gradient scaler) or ``"no"``; evaluation always runs without autocast.

    ``device``: where to train (the model is moved there); default: where the model is.
    Perplexity before/after is measured on ``eval_windows`` if given. The model is left in eval
    mode. Raises ``FloatingPointError`` on a non-finite training loss.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if train_windows.ndim != 2 or train_windows.shape[0] == 0 or train_windows.shape[1] < 2:
        shape = tuple(train_windows.shape)
        raise ValueError(f"train_windows must be [n >= 1, seqlen >= 2], got {shape}")
    if warmup_steps is None:
        warmup_steps = steps // 10
    if not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps must be in [0, steps], got {warmup_steps}")
    lr_factor(warmup_steps, steps=steps, warmup_steps=warmup_steps, schedule=lr_schedule)

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    precision = resolve_mixed_precision(mixed_precision, model, device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    eval_batch_size = eval_batch_size or batch_size
    start = time.perf_counter()

    def perplexity() -> float | None:
        if eval_windows is None:
            return None
        return windows_perplexity(
            model, eval_windows, batch_size=eval_batch_size, device=device, progress=progress
        )

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    base = torch.optim.AdamW(groups, lr=lr)
    selected = [(n, p) for n, p in sparsifiable_parameters(model) if p.requires_grad]
    if target_sparsity is None:
        optimizer = SparseOptimizer(base, params_to_sparsify=selected, model=model, keep_mask=True)
    else:
        start_sparsity = zero_fraction(p for _, p in selected)
        optimizer = SparseOptimizer(
            base,
            params_to_sparsify=selected,
            model=model,
            keep_mask=True,  # zeros already there stay; the ramp adds to them
            target_sparsity=target_sparsity,
            initial_sparsity=min(start_sparsity, target_sparsity),
            schedule_start=warmup_steps,
            schedule_steps=schedule_steps or max(1, (3 * steps) // 4 - warmup_steps),
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, steps=steps, warmup_steps=warmup_steps, schedule=lr_schedule),
    )

    sparsity_before = optimizer.sparsity()
    ppl_before = perplexity()

    generator = torch.Generator().manual_seed(seed)
    batches = _batches(train_windows.shape[0], batch_size, generator)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="finetune", unit="step", disable=not progress)
    try:
        for step in bar:
            ids = train_windows[next(batches)].to(device)
            step_lr = optimizer.param_groups[0]["lr"]  # the LR this step uses
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss is {value} at step {step}")
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            # Frozen entries' gradients are discarded by the step anyway; they must not
            # inflate the norm that clipping sees.
            optimizer.mask_gradients()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{step_lr:.2e}")
    finally:
        bar.close()
        model.eval()

    ppl_after = perplexity()
    tail = losses[-min(10, len(losses)) :]
    return FinetuneReport(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        warmup_steps=warmup_steps,
        lr_schedule=lr_schedule,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        mixed_precision=precision,
        train_windows=int(train_windows.shape[0]),
        seqlen=int(train_windows.shape[1]),
        tokens_seen=steps * batch_size * int(train_windows.shape[1]),
        sparsified_tensors=len(selected),
        sparsity_before=sparsity_before,
        sparsity_after=optimizer.sparsity(),
        perplexity_before=ppl_before,
        perplexity_after=ppl_after,
        train_loss_first=losses[0],
        train_loss_last=sum(tail) / len(tail),
        seconds=time.perf_counter() - start,
        losses=losses,
    )
