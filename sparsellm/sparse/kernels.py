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
tokens as tiles of :data:`LANES`, transposed (``xt`` [tiles * cols, LANES]) so that one weight
meets a tile's tokens in one vector.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

LANES = 8  # tokens per tile of the batched kernels (one AVX2 / two NEON float32 vectors)

# Reassociation lets LLVM vectorise the sums; no nnan/ninf, so NaN and Inf inputs propagate.
_FLAGS = {"reassoc", "contract", "nsz"}
_PARALLEL = {"parallel": True, "fastmath": _FLAGS, "cache": True, "nogil": True}


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


# ----------------------------------------------------------------------------- blocked layout


@njit(**_PARALLEL)
def blocked_mv(values, cols, counts, row_ptr, width, parts, x, y):
    """``y = W x`` for one token."""
    nblocks = counts.shape[1]
    for part in prange(parts.shape[0] - 1):
        for r in range(parts[part], parts[part + 1]):
            start = row_ptr[r]
            acc = np.float32(0.0)
            for b in range(nblocks):
                n = np.int64(counts[r, b])
                vals = values[start : start + n]
                idx = cols[start : start + n]
                xb = x[b * width :]
                for t in range(n):
                    acc += widen(vals[t]) * xb[idx[t]]
                start += n
            y[r] = acc


@njit(**_PARALLEL)
def blocked_mm(values, cols, counts, row_ptr, width, parts, xt, ncols, yt):
    """``yt[tile * rows + r, k] = sum_c W[r, c] xt[tile * ncols + c, k]`` for every tile of
    :data:`LANES` tokens; a row's non-zeros are read from memory once for all tiles."""
    nblocks = counts.shape[1]
    tiles = xt.shape[0] // ncols
    rows = row_ptr.shape[0] - 1
    for part in prange(parts.shape[0] - 1):
        for r in range(parts[part], parts[part + 1]):
            for tile in range(tiles):
                _blocked_row_tile(
                    values,
                    cols,
                    counts,
                    row_ptr,
                    width,
                    nblocks,
                    r,
                    xt,
                    tile * ncols,
                    yt[tile * rows + r],
                )


@njit(fastmath=_FLAGS, cache=True, nogil=True, inline="always")
def _blocked_row_tile(values, cols, counts, row_ptr, width, nblocks, r, xt, first, out):
    # Two sets of accumulators: each FMA chain waits for the previous one's result.
    z = np.float32(0.0)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z
    start = row_ptr[r]
    for b in range(nblocks):
        n = np.int64(counts[r, b])
        base = first + b * width
        t = start
        end = start + n
        while t + 1 < end:
            v = widen(values[t])
            xr = xt[base + np.int64(cols[t])]
            a0 += v * xr[0]
            a1 += v * xr[1]
            a2 += v * xr[2]
            a3 += v * xr[3]
            a4 += v * xr[4]
            a5 += v * xr[5]
            a6 += v * xr[6]
            a7 += v * xr[7]
            v = widen(values[t + 1])
            xr = xt[base + np.int64(cols[t + 1])]
            b0 += v * xr[0]
            b1 += v * xr[1]
            b2 += v * xr[2]
            b3 += v * xr[3]
            b4 += v * xr[4]
            b5 += v * xr[5]
            b6 += v * xr[6]
            b7 += v * xr[7]
            t += 2
        if t < end:
            v = widen(values[t])
            xr = xt[base + np.int64(cols[t])]
            a0 += v * xr[0]
            a1 += v * xr[1]
            a2 += v * xr[2]
            a3 += v * xr[3]
            a4 += v * xr[4]
            a5 += v * xr[5]
            a6 += v * xr[6]
            a7 += v * xr[7]
        start = end
    out[0] = a0 + b0
    out[1] = a1 + b1
    out[2] = a2 + b2
    out[3] = a3 + b3
    out[4] = a4 + b4
    out[5] = a5 + b5
    out[6] = a6 + b6
    out[7] = a7 + b7


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
    half = values.shape[1]
    for part in prange(parts.shape[0] - 1):
        for r in range(parts[part], parts[part + 1]):
            vals = values[r]
            pos = positions[r]
            acc = np.float32(0.0)
            for t in range(half):
                col = ((t >> 1) << 2) + ((np.int64(pos[t >> 2]) >> ((t & 3) << 1)) & 3)
                acc += widen(vals[t]) * x[col]
            y[r] = acc


@njit(**_PARALLEL)
def nm24_mm(values, positions, parts, xt, ncols, yt):
    """:func:`blocked_mm` for the 2:4 layout."""
    tiles = xt.shape[0] // ncols
    rows = values.shape[0]
    for part in prange(parts.shape[0] - 1):
        for r in range(parts[part], parts[part + 1]):
            for tile in range(tiles):
                _nm24_row_tile(values[r], positions[r], xt, tile * ncols, yt[tile * rows + r])


@njit(fastmath=_FLAGS, cache=True, nogil=True, inline="always")
def _nm24_row_tile(vals, pos, xt, first, out):
    # A group's two values go to two sets of accumulators (independent FMA chains).
    z = np.float32(0.0)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z
    for g in range(vals.shape[0] >> 1):
        bits = np.int64(pos[g >> 1]) >> ((g & 1) << 2)
        v = widen(vals[2 * g])
        xr = xt[first + (g << 2) + (bits & 3)]
        a0 += v * xr[0]
        a1 += v * xr[1]
        a2 += v * xr[2]
        a3 += v * xr[3]
        a4 += v * xr[4]
        a5 += v * xr[5]
        a6 += v * xr[6]
        a7 += v * xr[7]
        v = widen(vals[2 * g + 1])
        xr = xt[first + (g << 2) + ((bits >> 2) & 3)]
        b0 += v * xr[0]
        b1 += v * xr[1]
        b2 += v * xr[2]
        b3 += v * xr[3]
        b4 += v * xr[4]
        b5 += v * xr[5]
        b6 += v * xr[6]
        b7 += v * xr[7]
    out[0] = a0 + b0
    out[1] = a1 + b1
    out[2] = a2 + b2
    out[3] = a3 + b3
    out[4] = a4 + b4
    out[5] = a5 + b5
    out[6] = a6 + b6
    out[7] = a7 + b7


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
