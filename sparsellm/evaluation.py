"""Perplexity of a causal LM over fixed token windows (each window evaluated alone)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LOGITS_BUDGET_BYTES = 512 * 2**20


def logits_batch_limit(model: torch.nn.Module, seqlen: int) -> int:
    """Windows per batch whose float32 logits fit the budget: with a 50k-token vocabulary the
    logits, not the model, dominate peak memory."""
    vocab = getattr(model.config, "vocab_size", None) or 1
    return max(1, LOGITS_BUDGET_BYTES // (seqlen * vocab * 4 * 2))


@torch.no_grad()
def windows_nll(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over ``windows`` [n, seqlen] and the count of
    predicted tokens (``n × (seqlen − 1)``)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batch_size = min(batch_size, logits_batch_limit(model, windows.shape[1]))
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        labels = ids[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum"
        )
        total += nll.double().cpu()
        count += labels.numel()
    model.train(was_training)
    return float(total), count


def windows_perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """``exp(sum NLL / predicted tokens)`` over ``windows`` [n, seqlen] of token ids."""
    nll, count = windows_nll(
        model, windows, batch_size=batch_size, device=device, progress=progress
    )
    return math.exp(nll / count)
