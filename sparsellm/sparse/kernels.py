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
weight meets a tile's tokens in one vector.

The inner loops are LLVM IR (numba intrinsics, first half of this file): numba's
auto-vectoriser leaves the short per-block loops of a sparse row to a scalar remainder with one
accumulator (an FMA's latency per non-zero) and keeps the batched loop scalar. Here each loop
is spelled with 8-lane vectors: 8 non-zeros at a time (their ``x`` entries fetched one by one
into a vector, which the backend turns into inserts or gathers), the last partial group done
once with the dead lanes masked, so a block of any length costs its non-zeros and nothing
more. Only generic LLVM vector IR is used, except AVX2's ``vpermps`` where the target has it
(:func:`permute_available`): the same code compiles for x86-64 and arm64. The intrinsics live
in this file because numba's on-disk cache is invalidated by the calling function's source
file only. Array arguments must be C-contiguous (the module's buffers and inputs are).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 8
_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VF = ir.VectorType(_F32, LANES)
_ZERO = ir.Constant(_VF, [0.0] * LANES)
# contract: mul + add fuse into FMA where the target has it; reassoc: lanes summed in any order.
_FAST = ("contract", "reassoc")


def _arrays(context, builder, sig, args, *which: int) -> list:
    """The array structs (``.data``, ``.shape``) of the arguments at ``which``."""
    return [context.make_array(sig.args[i])(context, builder, args[i]) for i in which]


def _i64(value: int) -> ir.Constant:
    return ir.Constant(_I64, value)


def _contiguous(*arrays: types.Type) -> bool:
    return all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)


def _value_type(array: types.Array) -> bool:
    """Values the kernels widen: float32, or int16 holding bfloat16 bits."""
    dtype = array.dtype
    return dtype == types.float32 or (isinstance(dtype, types.Integer) and dtype.bitwidth == 16)


def _widen(builder: ir.IRBuilder, raw: ir.Value, dtype: types.Type) -> ir.Value:
    """float32 (scalar or vector) of loaded values: float32 as is, int16 bits as bfloat16."""
    if dtype == types.float32:
        return raw
    if isinstance(raw.type, ir.VectorType):
        wide_type, target = ir.VectorType(_I32, raw.type.count), ir.VectorType(_F32, raw.type.count)
        sixteen = ir.Constant(wide_type, [16] * raw.type.count)
    else:
        wide_type, target, sixteen = _I32, _F32, ir.Constant(_I32, 16)
    return builder.bitcast(builder.shl(builder.zext(raw, wide_type), sixteen), target)


def _load_vector(builder: ir.IRBuilder, data: ir.Value, at: ir.Value, count: int) -> ir.Value:
    """``count`` consecutive elements of ``data`` from ``at`` as a vector (unaligned load)."""
    element = data.type.pointee
    pointer = builder.bitcast(builder.gep(data, [at]), ir.VectorType(element, count).as_pointer())
    return builder.load(pointer, align=element.width // 8 if isinstance(element, ir.IntType) else 4)


def _index(builder: ir.IRBuilder, data: ir.Value, at: ir.Value) -> ir.Value:
    """An unsigned index stored at ``data[at]``, as i64."""
    return builder.zext(builder.load(builder.gep(data, [at])), _I64)


def _hsum(builder: ir.IRBuilder, vector: ir.Value) -> ir.Value:
    """The sum of a vector's lanes, halving it (a tree: three adds for 8 lanes)."""
    count = vector.type.count
    while count > 1:
        half = count // 2
        low = builder.shuffle_vector(
            vector, vector, ir.Constant(ir.VectorType(_I32, half), list(range(half)))
        )
        high = builder.shuffle_vector(
            vector, vector, ir.Constant(ir.VectorType(_I32, half), list(range(half, count)))
        )
        vector, count = builder.fadd(low, high, flags=_FAST), half
    return builder.extract_element(vector, ir.Constant(_I32, 0))


def _broadcast(builder: ir.IRBuilder, scalar: ir.Value) -> ir.Value:
    one = builder.insert_element(ir.Constant(_VF, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def _accumulate(builder: ir.IRBuilder, slot: ir.Value, a: ir.Value, b: ir.Value) -> None:
    """``*slot += a * b`` (vectors)."""
    product = builder.fmul(a, b, flags=_FAST)
    builder.store(builder.fadd(builder.load(slot), product, flags=_FAST), slot)


# --- intrinsics: one token ------------------------------------------------------------------------


def _gather(builder: ir.IRBuilder, x: ir.Value, columns: list[ir.Value]) -> ir.Value:
    """``x[columns]`` as an 8-lane vector."""
    gathered = ir.Constant(_VF, ir.Undefined)
    for lane, column in enumerate(columns):
        value = builder.load(builder.gep(x, [column]))
        gathered = builder.insert_element(gathered, value, ir.Constant(_I32, lane))
    return gathered


def _segment_dot(builder, acc, values, dtype, cols, x, start, n) -> None:
    """``acc += values[start + t] * x[cols[start + t]]`` for ``t < n``, 8 lanes a step and
    the last partial group once, its dead lanes pointed at ``start`` and selected away."""
    full = builder.and_(n, _i64(-LANES))
    with cgutils.for_range_slice(builder, _i64(0), full, _i64(LANES)) as (i, _):
        at = builder.add(start, i)
        vals = _widen(builder, _load_vector(builder, values, at, LANES), dtype)
        columns = [_index(builder, cols, builder.add(at, _i64(k))) for k in range(LANES)]
        _accumulate(builder, acc, vals, _gather(builder, x, columns))
    rest = builder.sub(n, full)
    with builder.if_then(builder.icmp_signed(">", rest, _i64(0))):
        _segment_tail(builder, acc, values, dtype, cols, x, builder.add(start, full), rest)


def _segment_tail(builder, acc, values, dtype, cols, x, base, rest) -> None:
    """The last ``rest`` (1..7) terms of a segment as one vector step, without branches:
    dead lanes repeat the last live element and their products are masked to +0."""
    lanes = ir.Constant(ir.VectorType(_I64, LANES), list(range(LANES)))
    live = builder.icmp_unsigned("<", lanes, _splat_i64(builder, rest))
    last = _splat_i64(builder, builder.sub(rest, _i64(1)))
    places = builder.select(live, lanes, last)  # a vector select: a blend, not a branch
    vals, xs = ir.Constant(_VF, ir.Undefined), ir.Constant(_VF, ir.Undefined)
    for lane in range(LANES):
        at = builder.add(base, builder.extract_element(places, ir.Constant(_I32, lane)))
        value = _widen(builder, builder.load(builder.gep(values, [at])), dtype)
        vals = builder.insert_element(vals, value, ir.Constant(_I32, lane))
        entry = builder.load(builder.gep(x, [_index(builder, cols, at)]))
        xs = builder.insert_element(xs, entry, ir.Constant(_I32, lane))
    bits = builder.bitcast(builder.fmul(vals, xs), ir.VectorType(_I32, LANES))
    keep = builder.sext(live, ir.VectorType(_I32, LANES))
    terms = builder.bitcast(builder.and_(bits, keep), _VF)
    builder.store(builder.fadd(builder.load(acc), terms, flags=_FAST), acc)


def _splat_i64(builder: ir.IRBuilder, scalar: ir.Value) -> ir.Value:
    vector_type = ir.VectorType(_I64, LANES)
    one = builder.insert_element(
        ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(_I32, 0)
    )
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


@intrinsic
def blocked_row_dot(typingctx, values, cols, counts, row, start, width, x):
    """``sum_b sum_t values[s + t] * x[b * width + cols[s + t]]`` over row ``row``'s blocks
    (``counts[row, b]`` non-zeros each, the first at ``start``), in float32."""
    if not (_contiguous(values, cols, counts, x) and _value_type(values)):
        return None
    signature = types.float32(values, cols, counts, row, start, width, x)

    def codegen(context, builder, sig, args):
        vals, idx, cnt, xs = _arrays(context, builder, sig, args, 0, 1, 2, 6)
        row_, start_, width_ = args[3], args[4], args[5]
        nblocks = builder.extract_value(cnt.shape, 1)
        counts_row = builder.gep(cnt.data, [builder.mul(row_, nblocks)])
        acc = cgutils.alloca_once_value(builder, _ZERO)
        position = cgutils.alloca_once_value(builder, start_)
        with cgutils.for_range(builder, nblocks) as loop:
            n = builder.sext(builder.load(builder.gep(counts_row, [loop.index])), _I64)
            xb = builder.gep(xs.data, [builder.mul(loop.index, width_)])
            s = builder.load(position)
            _segment_dot(builder, acc, vals.data, sig.args[0].dtype, idx.data, xb, s, n)
            builder.store(builder.add(s, n), position)
        return _hsum(builder, builder.load(acc))

    return signature, codegen


def _nm24_columns(builder, positions, base, t) -> list[ir.Value]:
    """Columns (relative to the row) of the 8 values ``t .. t + 7`` of a 2:4 row, ``t`` a
    multiple of 8: value t + j sits in group t/2 + j//2 (columns 2t + 4 (j//2) ..), at the
    2-bit place in bits 2j .. 2j+1 of the 16-bit word at byte t/4: constant shifts."""
    pair = builder.add(base, builder.lshr(t, _i64(2)))
    low, high = (_index(builder, positions, builder.add(pair, _i64(i))) for i in range(2))
    word = builder.or_(low, builder.shl(high, _i64(8)))
    first = builder.shl(t, _i64(1))
    columns = []
    for lane in range(LANES):
        place = builder.and_(builder.lshr(word, _i64(2 * lane)), _i64(3))
        columns.append(builder.add(builder.add(first, _i64(4 * (lane // 2))), place))
    return columns


@intrinsic
def nm24_row_dot(typingctx, values, positions, row, x):
    """``sum_t values[row, t] * x[column(t)]`` of a 2:4 row, in float32."""
    if not (_contiguous(values, positions, x) and _value_type(values)):
        return None
    signature = types.float32(values, positions, row, x)

    def codegen(context, builder, sig, args):
        vals, pos, xs = _arrays(context, builder, sig, args, 0, 1, 3)
        half = builder.extract_value(vals.shape, 1)
        first = builder.mul(args[2], half)
        pos_first = builder.mul(args[2], builder.extract_value(pos.shape, 1))
        dtype = sig.args[0].dtype
        acc = cgutils.alloca_once_value(builder, _ZERO)
        full = builder.and_(half, _i64(-LANES))
        with cgutils.for_range_slice(builder, _i64(0), full, _i64(LANES)) as (t, _):
            ahead = builder.add(first, builder.add(t, _i64(PREFETCH_VALUES)))
            _prefetch(builder, builder.gep(vals.data, [ahead]))
            ahead = builder.add(
                pos_first, builder.add(builder.lshr(t, _i64(2)), _i64(PREFETCH_MASK))
            )
            _prefetch(builder, builder.gep(pos.data, [ahead]))
            row_values = _load_vector(builder, vals.data, builder.add(first, t), LANES)
            columns = _nm24_columns(builder, pos.data, pos_first, t)
            _accumulate(
                builder, acc, _widen(builder, row_values, dtype), _gather(builder, xs.data, columns)
            )
        with cgutils.for_range_slice(builder, full, half, _i64(1)) as (t, _):  # at most 7
            value = _widen(
                builder, builder.load(builder.gep(vals.data, [builder.add(first, t)])), dtype
            )
            byte = _index(builder, pos.data, builder.add(pos_first, builder.lshr(t, _i64(2))))
            place = builder.and_(
                builder.lshr(byte, builder.shl(builder.and_(t, _i64(3)), _i64(1))), _i64(3)
            )
            column = builder.add(builder.shl(builder.lshr(t, _i64(1)), _i64(2)), place)
            term = builder.fmul(value, builder.load(builder.gep(xs.data, [column])))
            lane0 = builder.insert_element(_ZERO, term, ir.Constant(_I32, 0))
            builder.store(builder.fadd(builder.load(acc), lane0, flags=_FAST), acc)
        return _hsum(builder, builder.load(acc))

    return signature, codegen


# --- intrinsics: tiles of tokens ------------------------------------------------------------------


def _tile_step(builder, accs, parity, values, dtype, at, xt, xrow) -> None:
    """``accs[parity] += values[at] * xt[xrow, :]`` (one weight, a tile of 8 tokens)."""
    value = _widen(builder, builder.load(builder.gep(values, [at])), dtype)
    row = _load_vector(builder, xt, builder.mul(xrow, _i64(LANES)), LANES)
    _accumulate(builder, accs[parity], _broadcast(builder, value), row)


def _store_tile(builder, accs, out, out_row) -> None:
    total = builder.fadd(builder.load(accs[0]), builder.load(accs[1]), flags=_FAST)
    pointer = builder.bitcast(
        builder.gep(out, [builder.mul(out_row, _i64(LANES))]), _VF.as_pointer()
    )
    builder.store(total, pointer, align=4)


@intrinsic
def blocked_row_tile(typingctx, values, cols, counts, row, start, width, xt, first, out, out_row):
    """``out[out_row, :] = sum W[row, c] * xt[first + c, :]`` for a tile of 8 tokens (``xt``
    [tiles * cols, 8]); two accumulators take turns to hide the FMA latency."""
    if not (_contiguous(values, cols, counts, xt, out) and _value_type(values)):
        return None
    signature = types.none(values, cols, counts, row, start, width, xt, first, out, out_row)

    def codegen(context, builder, sig, args):
        vals, idx, cnt, xs, ys = _arrays(context, builder, sig, args, 0, 1, 2, 6, 8)
        row_, start_, width_, first_, out_row_ = args[3], args[4], args[5], args[7], args[9]
        dtype = sig.args[0].dtype
        nblocks = builder.extract_value(cnt.shape, 1)
        counts_row = builder.gep(cnt.data, [builder.mul(row_, nblocks)])
        accs = [cgutils.alloca_once_value(builder, _ZERO) for _ in range(2)]
        position = cgutils.alloca_once_value(builder, start_)
        with cgutils.for_range(builder, nblocks) as loop:
            n = builder.sext(builder.load(builder.gep(counts_row, [loop.index])), _I64)
            base = builder.add(first_, builder.mul(loop.index, width_))
            s = builder.load(position)
            pairs = builder.and_(n, _i64(-2))
            with cgutils.for_range_slice(builder, _i64(0), pairs, _i64(2)) as (t, _):
                for parity in range(2):
                    at = builder.add(s, builder.add(t, _i64(parity)))
                    xrow = builder.add(base, _index(builder, idx.data, at))
                    _tile_step(builder, accs, parity, vals.data, dtype, at, xs.data, xrow)
            with builder.if_then(builder.icmp_signed("<", pairs, n)):
                at = builder.add(s, pairs)
                xrow = builder.add(base, _index(builder, idx.data, at))
                _tile_step(builder, accs, 0, vals.data, dtype, at, xs.data, xrow)
            builder.store(builder.add(s, n), position)
        _store_tile(builder, accs, ys.data, out_row_)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def nm24_row_tile(typingctx, values, positions, row, xt, first, out, out_row):
    """:func:`blocked_row_tile` for a 2:4 row."""
    if not (_contiguous(values, positions, xt, out) and _value_type(values)):
        return None
    signature = types.none(values, positions, row, xt, first, out, out_row)

    def codegen(context, builder, sig, args):
        vals, pos, xs, ys = _arrays(context, builder, sig, args, 0, 1, 3, 5)
        half = builder.extract_value(vals.shape, 1)
        first_values = builder.mul(args[2], half)
        pos_first = builder.mul(args[2], builder.extract_value(pos.shape, 1))
        dtype = sig.args[0].dtype
        accs = [cgutils.alloca_once_value(builder, _ZERO) for _ in range(2)]
        # A group's two values go to the two accumulators (half = cols / 2 is even).
        with cgutils.for_range(builder, builder.lshr(half, _i64(1))) as loop:
            byte = _index(
                builder, pos.data, builder.add(pos_first, builder.lshr(loop.index, _i64(1)))
            )
            places = builder.lshr(byte, builder.shl(builder.and_(loop.index, _i64(1)), _i64(2)))
            for parity in range(2):
                t = builder.add(builder.shl(loop.index, _i64(1)), _i64(parity))
                place = builder.and_(builder.lshr(places, _i64(2 * parity)), _i64(3))
                column = builder.add(builder.shl(loop.index, _i64(2)), place)
                at = builder.add(first_values, t)
                _tile_step(
                    builder,
                    accs,
                    parity,
                    vals.data,
                    dtype,
                    at,
                    xs.data,
                    builder.add(args[4], column),
                )
        _store_tile(builder, accs, ys.data, args[6])
        return context.get_dummy_value()

    return signature, codegen


# --- intrinsics: bitmask layout -------------------------------------------------------------------
#
# A row is its bitmask bytes and its non-zeros in column order. Byte k (columns 8k .. 8k+7)
# owns the next popcount(k) values; spread into 8 lanes (lane j takes the value numbered
# prefix(m, j) = popcount(m & ((1 << j) - 1)), zero where bit j is clear) it meets x[8k .. 8k+8]
# as one vector. Work per weight, not per non-zero, but 1/8 byte of index a weight.


def permute_available(context) -> bool:
    """The target has AVX2's variable 8-lane permute (``vpermps``): the spread is one
    instruction. Elsewhere the lanes are loaded one by one (same results)."""
    try:
        codegen = context.codegen()
        x86 = codegen._tm.triple.startswith(("x86_64", "i686", "i386"))
        return x86 and "+avx2" in codegen._tm_features.split(",")
    except AttributeError:  # numba internals moved: take the portable path
        return False


def _splat_i32(builder: ir.IRBuilder, scalar: ir.Value) -> ir.Value:
    vector_type = ir.VectorType(_I32, LANES)
    one = builder.insert_element(
        ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(_I32, 0)
    )
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def _spread(builder, byte, values, dtype, p, prefixes, permute: bool) -> ir.Value:
    """The 8 weights of a bitmask byte (i32 ``byte``, its first value at ``values[p]``; its
    ``prefixes`` row of the lookup table: lane j's place in the byte's run of values, the
    sign bit set where bit j is clear), zero where the bit is clear."""
    row = builder.mul(builder.zext(byte, _I64), _i64(LANES))
    table = _load_vector(builder, prefixes, row, LANES)
    if permute:  # vpermps reads the low 3 bits of each index, vblendvps the sign bit
        window = _widen(builder, _load_vector(builder, values, p, LANES), dtype)
        indices = ir.VectorType(_I32, LANES)
        vpermps = _x86(builder, "llvm.x86.avx2.permps", [_VF, indices])
        vblendvps = _x86(builder, "llvm.x86.avx.blendv.ps.256", [_VF, _VF, _VF])
        spread = builder.call(vpermps, [window, table])
        return builder.call(vblendvps, [spread, _ZERO, builder.bitcast(table, _VF)])
    spread = ir.Constant(_VF, ir.Undefined)
    for lane in range(LANES):
        place = builder.and_(
            builder.extract_element(table, ir.Constant(_I32, lane)), ir.Constant(_I32, 7)
        )
        value = builder.load(builder.gep(values, [builder.add(p, builder.zext(place, _I64))]))
        spread = builder.insert_element(
            spread, _widen(builder, value, dtype), ir.Constant(_I32, lane)
        )
    clear = builder.icmp_signed("<", table, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))
    return builder.select(clear, _ZERO, spread)


def _x86(builder: ir.IRBuilder, name: str, arguments: list) -> ir.Function:
    """An x86 vector intrinsic returning 8 floats (only used where the target has AVX2)."""
    function_type = ir.FunctionType(_VF, arguments)
    return cgutils.get_or_insert_function(builder.module, function_type, name)


def _row_bytes(builder, masks, row, nbytes, body) -> None:
    """``body(byte, k, lane)`` for each byte ``k`` of ``row`` in order (``byte`` an i32,
    ``lane`` = k mod 8, to pick an accumulator): unrolled by 8."""
    first = builder.mul(row, nbytes)
    whole = builder.and_(nbytes, _i64(-8))

    def one(k, lane):
        byte = builder.load(builder.gep(masks, [builder.add(first, k)]))
        body(builder.zext(byte, _I32), k, lane)

    with cgutils.for_range_slice(builder, _i64(0), whole, _i64(8)) as (k, _):
        for lane in range(8):
            one(builder.add(k, _i64(lane)), lane)
    with cgutils.for_range_slice(builder, whole, nbytes, _i64(1)) as (k, _):
        one(k, 0)


# Software prefetch distances of the one-token bitmask kernel (elements ahead of the read).
PREFETCH_VALUES = 1024
PREFETCH_MASK = 1024


def _prefetch(builder: ir.IRBuilder, pointer: ir.Value) -> None:
    """A read prefetch of ``pointer``'s cache line (a hint: never faults, even past the end)."""
    i8p = ir.IntType(8).as_pointer()
    function_type = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
    prefetch = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0i8")
    address = builder.bitcast(pointer, i8p)
    builder.call(
        prefetch, [address, ir.Constant(_I32, 0), ir.Constant(_I32, 0), ir.Constant(_I32, 1)]
    )


def _advance(builder, position, byte) -> ir.Value:
    """The position of the byte's first value; moves ``position`` past its values."""
    p = builder.load(position)
    builder.store(builder.add(p, builder.zext(builder.ctpop(byte), _I64)), position)
    return p


@intrinsic
def bitmask_row_dot(typingctx, bitmask, values, prefixes, row, start, x):
    """``sum_c W[row, c] x[c]`` of a bitmask row whose values start at ``start``; ``x`` holds
    8 * bytes entries and ``values`` 8 beyond the last non-zero (the spread reads windows of 8)."""
    if not (_contiguous(bitmask, values, prefixes, x) and _value_type(values)):
        return None
    signature = types.float32(bitmask, values, prefixes, row, start, x)

    def codegen(context, builder, sig, args):
        masks, vals, lut, xs = _arrays(context, builder, sig, args, 0, 1, 2, 5)
        permute, dtype = permute_available(context), sig.args[1].dtype
        accs = [cgutils.alloca_once_value(builder, _ZERO) for _ in range(4)]
        position = cgutils.alloca_once_value(builder, args[4])
        nbytes = builder.extract_value(masks.shape, 1)

        def body(byte, k, lane):
            p = _advance(builder, position, byte)
            if lane == 0:  # once per 64 columns: ask for the values and mask bytes ahead
                _prefetch(builder, builder.gep(vals.data, [builder.add(p, _i64(PREFETCH_VALUES))]))
                ahead = builder.add(
                    builder.mul(args[3], nbytes), builder.add(k, _i64(PREFETCH_MASK))
                )
                _prefetch(builder, builder.gep(masks.data, [ahead]))
            weights = _spread(builder, byte, vals.data, dtype, p, lut.data, permute)
            entries = _load_vector(builder, xs.data, builder.mul(k, _i64(LANES)), LANES)
            _accumulate(builder, accs[lane % 4], weights, entries)  # four FMA chains

        _row_bytes(builder, masks.data, args[3], nbytes, body)
        total = builder.fadd(builder.load(accs[0]), builder.load(accs[1]), flags=_FAST)
        more = builder.fadd(builder.load(accs[2]), builder.load(accs[3]), flags=_FAST)
        return _hsum(builder, builder.fadd(total, more, flags=_FAST))

    return signature, codegen


@intrinsic
def bitmask_row_tile(typingctx, bitmask, values, prefixes, row, start, xq, tile, out, out_row):
    """``out[out_row, j] = sum_c W[row, c] x_j[c]`` for the 8 tokens of ``tile``, ``xq``
    [tiles, bytes, 8 tokens, 8 columns] (a byte's columns of the 8 tokens side by side, at
    fixed offsets): each byte is spread once and meets the 8 tokens."""
    if not (_contiguous(bitmask, values, prefixes, xq, out) and _value_type(values)):
        return None
    signature = types.none(bitmask, values, prefixes, row, start, xq, tile, out, out_row)

    def codegen(context, builder, sig, args):
        masks, vals, lut, xs, ys = _arrays(context, builder, sig, args, 0, 1, 2, 5, 7)
        permute, dtype = permute_available(context), sig.args[1].dtype
        nbytes = builder.extract_value(masks.shape, 1)
        first = builder.gep(
            xs.data, [builder.mul(args[6], builder.mul(nbytes, _i64(LANES * LANES)))]
        )
        accs = [cgutils.alloca_once_value(builder, _ZERO) for _ in range(LANES)]
        position = cgutils.alloca_once_value(builder, args[4])

        def body(byte, k, lane):
            p = _advance(builder, position, byte)
            weights = _spread(builder, byte, vals.data, dtype, p, lut.data, permute)
            block = builder.mul(k, _i64(LANES * LANES))
            for j in range(LANES):
                entries = _load_vector(builder, first, builder.add(block, _i64(LANES * j)), LANES)
                _accumulate(builder, accs[j], weights, entries)

        _row_bytes(builder, masks.data, args[3], nbytes, body)
        for j in range(LANES):
            at = builder.add(builder.mul(args[8], _i64(LANES)), _i64(j))
            builder.store(_hsum(builder, builder.load(accs[j])), builder.gep(ys.data, [at]))
        return context.get_dummy_value()

    return signature, codegen


# ============================================================================= kernels

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
    is clear (the kernel zeroes those lanes by the sign). 8 KiB: stays in L1."""
    table = np.zeros((256, 8), dtype=np.int64)
    for m in range(256):
        for j in range(8):
            clear = 0 if m >> j & 1 else -(1 << 31)
            table[m, j] = bin(m & ((1 << j) - 1)).count("1") + clear
    return table.astype(np.int32)


PREFIXES = prefix_table()


# --- bitmask layout: rows to threads --------------------------------------------------------------


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


# --- blocked layout: rows to threads --------------------------------------------------------------


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


# --- 2:4 layout: rows to threads ------------------------------------------------------------------


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
