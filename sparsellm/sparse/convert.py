"""Swapping a pruned model's sparse Linear layers for :class:`SparseLinear`, and the bytes of
weights a token reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparsellm.sparse.linear import SparseLinear


@dataclass
class SparseSwap:
    """What :func:`to_sparse_inference` did: layers swapped (full names), layers left dense
    (below ``min_sparsity``), and the swapped layers' bytes before and after."""

    swapped: list[str] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)
    dense_bytes: int = 0
    sparse_bytes: int = 0
    fused_groups: int = 0  # sibling groups decoded in one call (sparsellm.sparse.fuse)

    def summary(self) -> str:
        ratio = self.sparse_bytes / self.dense_bytes if self.dense_bytes else 0.0
        return (
            f"{len(self.swapped)} layers sparse ({len(self.kept_dense)} left dense): "
            f"{self.dense_bytes / 2**20:.1f} MiB -> {self.sparse_bytes / 2**20:.1f} MiB "
            f"({ratio:.2f}x); {self.fused_groups} groups of siblings decoded in one call"
        )


def _zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def _layer_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


@torch.no_grad()
def to_sparse_inference(
    model: nn.Module, min_sparsity: float = 0.3, *, index: str = "auto", fuse: bool = True
) -> SparseSwap:
    """Replace, in place, every prunable Linear of the decoder blocks whose fraction of zeros
    is at least ``min_sparsity`` by a :class:`SparseLinear` (GPT-2's ``Conv1D`` included);
    embeddings and the head stay as they are. With ``fuse``, siblings that read the same
    input are then grouped (:func:`~sparsellm.sparse.fuse.fuse_shared_inputs`, one traced
    forward of two tokens). Returns what was swapped."""
    from sparsellm.models import get_adapter, linear_weight

    if not isinstance(min_sparsity, int | float) or not 0 <= min_sparsity <= 1:
        raise ValueError(f"min_sparsity must be a number from 0 to 1, got {min_sparsity!r}")
    adapter = get_adapter(model)
    report = SparseSwap()
    for i, block in enumerate(adapter.blocks()):
        for name, module in adapter.prunable(block).items():
            full = f"{adapter.block_name(i)}.{name}"
            if isinstance(module, SparseLinear):
                continue
            if _zero_fraction(linear_weight(module)) < min_sparsity:
                report.kept_dense.append(full)
                continue
            sparse = SparseLinear.from_dense(module, index=index)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, sparse)
            report.swapped.append(full)
            report.dense_bytes += _layer_bytes(module)
            report.sparse_bytes += sparse.nbytes
    if fuse and report.swapped:
        from sparsellm.sparse.fuse import fuse_shared_inputs

        report.fused_groups = fuse_shared_inputs(model)
    return report


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads: every parameter once (tied ones once) and
    SparseLinear layers at their packed size; embedding tables only when they are also the
    output head (a lookup reads one row)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False))
        if isinstance(module, SparseLinear):
            tensors += list(module.buffers(recurse=False))
        for tensor in tensors:
            lookup = isinstance(module, nn.Embedding) and tensor is not head_weight
            if lookup or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
