"""Numba kernels of :class:`~sparsellm.sparse.SparseLinear` (imported only when numba is).

Two weight layouts (:mod:`sparsellm.sparse.layout`):

- **blocked**: each row's non-zeros in column order; ``values`` 1-D, ``cols`` the column
  inside its block of ``width`` columns (uint8 for 256-column blocks, uint16 for one block a
  row), ``counts`` [rows, blocks] the non-zeros of each row in each block, ``row_ptr`` int64
  [rows + 1];
- **2:4**: ``values`` [rows, cols/2] and ``positions`` uint8 [rows, cols/8] (2 bits a value:
  its place in its group of 4, the first value in the lowest bits).

Values are float32, or bfloat16 seen as int16 and widened here (a bfloat16 is the upper half
of a float32); sums are float32. One token (decode) is bound by memory bandwidth, so the
layouts spend as few bytes per weight as the arithmetic allows and each thread streams its
own rows (``parts``: row ranges holding equal numbers of non-zeros). Batched kernels take the
tokens as tiles of 8 (``vector.LANES``), transposed (``xt`` [tiles * cols, 8]) so that one
weight meets a tile's tokens in one vector. The inner loops are LLVM IR (``vector.py``).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from sparsellm.sparse.vector import (
    bitmask_row_dot,
    bitmask_row_tile,
    blocked_row_dot,
    blocked_row_tile,
    nm24_row_dot,
    nm24_row_tile,
)

# Reassociation lets LLVM vectorise the sums; no nnan/ninf, so NaN and Inf inputs propagate.
_FLAGS = {"reassoc", "contract", "nsz"}
_PARALLEL = {"parallel": True, "fastmath": _FLAGS, "cache": True, "nogil": True}
# Small layers run on the calling thread: waking the thread pool costs more than they take.
_SERIAL = {"fastmath": _FLAGS, "cache": True, "nogil": True}


@intrinsic
def widen(typingctx, value):
    """A stored value as float32: a float as is, an int16 as the bits of a bfloat16."""
    if isinstance(value, types.Float):

        def cast(context, builder, signature, args):
            return context.cast(builder, args[0], value, types.float32)

        return types.float32(value), cast
    if isinstance(value, types.Integer) and value.bitwidth == 16:

        def upper_half(context, builder, signature, args):
            wide = builder.zext(args[0], ir.IntType(32))
            shifted = builder.shl(wide, ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(shifted, ir.FloatType())

        return types.float32(value), upper_half
    return None


def prefix_table() -> np.ndarray:
    """int32 [256, 8]: for a bitmask byte m and lane j, popcount(m & ((1 << j) - 1)) (where
    lane j's value sits in the byte's run of values), with the sign bit set when bit j of m
    is clear (the kernel zeroes those lanes by the sign: one blend)."""
    table = np.zeros((256, 8), dtype=np.int64)
    for m in range(256):
        for j in range(8):
            clear = 0 if m >> j & 1 else -(1 << 31)
            table[m, j] = bin(m & ((1 << j) - 1)).count("1") + clear
    return table.astype(np.int32)


PREFIXES = prefix_table()


# ----------------------------------------------------------------------------- bitmask layout


@njit(**_PARALLEL)
def bitmask_mv(bitmask, values, row_offsets, prefixes, parts, x, y):
    """``y = W x`` for one token (``x`` padded to 8 * bytes entries)."""
    for part in prange(parts.shape[0] - 1):
        for r in range(parts[part], parts[part + 1]):
            y[r] = bitmask_row_dot(bitmask, values, prefixes, r, row_offsets[r], x)


@njit(**_SERIAL)
def bitmask_mv_serial(bitmask, values, row_offsets, prefixes, x, y):
    """:func:`bitmask_mv` on the calling thread."""
    for r in range(bitmask.shape[0]):
        y[r] = bitmask_row_dot(bitmask, values, prefixes, r, row_offsets[r], x)


@njit(**_PARALLEL)
def bitmask_mm(bitmask, values, row_offsets, prefixes, parts, xq, yt):
    """``yt[tile * rows + r, j] = W[r] . x[8 tile + j]`` for every tile of 8 tokens, ``xq``
    [tiles, bytes, 8 tokens, 8 columns]."""
    rows = bitmask.shape[0]
    for part in prange(parts.shape[0] - 1):
        for r in range(parts[part], parts[part + 1]):
            for tile in range(xq.shape[0]):
                start = row_offsets[r]
                bitmask_row_tile(bitmask, values, prefixes, r, start, xq, tile, yt, tile * rows + r)


@njit(**_PARALLEL)
def bitmask_decode(bitmask, values, row_offsets, first, out):
    """Rows ``first .. first + len(out)`` as a dense float32 tile ``out`` (zeroed here)."""
    for i in prange(out.shape[0]):
        r = first + i
        row = out[i]
        row[:] = 0.0
        p = row_offsets[r]
        for k in range(bitmask.shape[1]):
            m = np.int64(bitmask[r, k])
            j = 8 * k
            while m:
                if m & 1:
                    row[j] = widen(values[p])
                    p += 1
                m >>= 1
                j += 1


# ----------------------------------------------------------------------------- blocked layout


@njit(**_PARALLEL)
def blocked_mv(values, cols, counts, row_ptr, width, parts, x, y):
    """``y = W x`` for one token."""
    for part in prange(parts.shape[0] - 1):
        for r in range(parts[part], parts[part + 1]):
            y[r] = blocked_row_dot(values, cols, counts, r, row_ptr[r], width, x)


@njit(**_SERIAL)
def blocked_mv_serial(values, cols, counts, row_ptr, width, x, y):
    """:func:`blocked_mv` on the calling thread."""
    for r in range(row_ptr.shape[0] - 1):
        y[r] = blocked_row_dot(values, cols, counts, r, row_ptr[r], width, x)


@njit(**_PARALLEL)
def blocked_mm(values, cols, counts, row_ptr, width, parts, xt, ncols, yt):
    """``yt[tile * rows + r, k] = sum_c W[r, c] xt[tile * ncols + c, k]`` for every tile of
    :data:`LANES` tokens; a row's non-zeros are read from memory once for all tiles."""
    tiles = xt.shape[0] // ncols
    rows = row_ptr.shape[0] - 1
    for part in prange(parts.shape[0] - 1):
        for r in range(parts[part], parts[part + 1]):
            for tile in range(tiles):
                first = tile * ncols
                blocked_row_tile(
                    values, cols, counts, r, row_ptr[r], width, xt, first, yt, tile * rows + r
                )


@njit(**_PARALLEL)
def blocked_decode(values, cols, counts, row_ptr, width, first, out):
    """Rows ``first .. first + len(out)`` as a dense float32 tile ``out`` (zeroed here)."""
    nblocks = counts.shape[1]
    for i in prange(out.shape[0]):
        r = first + i
        row = out[i]
        row[:] = 0.0
        start = row_ptr[r]
        for b in range(nblocks):
            n = np.int64(counts[r, b])
            base = b * width
            for t in range(start, start + n):
                row[base + np.int64(cols[t])] = widen(values[t])
            start += n


# ----------------------------------------------------------------------------- 2:4 layout


@njit(**_PARALLEL)
def nm24_mv(values, positions, parts, x, y):
    """``y = W x`` for one token, ``W`` in the 2:4 layout."""
    for part in prange(parts.shape[0] - 1):
        for r in range(parts[part], parts[part + 1]):
            y[r] = nm24_row_dot(values, positions, r, x)


@njit(**_SERIAL)
def nm24_mv_serial(values, positions, x, y):
    """:func:`nm24_mv` on the calling thread."""
    for r in range(values.shape[0]):
        y[r] = nm24_row_dot(values, positions, r, x)


@njit(**_PARALLEL)
def nm24_mm(values, positions, parts, xt, ncols, yt):
    """:func:`blocked_mm` for the 2:4 layout."""
    tiles = xt.shape[0] // ncols
    rows = values.shape[0]
    for part in prange(parts.shape[0] - 1):
        for r in range(parts[part], parts[part + 1]):
            for tile in range(tiles):
                nm24_row_tile(values, positions, r, xt, tile * ncols, yt, tile * rows + r)


@njit(**_PARALLEL)
def nm24_decode(values, positions, first, out):
    """:func:`blocked_decode` for the 2:4 layout."""
    half = values.shape[1]
    for i in prange(out.shape[0]):
        r = first + i
        row = out[i]
        row[:] = 0.0
        pos = positions[r]
        for t in range(half):
            col = ((t >> 1) << 2) + ((np.int64(pos[t >> 2]) >> ((t & 3) << 1)) & 3)
            row[col] = widen(values[r, t])
