"""The packed weight of a :class:`~sparsellm.sparse.SparseLinear`, built with torch alone (no
numba) a block of rows at a time, and decoded back a tile of rows at a time.

**bitmask** (unstructured, the default below :data:`U16_SPARSITY`): the checkpoint's
"sparse-bitmask" parts as they are: ``bitmask`` uint8 [rows, ceil(cols/8)] (bit j of byte k
set iff column 8k+j is non-zero), ``values`` the non-zeros row-major (float32 or bfloat16,
plus 8 zeros: the kernel reads windows of 8), ``row_offsets`` int64 [rows]. 1/8 byte of index
a weight: the fewest bytes at 50-85% sparsity, and decode is bound by bytes.

**blocked** (unstructured, for high sparsity): each row's non-zeros in column order,
``values`` 1-D; ``cols`` the column inside its block of ``width`` columns; ``counts`` [rows,
blocks] the non-zeros of each row in each block; ``row_ptr`` int64 [rows + 1]. Two index
widths: ``u8`` (256-column blocks, ``counts`` int16; 1 byte a non-zero) and ``u16`` (one
block a row, uint16 stored as int16 bits, ``counts`` int32 [rows, 1]; 2 bytes a non-zero, but
the kernel's loop runs the whole row). Work per non-zero, not per weight: faster than the
bitmask once few weights are left.

**nm24** (every group of 4 columns holds at most 2 non-zeros): ``values`` [rows, cols/2] and
``positions`` uint8 [rows, cols/8], 2 bits a value (its place in its group, ascending, the
first value in the lowest bits; a group with fewer non-zeros is filled with zeros at its
first free places). 4.25 bits of index a group.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 256  # columns of a u8 index block
CHUNK = 1 << 22  # elements per block of rows when packing or decoding: bounded temporaries
U16_SPARSITY = 0.85  # from this sparsity on the u16 index beats the bitmask (bench/kernel.py)
PAD = 8  # zeros after a bitmask layout's values: the kernel reads windows of 8
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


@dataclass
class Packed:
    """A packed weight: ``kind`` (``blocked`` or ``nm24``), its ``[rows, cols]`` shape, the
    index ``width`` (blocked) and its tensors by name."""

    kind: str
    shape: tuple[int, int]
    tensors: dict[str, Tensor]
    width: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def row_chunks(rows: int, cols: int) -> Iterator[slice]:
    """Consecutive row ranges of about :data:`CHUNK` elements."""
    step = max(1, CHUNK // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def value_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype values are kept in: bfloat16 as is, every other float as float32 (the
    kernels read float32 and bfloat16)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def as_shape(shape: Tensor | Sequence[int]) -> tuple[int, int]:
    """``[rows, cols]`` from a tensor or a sequence."""
    values = shape.tolist() if isinstance(shape, Tensor) else list(shape)
    if len(values) != 2 or any(int(v) < 0 for v in values):
        raise ValueError(f"shape must be [rows, cols] of non-negative integers, not {values}")
    return int(values[0]), int(values[1])


def choose_index(sparsity: float, cols: int, index: str = "auto") -> str:
    """``bitmask``, ``u8`` or ``u16`` (``index``: ``auto`` or one of them)."""
    if index not in ("auto", "bitmask", "u8", "u16"):
        raise ValueError(f"index must be auto, bitmask, u8 or u16, not {index!r}")
    if index == "u16" and cols > 1 << 16:
        raise ValueError(f"a u16 index holds at most 65536 columns, not {cols}")
    if index != "auto":
        return index
    return "u16" if sparsity >= U16_SPARSITY and cols <= 1 << 16 else "bitmask"


# ----------------------------------------------------------------------------- blocked


def unpack_bits(bitmask: Tensor, cols: int) -> Tensor:
    """bool [rows, cols] of a uint8 bitmask (bit j of byte k is column 8k + j)."""
    expanded = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
    return expanded.reshape(bitmask.shape[0], -1)[:, :cols].bool()


def check_bitmask(bitmask: Tensor, row_offsets: Tensor, nnz: int, shape: tuple[int, int]) -> None:
    """The bitmask agrees with the shape, the row offsets and the number of values."""
    rows, cols = shape
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise ValueError(
            f"bitmask must be uint8 [{rows}, {(cols + 7) // 8}], not {bitmask.dtype} "
            f"{list(bitmask.shape)}"
        )
    if row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (rows,):
        raise ValueError(f"row_offsets must be int64 [{rows}], not {list(row_offsets.shape)}")
    counts = (
        torch.cat([_POPCOUNT[bitmask[chunk].long()].sum(1) for chunk in row_chunks(rows, cols)])
        if rows
        else torch.zeros(0, dtype=torch.int64)
    )
    ends = torch.cat([row_offsets[1:], torch.tensor([nnz])])
    if rows and (int(row_offsets[0]) != 0 or not torch.equal(ends - row_offsets, counts)):
        raise ValueError("row_offsets do not match the bitmask's set bits per row")
    if rows == 0 and nnz:
        raise ValueError(f"{nnz} values for a weight without rows")
    if cols % 8 and rows and bool((bitmask[:, -1] >> (cols % 8)).any()):
        raise ValueError(f"bitmask has bits set beyond column {cols}")


def bitmask_layout(
    bitmask: Tensor, values: Tensor, row_offsets: Tensor, shape: tuple[int, int]
) -> Packed:
    """The bitmask layout: the checked parts, the values followed by :data:`PAD` zeros."""
    check_bitmask(bitmask, row_offsets, values.numel(), shape)
    padded = torch.zeros(values.numel() + PAD, dtype=values.dtype)
    padded[: values.numel()] = values
    tensors = {"bitmask": bitmask, "values": padded, "row_offsets": row_offsets}
    return Packed("bitmask", shape, tensors)


def bitmask_columns(packed: Packed, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
    """(row in the slice, column, value) of every non-zero of ``rows``."""
    t = packed.tensors
    mask = unpack_bits(t["bitmask"][rows], packed.shape[1])
    row, col = mask.nonzero(as_tuple=True)
    start = int(t["row_offsets"][rows.start]) if rows.stop > rows.start else 0
    return row, col, t["values"][start : start + row.numel()]


def blocked_from_bitmask(
    bitmask: Tensor, values: Tensor, row_offsets: Tensor, shape: tuple[int, int], index: str
) -> Packed:
    """The blocked layout of bitmask parts (values are taken as they are: the order is the
    same), built a block of rows at a time without the dense weight."""
    rows, cols = shape
    check_bitmask(bitmask, row_offsets, values.numel(), shape)
    width = BLOCK if index == "u8" else max(cols, 1)
    nblocks = -(-cols // width)
    idx = torch.empty(values.numel(), dtype=torch.uint8 if index == "u8" else torch.int16)
    counts = torch.empty(rows, nblocks, dtype=torch.int16 if index == "u8" else torch.int32)
    row_ptr = torch.cat([row_offsets, torch.tensor([values.numel()])])
    for chunk in row_chunks(rows, cols):
        mask = unpack_bits(bitmask[chunk], cols)
        padded = torch.zeros(mask.shape[0], nblocks * width, dtype=torch.int32)
        padded[:, :cols] = mask
        counts[chunk] = padded.view(-1, nblocks, width).sum(-1).to(counts.dtype)
        columns = mask.nonzero()[:, 1]  # row-major: the order of ``values``
        start, end = int(row_ptr[chunk.start]), int(row_ptr[chunk.stop])
        idx[start:end] = (columns % width).to(torch.int32).to(idx.dtype)
    tensors = {"values": values, "cols": idx, "counts": counts, "row_ptr": row_ptr}
    return Packed("blocked", shape, tensors, width)


def blocked_from_nm(
    values: Tensor, indices: Tensor, n: int, m: int, shape: tuple[int, int], index: str
) -> Packed:
    """The blocked layout of N:M parts (other patterns than 2:4): ``values`` [rows, k] at the
    ascending columns their packed ``indices`` give (fill-up zeros kept: every row holds k)."""
    rows, cols = shape
    width = BLOCK if index == "u8" else max(cols, 1)
    nblocks, per_row = -(-cols // width), cols // m * n
    idx = torch.empty(rows, per_row, dtype=torch.uint8 if index == "u8" else torch.int16)
    counts = torch.zeros(rows, nblocks, dtype=torch.int64)
    for chunk in row_chunks(rows, cols):
        columns = nm_columns(indices[chunk], n, m, cols)
        block = columns // width
        counts[chunk] = counts[chunk].scatter_add_(1, block, torch.ones_like(block))
        idx[chunk] = (columns % width).to(torch.int32).to(idx.dtype)
    tensors = {
        "values": values.reshape(-1),
        "cols": idx.reshape(-1),
        "counts": counts.to(torch.int16 if index == "u8" else torch.int32),
        "row_ptr": torch.arange(rows + 1, dtype=torch.int64) * per_row,
    }
    return Packed("blocked", shape, tensors, width)


def bitmask_from_nm(
    values: Tensor, indices: Tensor, n: int, m: int, shape: tuple[int, int]
) -> Packed:
    """The bitmask layout of N:M parts (other patterns than 2:4; fill-up zeros kept as
    stored values, their bits set: every row holds cols/M*N)."""
    rows, cols = shape
    nbytes, per_row = (cols + 7) // 8, cols // m * n
    bitmask = torch.zeros(rows, nbytes, dtype=torch.uint8)
    for chunk in row_chunks(rows, cols):
        columns = nm_columns(indices[chunk], n, m, cols)
        bits = torch.ones_like(columns) << (columns % 8)  # distinct columns: a sum is an or
        packed = torch.zeros(columns.shape[0], nbytes, dtype=torch.int64)
        bitmask[chunk] = packed.scatter_add_(1, columns // 8, bits).to(torch.uint8)
    offsets = torch.arange(rows, dtype=torch.int64) * per_row
    return bitmask_layout(bitmask, values.reshape(-1), offsets, shape)


def blocked_columns(packed: Packed, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
    """(row in the slice, column, value) of every non-zero of ``rows``."""
    t = packed.tensors
    counts = t["counts"][rows].long()
    nblocks = counts.shape[1]
    start, end = int(t["row_ptr"][rows.start]), int(t["row_ptr"][rows.stop])
    blocks = torch.arange(nblocks).repeat(counts.shape[0])
    base = torch.repeat_interleave(blocks * packed.width, counts.reshape(-1))
    local = t["cols"][start:end].to(torch.int64)
    if t["cols"].dtype == torch.int16:
        local = local & 0xFFFF  # uint16 stored as int16 bits
    row = torch.repeat_interleave(torch.arange(counts.shape[0]), counts.sum(1))
    return row, base + local, t["values"][start:end]


# ----------------------------------------------------------------------------- 2:4


def unpack_positions(positions: Tensor, count: int) -> Tensor:
    """int64 [rows, count] 2-bit positions of packed uint8 ``positions``."""
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8)
    slots = (positions.unsqueeze(-1) >> shifts) & 3
    return slots.reshape(positions.shape[0], -1)[:, :count].long()


def pack_positions(slots: Tensor) -> Tensor:
    """uint8 [rows, ceil(k/4)] of int [rows, k] 2-bit positions, the first in the lowest bits."""
    rows, k = slots.shape
    padded = torch.zeros(rows, -(-k // 4) * 4, dtype=torch.uint8)
    padded[:, :k] = slots
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8)
    return (padded.view(rows, -1, 4) << shifts).sum(-1, dtype=torch.uint8)


def nm24_columns(positions: Tensor, rows: slice, half: int) -> Tensor:
    """Absolute columns [len(rows), half] of the 2:4 values of ``rows``."""
    slots = unpack_positions(positions[rows], half)
    return (torch.arange(half) // 2) * 4 + slots


def position_bits(m: int) -> int:
    """Bits per position in an N:M group of ``m`` (1, 2, 4 or 8: a byte holds whole ones)."""
    need = max(1, (m - 1).bit_length())
    return next(width for width in (1, 2, 4, 8) if width >= need)


def nm_columns(indices: Tensor, n: int, m: int, cols: int) -> Tensor:
    """Absolute ascending columns [rows, cols/m*n] of N:M values whose in-group positions are
    packed ``position_bits(m)`` bits each, little-endian, row by row."""
    bits = position_bits(m)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    kept = cols // m * n
    slots = (indices.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    slots = slots.reshape(indices.shape[0], -1)[:, :kept].long()
    if slots.shape[1] != kept:
        raise ValueError(f"N:M indices hold {slots.shape[1]} positions a row, not {kept}")
    if bool((slots >= m).any()):
        raise ValueError(f"N:M positions must be below M = {m}")
    return (torch.arange(kept) // n) * m + slots


def is_nm24(weight: Tensor) -> bool:
    """Every group of 4 consecutive columns holds at most 2 non-zeros."""
    rows, cols = weight.shape
    if cols % 4 or cols == 0 or rows == 0:
        return False
    for chunk in row_chunks(rows, cols):
        if int((weight[chunk] != 0).reshape(-1, cols // 4, 4).sum(-1).max()) > 2:
            return False
    return True


def nm24_from_dense(weight: Tensor) -> Packed:
    """The 2:4 layout of ``weight`` (which :func:`is_nm24`)."""
    rows, cols = weight.shape
    half = cols // 2
    values = torch.empty(rows, half, dtype=value_dtype(weight.dtype))
    positions = torch.empty(rows, -(-half // 4), dtype=torch.uint8)
    # Non-zeros first, then lower places: the top two are every non-zero, filled up.
    order = torch.arange(3, -1, -1)
    for chunk in row_chunks(rows, cols):
        groups = weight[chunk].reshape(-1, cols // 4, 4)
        key = (groups != 0).long() * 4 + order
        place = key.topk(2, dim=-1).indices.sort(-1).values
        values[chunk] = groups.gather(-1, place).reshape(-1, half).to(values.dtype)
        positions[chunk] = pack_positions(place.reshape(-1, half))
    return Packed("nm24", (rows, cols), {"values": values, "positions": positions})


def check_nm24(values: Tensor, positions: Tensor, shape: tuple[int, int]) -> None:
    """2:4 parts agree with the shape."""
    rows, cols = shape
    half = cols // 2
    if cols % 4 or tuple(values.shape) != (rows, half):
        raise ValueError(f"2:4 values must be [{rows}, {half}], not {list(values.shape)}")
    if positions.dtype != torch.uint8 or tuple(positions.shape) != (rows, -(-half // 4)):
        raise ValueError(
            f"2:4 positions must be uint8 [{rows}, {-(-half // 4)}], not {list(positions.shape)}"
        )


# ----------------------------------------------------------------------------- decoding


def decode_rows(packed: Packed, rows: slice) -> Tensor:
    """Rows ``rows`` as a dense float32 tile, with torch (the path without numba)."""
    r0, r1 = rows.start, rows.stop
    cols = packed.shape[1]
    tile = torch.zeros(r1 - r0, cols, dtype=torch.float32)
    if packed.kind == "nm24":
        values = packed.tensors["values"][rows].float()
        tile.scatter_(1, nm24_columns(packed.tensors["positions"], rows, cols // 2), values)
        return tile
    columns = bitmask_columns if packed.kind == "bitmask" else blocked_columns
    row, col, values = columns(packed, rows)
    tile[row, col] = values.float()
    return tile
