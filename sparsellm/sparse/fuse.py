"""Sibling sparse layers that read the same input (q/k/v, gate/up) multiplied in one kernel
call when decoding.

A one-token product of a small layer costs a kernel call, a wake-up of the thread pool and a
short memory stream that the prefetchers barely ramp up on; three siblings cost that three
times. :func:`fuse_shared_inputs` finds the siblings with one traced forward (the layers
whose input is the very same tensor, as ``statistics.py`` shares accumulators), stacks their
packed rows into one layout that the members then view (no copy is kept twice), and from
then on the first member called with a token computes every member's output; the others
take theirs (each once) if they are called with that same tensor, unmodified (its version
counter unchanged; under ``torch.inference_mode``, which keeps none, the same tensor object).
Anything else
(another input, several tokens, a member moved or cast) takes the member's own path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsellm.sparse.layout import PAD, Packed
from sparsellm.sparse.linear import SparseLinear

# Per kind: the buffers stacked by rows, the flat value-like buffers, the per-row start offsets.
_ROWS = {"bitmask": ("bitmask",), "nm24": ("values", "positions"), "blocked": ("counts",)}
_FLAT = {"bitmask": ("values",), "nm24": (), "blocked": ("values", "cols")}
_STARTS = {"bitmask": "row_offsets", "nm24": None, "blocked": "row_ptr"}


class SharedInput:
    """Members (SparseLinear, one input) and their rows stacked in one SparseLinear."""

    def __init__(self, members: list[SparseLinear]):
        self.members = members
        self.fused = SparseLinear(_stack(members), _stacked_bias(members))
        self.bounds: dict[int, slice] = {}
        first = 0
        for member in members:
            self.bounds[id(member)] = slice(first, first + member.out_features)
            first += member.out_features
        self._input: Tensor | None = None
        self._version = -1
        self._output: np.ndarray | None = None
        self._taken: set[int] = set()
        _share_storage(self.fused, members)

    def output(self, member: SparseLinear, x: Tensor) -> np.ndarray | None:
        """``member``'s output for the one-token ``x`` (its bias included), computed for all
        members at once; ``None`` when ``x`` is not a token the fused kernel can take."""
        key = id(member)
        version = _version(x)
        fresh = x is self._input and version == self._version and key not in self._taken
        if not fresh:
            product = self.fused._decode_token(x)
            if product is None:
                return None
            self._input, self._version = x, version
            self._output, self._taken = product.numpy().reshape(-1), set()
        self._taken.add(key)
        return self._output[self.bounds[key]]


def _version(x: Tensor) -> int | None:
    """The tensor's in-place version; inference tensors have none (``torch.inference_mode``):
    there the input's identity is trusted (a model does not rewrite the hidden states in place
    between the projections that read them)."""
    return None if x.is_inference() else x._version


def _stack(members: list[SparseLinear]) -> Packed:
    """The members' packed rows one after the other (same kind, columns and value dtype)."""
    kind = members[0].kind
    packs = [member.packed() for member in members]
    tensors: dict[str, Tensor] = {}
    for name in _ROWS[kind]:
        tensors[name] = torch.cat([p.tensors[name] for p in packs])
    counts = [member.nnz for member in members]
    for name in _FLAT[kind]:
        parts = [p.tensors[name][:count] for p, count in zip(packs, counts, strict=True)]
        tail = [packs[-1].tensors[name][counts[-1] :]]  # the bitmask layout's padding
        tensors[name] = torch.cat(parts + tail)
    starts = _STARTS[kind]
    if starts is not None:
        offsets, first = [], 0
        for p, count in zip(packs, counts, strict=True):
            own = p.tensors[starts]
            offsets.append(own[:-1] + first if starts == "row_ptr" else own + first)
            first += count
        tensors[starts] = torch.cat(
            offsets + ([torch.tensor([first])] if starts == "row_ptr" else [])
        )
    rows = sum(member.out_features for member in members)
    return Packed(kind, (rows, members[0].in_features), tensors, members[0].width)


def _stacked_bias(members: list[SparseLinear]) -> Tensor | None:
    if all(member.bias is None for member in members):
        return None
    return torch.cat(
        [
            member.bias if member.bias is not None else torch.zeros(member.out_features)
            for member in members
        ]
    ).float()


def _share_storage(fused: SparseLinear, members: list[SparseLinear]) -> None:
    """Point each member's row and value buffers at its part of ``fused`` (views), so the
    weights are held once; per-row offsets stay the member's own (relative to its values)."""
    kind = fused.kind
    row, value = 0, 0
    for member in members:
        rows = slice(row, row + member.out_features)
        for name in _ROWS[kind]:
            setattr(member, name, getattr(fused, name)[rows])
        pad = PAD if kind == "bitmask" else 0
        for name in _FLAT[kind]:
            setattr(member, name, getattr(fused, name)[value : value + member.nnz + pad])
        member._cache = {}
        row, value = row + member.out_features, value + member.nnz


def _compatible(members: list[SparseLinear]) -> bool:
    first = members[0]
    return all(
        m.kind == first.kind
        and m.in_features == first.in_features
        and m.values.dtype == first.values.dtype
        and m.index == first.index
        and m.width == first.width
        for m in members
    )


def _trace(model: nn.Module, example: Tensor) -> list[list[SparseLinear]]:
    """Groups of SparseLinear layers that read the very same input tensor in one forward."""
    seen: dict[int, list[SparseLinear]] = {}
    inputs: list[Any] = []  # keeps the inputs alive so that their ids stay theirs

    def hook(module: nn.Module, args: tuple) -> None:
        inputs.append(args[0])
        seen.setdefault(id(args[0]), []).append(module)

    handles = [
        m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, SparseLinear)
    ]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return [group for group in seen.values() if len(group) > 1]


def fuse_shared_inputs(model: nn.Module, example: Tensor | None = None) -> int:
    """Group the model's SparseLinear layers that read one input (found with a traced forward
    of ``example``, default two token ids 0); returns the number of groups formed."""
    example = torch.zeros(1, 2, dtype=torch.long) if example is None else example
    formed = 0
    for members in _trace(model, example):
        members = [m for m in members if m.shared is None]
        if len(members) > 1 and _compatible(members):
            group = SharedInput(members)
            for member in members:
                member.shared = group
            formed += 1
    return formed
