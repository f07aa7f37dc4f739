"""A 2-D weight to the parts of the sparse-bitmask format and back, bit for bit.

Pure functions on CPU tensors. Zero means *all bits zero*: comparisons run on an integer view
of the weight (:func:`bits`), so ``-0.0`` and NaN payloads are stored as values and come back
unchanged. Large layers are processed a block of rows at a time (:data:`CHUNK_ELEMENTS`), so
no temporary of the dense layer's size in bytes is made besides the output itself.

Two forms (see ``docs/ARCHITECTURE.md``, "Compressed checkpoints"):

- **bitmask**: ``bitmask`` uint8 [rows, ceil(cols/8)] (bit j of byte k of row r set iff column
  8k+j is non-zero), ``compressed`` (the non-zeros, row-major, 1-D, the weight's dtype),
  ``row_offsets`` int64 [rows] (where each row starts in ``compressed``), ``shape`` int64 [2];
- **nm** (every group of M consecutive columns holds at most N non-zeros): ``nm_values``
  [rows, cols/M*N] (N values per group, padded with zeros where a group holds fewer),
  ``nm_indices`` uint8 (each value's position inside its group, :func:`index_bits` bits,
  packed little-endian into bytes row by row), ``nm_pattern`` int64 [N, M], ``shape``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

# Group sizes M tried when looking for an N:M pattern (the ones hardware and pruners use).
NM_GROUP_SIZES = (2, 4, 8, 16)
# Elements per block of rows: temporaries stay a few tens of MB whatever the layer's size.
CHUNK_ELEMENTS = 1 << 22
_INTEGER_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)

BITMASK_PARTS = ("bitmask", "compressed", "row_offsets", "shape")
NM_PARTS = ("nm_values", "nm_indices", "nm_pattern", "shape")


def bits(tensor: Tensor) -> Tensor:
    """``tensor``'s storage seen as integers of the same width: equality and copies on this
    view are exact (``-0.0`` is not zero, NaN payloads survive)."""
    return tensor.view(_INTEGER_OF_WIDTH[tensor.element_size()])


def integer_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype :func:`bits` uses for ``dtype``."""
    return _INTEGER_OF_WIDTH[torch.empty(0, dtype=dtype).element_size()]


def row_blocks(rows: int, cols: int) -> Iterator[slice]:
    """Consecutive row ranges of about :data:`CHUNK_ELEMENTS` elements each."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


# ----------------------------------------------------------------------------- bit packing


def pack_bits(mask: Tensor) -> Tensor:
    """A bool [rows, cols] mask as uint8 [rows, ceil(cols/8)], little-endian within a byte."""
    rows, cols = mask.shape
    width = (cols + 7) // 8
    if cols % 8:
        padded = torch.zeros(rows, width * 8, dtype=torch.uint8)
        padded[:, :cols] = mask
    else:  # no copy: bools are bytes of 0 or 1
        padded = mask.contiguous().view(torch.uint8)
    return (padded.view(rows, width, 8) * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8)


def unpack_bits(bitmask: Tensor, cols: int) -> Tensor:
    """The bool [rows, cols] mask of a packed uint8 [rows, ceil(cols/8)] bitmask."""
    expanded = (bitmask.unsqueeze(-1) >> _BIT_SHIFTS) & 1
    return expanded.view(bitmask.shape[0], -1)[:, :cols].bool()


def row_popcounts(bitmask: Tensor) -> Tensor:
    """Set bits per row of a uint8 bitmask (int64 [rows])."""
    counts = torch.empty(bitmask.shape[0], dtype=torch.int64)
    for block in row_blocks(bitmask.shape[0], bitmask.shape[1] * 8):
        counts[block] = _POPCOUNT[bitmask[block].int()].sum(1)
    return counts


def stray_bits(bitmask: Tensor, cols: int) -> Tensor:
    """Rows whose last byte has bits set beyond column ``cols`` (bool [rows])."""
    used = cols % 8
    if used == 0 or bitmask.shape[1] == 0:
        return torch.zeros(bitmask.shape[0], dtype=torch.bool)
    beyond = 0xFF ^ ((1 << used) - 1)
    return (bitmask[:, -1] & beyond) != 0


def index_bits(m: int) -> int:
    """Bits per position of an N:M group of ``m`` (1, 2, 4 or 8: a byte holds whole ones)."""
    need = max(1, (m - 1).bit_length())
    return next(width for width in (1, 2, 4, 8) if width >= need)


def pack_indices(positions: Tensor, width: int) -> Tensor:
    """uint8 [rows, k] positions (each < 2**width) packed ``8 // width`` to a byte, the first
    in the lowest bits; the last byte of a row is padded with zeros."""
    rows, k = positions.shape
    per_byte = 8 // width
    columns = -(-k // per_byte)
    padded = torch.zeros(rows, columns * per_byte, dtype=torch.uint8)
    padded[:, :k] = positions
    shifts = torch.arange(per_byte, dtype=torch.uint8) * width
    return (padded.view(rows, columns, per_byte) << shifts).sum(-1, dtype=torch.uint8)


def unpack_indices(packed: Tensor, width: int) -> Tensor:
    """Every position slot of ``packed`` (uint8 [rows, bytes * 8 // width]), padding included."""
    per_byte = 8 // width
    shifts = torch.arange(per_byte, dtype=torch.uint8) * width
    slots = (packed.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return slots.view(packed.shape[0], -1)


# ----------------------------------------------------------------------------- choosing a form


@dataclass(frozen=True)
class Survey:
    """What choosing a form needs to know of a weight: non-zeros per row and, for each group
    size M dividing the columns, the most non-zeros any group of M holds."""

    rows: int
    cols: int
    itemsize: int
    row_counts: Tensor
    group_max: dict[int, int]
    negative_zeros: int = 0

    @property
    def nnz(self) -> int:
        return int(self.row_counts.sum())


def survey(weight: Tensor) -> Survey:
    """One pass over ``weight`` ([out, in], any strides) a block of rows at a time."""
    rows, cols = weight.shape
    counts = torch.empty(rows, dtype=torch.int64)
    sizes = [m for m in NM_GROUP_SIZES if cols % m == 0]
    group_max = dict.fromkeys(sizes, 0)
    negative_zero = torch.iinfo(integer_dtype(weight.dtype)).min  # the sign bit alone
    negative_zeros = 0
    for block in row_blocks(rows, cols):
        chunk = bits(weight[block])
        mask = chunk != 0
        negative_zeros += int(torch.count_nonzero(chunk == negative_zero))
        # Narrow accumulators: the sums fit, and they run several times faster than int64.
        counts[block] = mask.sum(1, dtype=torch.int32)
        for m in sizes:
            groups = mask.view(mask.shape[0], cols // m, m).sum(-1, dtype=torch.uint8)
            group_max[m] = max(group_max[m], int(groups.max()) if groups.numel() else 0)
    return Survey(rows, cols, weight.element_size(), counts, group_max, negative_zeros)


@dataclass(frozen=True)
class Form:
    """How one weight is stored: ``dense``, ``bitmask`` or ``nm`` (with its ``pattern``)."""

    kind: str
    nbytes: int
    pattern: tuple[int, int] | None = None


def bitmask_nbytes(rows: int, cols: int, nnz: int, itemsize: int) -> int:
    """Bytes of the bitmask form: mask, values, row offsets, shape."""
    return rows * ((cols + 7) // 8) + nnz * itemsize + rows * 8 + 16


def nm_nbytes(rows: int, cols: int, n: int, m: int, itemsize: int) -> int:
    """Bytes of the N:M form: values, packed positions, pattern, shape."""
    kept = cols // m * n
    per_byte = 8 // index_bits(m)
    return rows * kept * itemsize + rows * -(-kept // per_byte) + 16 + 16


def choose_form(found: Survey) -> Form:
    """The smallest of dense, bitmask and every N:M pattern the weight satisfies; dense unless
    another form is strictly smaller (so a dense layer stays as it is)."""
    rows, cols, size = found.rows, found.cols, found.itemsize
    best = Form("dense", rows * cols * size)
    candidates = [Form("bitmask", bitmask_nbytes(rows, cols, found.nnz, size))]
    for m, n in found.group_max.items():
        if 0 < n < m:
            candidates.append(Form("nm", nm_nbytes(rows, cols, n, m, size), (n, m)))
    smallest = min(candidates, key=lambda f: f.nbytes)
    return smallest if smallest.nbytes < best.nbytes else best


# ----------------------------------------------------------------------------- encoding


def encode_bitmask(weight: Tensor, row_counts: Tensor) -> dict[str, Tensor]:
    """The bitmask parts of ``weight`` ([out, in]); ``row_counts`` from :func:`survey`."""
    rows, cols = weight.shape
    offsets = torch.zeros(rows, dtype=torch.int64)
    if rows > 1:
        offsets[1:] = torch.cumsum(row_counts[:-1], 0)
    values = torch.empty(int(row_counts.sum()), dtype=integer_dtype(weight.dtype))
    bitmask = torch.empty(rows, (cols + 7) // 8, dtype=torch.uint8)
    for block in row_blocks(rows, cols):
        chunk = bits(weight[block])
        mask = chunk != 0
        bitmask[block] = pack_bits(mask)
        start = int(offsets[block.start])
        end = start + int(row_counts[block].sum())
        values[start:end] = chunk[mask]
    return {
        "bitmask": bitmask,
        "compressed": values.view(weight.dtype),
        "row_offsets": offsets,
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
    }


def encode_nm(weight: Tensor, n: int, m: int) -> dict[str, Tensor]:
    """The N:M parts of ``weight`` ([out, in]), each group holding at most ``n`` non-zeros.
    A group's positions are stored in increasing order; one with fewer than ``n`` non-zeros
    is filled up with its first zero positions (their values are zeros), so the form is
    unique and decodes exactly."""
    rows, cols = weight.shape
    groups, width = cols // m, index_bits(m)
    values = torch.empty(rows, groups * n, dtype=integer_dtype(weight.dtype))
    indices = torch.empty(rows, -(-groups * n // (8 // width)), dtype=torch.uint8)
    # Non-zeros rank first, then lower positions: top-n picks every non-zero and fills up.
    order = torch.arange(m - 1, -1, -1, dtype=torch.int32)
    for block in row_blocks(rows, cols):
        chunk = bits(weight[block]).reshape(-1, groups, m)
        key = (chunk != 0).to(torch.int32) * m + order
        positions = key.topk(n, dim=-1).indices.sort(-1).values
        values[block] = chunk.gather(-1, positions).view(-1, groups * n)
        indices[block] = pack_indices(positions.view(-1, groups * n).to(torch.uint8), width)
    return {
        "nm_values": values.view(weight.dtype),
        "nm_indices": indices,
        "nm_pattern": torch.tensor([n, m], dtype=torch.int64),
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
    }


def encode(weight: Tensor, form: Form, found: Survey) -> dict[str, Tensor]:
    """The parts of ``weight`` in ``form`` (not ``dense``)."""
    if form.kind == "bitmask":
        return encode_bitmask(weight, found.row_counts)
    n, m = form.pattern  # type: ignore[misc]
    return encode_nm(weight, n, m)


# ----------------------------------------------------------------------------- decoding


def decode_bitmask(bitmask: Tensor, values: Tensor, row_offsets: Tensor, cols: int) -> Tensor:
    """The dense [rows, cols] weight of checked bitmask parts, in ``values``' dtype."""
    rows = bitmask.shape[0]
    flat = bits(values)
    out = torch.zeros(rows, cols, dtype=flat.dtype)
    for block in row_blocks(rows, cols):
        mask = unpack_bits(bitmask[block], cols)
        start = int(row_offsets[block.start])
        end = int(row_offsets[block.stop]) if block.stop < rows else flat.numel()
        out[block][mask] = flat[start:end]
    return out.view(values.dtype)


def nm_positions(indices: Tensor, n: int, m: int, cols: int) -> Tensor:
    """The int64 [rows, groups, n] positions held by packed ``indices``."""
    kept = cols // m * n
    slots = unpack_indices(indices, index_bits(m))[:, :kept]
    return slots.reshape(indices.shape[0], cols // m, n).long()


def decode_nm(values: Tensor, indices: Tensor, pattern: tuple[int, int], cols: int) -> Tensor:
    """The dense [rows, cols] weight of checked N:M parts, in ``values``' dtype."""
    n, m = pattern
    rows, groups = values.shape[0], cols // m
    flat = bits(values)
    out = torch.zeros(rows, groups, m, dtype=flat.dtype)
    for block in row_blocks(rows, cols):
        positions = nm_positions(indices[block], n, m, cols)
        out[block].scatter_(-1, positions, flat[block].reshape(-1, groups, n))
    return out.view(rows, cols).view(values.dtype)
