"""``SparseLinear``: a Linear layer holding only its non-zeros, for CPU inference.

The product runs in numba kernels (:mod:`sparsellm.sparse.kernels`, the optional extra
``sparsellm[infer]``): one token (decode) reads each non-zero once, a few tokens go through a
batched kernel, and from :func:`kernel_token_limit` tokens on (prefill) the weight is decoded
a tile of rows at a time into a dense buffer for ``torch.mm``, where dense arithmetic wins.
No dense copy of the weight is kept. Without numba, or with ``SPARSELLM_SPARSE_KERNEL=0``,
every product takes the tile path (decoded with torch) after one warning.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsellm.sparse import layout
from sparsellm.sparse.layout import Packed

LANES = 8  # tokens per tile of the batched kernels (kernels.LANES)

KERNEL_ENV = "SPARSELLM_SPARSE_KERNEL"
INSTALL_HINT = "pip install 'sparsellm[infer]'"
TILE_ELEMENTS = 1 << 20  # weights decoded at a time on the tile path (4 MiB of float32)
SERIAL_BYTES = 1 << 16  # one token on a smaller layer runs on the calling thread
_OFF = ("0", "false", "no", "off")
_state: dict[str, Any] = {"kernels": None, "warned": False, "threads": {}}


def _kernels() -> Any:
    """The kernels module, or ``None`` when numba cannot be imported (looked up once)."""
    if _state["kernels"] is None:
        try:
            from sparsellm.sparse import kernels
        except ImportError as exc:
            _state["kernels"] = exc
        else:
            _state["kernels"] = kernels
    found = _state["kernels"]
    return None if isinstance(found, ImportError) else found


def kernel_unavailable() -> str | None:
    """Why the sparse kernels cannot run (``None``: they can)."""
    if os.environ.get(KERNEL_ENV, "1").strip().lower() in _OFF:
        return f"disabled by {KERNEL_ENV}={os.environ[KERNEL_ENV]}"
    if _kernels() is None:
        return f"numba cannot be imported ({_state['kernels']})"
    return None


def _warn_fallback(reason: str) -> None:
    """One warning a process: the products fall back to dense arithmetic."""
    if _state["warned"]:
        return
    _state["warned"] = True
    warnings.warn(
        f"sparsellm: the sparse CPU kernel is unavailable ({reason}); SparseLinear falls back "
        f"to dense matmul on weights decoded tile by tile, which is slower than a dense model. "
        f"Install the kernel with: {INSTALL_HINT}",
        RuntimeWarning,
        stacklevel=4,
    )


# The most tokens a product runs in a batched sparse kernel; more go to the tile path (decode
# + torch.mm). Measured crossovers (bench/kernel.py --tokens ..., docs/ARCHITECTURE.md): the
# bitmask kernel's work is per weight, the others' per non-zero (limits by density).
TOKEN_LIMITS = {"bitmask": 64, "blocked": ((0.15, 256), (0.35, 64), (1.0, 16)), "nm24": 32}


def kernel_token_limit(kind: str, density: float) -> int:
    """The most tokens a ``kind`` layout of ``density`` multiplies in its batched kernel."""
    limit = TOKEN_LIMITS[kind]
    if isinstance(limit, int):
        return limit
    return next(tokens for most, tokens in limit if density <= most)


def _threads() -> int:
    """numba threads = torch threads (within numba's pool size). numba's setting is per
    calling thread; it is changed only when torch's differs from what was set last."""
    wanted = torch.get_num_threads()
    key = (threading.get_ident(), wanted)
    if key not in _state["threads"]:
        import numba

        numba.set_num_threads(max(1, min(wanted, numba.config.NUMBA_NUM_THREADS)))
        # numba's OpenMP layer may share torch's runtime: starting its pool (the first call)
        # sets that runtime's thread count, torch's too. Give torch its own back.
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        _state["threads"] = {key: numba.get_num_threads()}
    return _state["threads"][key]


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` packed (:mod:`sparsellm.sparse.layout`); inference only.

    Build it with :meth:`from_dense`, :meth:`from_packed` (the checkpoint's bitmask parts) or
    :meth:`from_nm` (its N:M parts). Values are float32 or bfloat16 (other floats are kept as
    float32); inputs of any float dtype and leading shape, outputs in the input's dtype.
    """

    def __init__(self, packed: Packed, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.kind = packed.kind
        self.width = packed.width
        for name, tensor in packed.tensors.items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # Tokens up to which the batched kernel runs (None: kernel_token_limit's choice).
        self.kernel_tokens: int | None = None
        # Siblings reading the same input, decoded in one call (sparsellm.sparse.fuse).
        self.shared: Any = None
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------------- constructors

    @classmethod
    def from_dense(
        cls,
        linear_or_weight: nn.Module | Tensor,
        bias: Tensor | None = None,
        *,
        index: str = "auto",
        pattern: str = "auto",
    ) -> SparseLinear:
        """From an ``nn.Linear`` / GPT-2 ``Conv1D`` (its bias too) or an ``[out, in]`` weight.
        ``pattern``: ``auto`` takes the 2:4 layout when the weight fits it and it is smaller,
        ``2:4`` insists, ``unstructured`` never; ``index``: ``auto``, ``u8`` or ``u16``."""
        from sparsellm.models.linear import linear_weight

        weight = linear_or_weight
        if isinstance(linear_or_weight, nn.Module):
            weight = linear_weight(linear_or_weight)
            bias = linear_or_weight.bias if bias is None else bias
        weight = weight.detach().to(layout.value_dtype(weight.dtype))
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D [out, in], not {list(weight.shape)}")
        if pattern not in ("auto", "2:4", "unstructured"):
            raise ValueError(f"pattern must be auto, 2:4 or unstructured, not {pattern!r}")
        if pattern != "unstructured" and layout.is_nm24(weight):
            if pattern == "2:4" or _nm24_smaller(weight):
                return cls(layout.nm24_from_dense(weight), bias)
        elif pattern == "2:4":
            raise ValueError("the weight has a group of 4 columns with more than 2 non-zeros")
        bitmask, values, offsets = _bitmask_parts(weight)
        return cls.from_packed(bitmask, values, offsets, weight.shape, bias, index=index)

    @classmethod
    def from_packed(
        cls,
        bitmask: Tensor,
        values: Tensor,
        row_offsets: Tensor,
        shape: Tensor | Sequence[int],
        bias: Tensor | None = None,
        *,
        index: str = "auto",
    ) -> SparseLinear:
        """From the "sparse-bitmask" parts: ``bitmask`` uint8 [rows, ceil(cols/8)] (bit j of
        byte k of row r set iff column 8k+j is non-zero), ``values`` the non-zeros row-major,
        ``row_offsets`` int64 [rows] (each row's first value), ``shape`` [rows, cols]. The
        dense weight is never built; parts that disagree raise ``ValueError``."""
        rows, cols = layout.as_shape(shape)
        values = values.detach().reshape(-1)
        values = values.to(layout.value_dtype(values.dtype))
        sparsity = 1.0 - values.numel() / max(rows * cols, 1)
        chosen = layout.choose_index(sparsity, cols, index)
        if chosen == "bitmask":
            return cls(layout.bitmask_layout(bitmask, values, row_offsets, (rows, cols)), bias)
        packed = layout.blocked_from_bitmask(bitmask, values, row_offsets, (rows, cols), chosen)
        return cls(packed, bias)

    @classmethod
    def from_nm(
        cls,
        values: Tensor,
        indices: Tensor,
        pattern: Sequence[int] | Tensor,
        shape: Tensor | Sequence[int],
        bias: Tensor | None = None,
        *,
        index: str = "auto",
    ) -> SparseLinear:
        """From the checkpoint's N:M parts: ``values`` [rows, cols/M*N] (N a group, zeros
        where a group holds fewer), ``indices`` uint8 (each value's place in its group,
        ``position_bits(M)`` bits, packed little-endian row by row), ``pattern`` [N, M].
        2:4 keeps this form (2-bit positions); other patterns become an unstructured one."""
        n, m = (int(v) for v in (pattern.tolist() if isinstance(pattern, Tensor) else pattern))
        rows, cols = layout.as_shape(shape)
        values = values.detach()
        values = values.to(layout.value_dtype(values.dtype))
        if not 0 < n < m or cols % m:
            raise ValueError(f"pattern {n}:{m} does not fit {cols} columns")
        if (n, m) == (2, 4):
            layout.check_nm24(values, indices, (rows, cols))
            tensors = {"values": values, "positions": indices.detach()}
            return cls(Packed("nm24", (rows, cols), tensors), bias)
        if tuple(values.shape) != (rows, cols // m * n):
            raise ValueError(
                f"N:M values must be [{rows}, {cols // m * n}], not {list(values.shape)}"
            )
        chosen = layout.choose_index(1.0 - n / m, cols, index)
        if chosen == "bitmask":
            return cls(layout.bitmask_from_nm(values, indices, n, m, (rows, cols)), bias)
        packed = layout.blocked_from_nm(values, indices, n, m, (rows, cols), chosen)
        return cls(packed, bias)

    # ------------------------------------------------------------------------- properties

    @property
    def nnz(self) -> int:
        """Values stored (2:4: two a group, fill-up zeros included; not the bitmask's pad)."""
        return self.values.numel() - (layout.PAD if self.kind == "bitmask" else 0)

    @property
    def density(self) -> float:
        return self.nnz / max(self.in_features * self.out_features, 1)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight and the bias: what a product reads."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def index(self) -> str:
        """The index form: ``2:4``, ``bitmask``, ``u8`` or ``u16``."""
        if self.kind in ("nm24", "bitmask"):
            return "2:4" if self.kind == "nm24" else "bitmask"
        return "u8" if self.cols.dtype == torch.uint8 else "u16"

    def packed(self) -> Packed:
        """The packed weight (the module's buffers)."""
        names = {
            "nm24": ("values", "positions"),
            "bitmask": ("bitmask", "values", "row_offsets"),
            "blocked": ("values", "cols", "counts", "row_ptr"),
        }[self.kind]
        shape = (self.out_features, self.in_features)
        return Packed(self.kind, shape, {n: getattr(self, n) for n in names}, self.width)

    def to_dense(self) -> Tensor:
        """The ``[out, in]`` weight in the values' dtype (for checks, not for inference)."""
        packed = self.packed()
        tiles = [layout.decode_rows(packed, rows) for rows in self._row_tiles()]
        dense = torch.cat(tiles) if tiles else torch.zeros(0, self.in_features)
        return dense.to(self.values.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"index={self.index}, density={self.density:.3f}, dtype={self.values.dtype}, "
            f"bias={self.bias is not None}"
        )

    def _apply(self, fn: Any, recurse: bool = True) -> SparseLinear:
        self._cache = {}  # buffers may be new tensors (dtype or device moves)
        self.shared = None  # and no longer views of the siblings' stacked rows
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        one_token = x.numel() == self.in_features and x.shape[-1] == self.in_features
        if one_token and x.dtype == torch.float32:
            y = self._decode_token(x)  # decode: a lean path (Python costs show at this size)
            if y is not None:
                return y
        if x.shape[-1] != self.in_features or not x.is_floating_point():
            raise ValueError(  # as nn.Linear refuses them (a reshape would mix tokens)
                f"input of shape {list(x.shape)} and dtype {x.dtype}: this layer takes "
                f"floating-point inputs of {self.in_features} features"
            )
        flat = x.detach().reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        y = self._product(flat)  # a new float32 tensor: added to in place
        if self.bias is not None:
            y += self.bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _decode_token(self, x: Tensor) -> Tensor | None:
        """One float32 token on the CPU straight through numpy (``None``: not applicable)."""
        if not (x.is_cpu and x.is_contiguous()) or x.requires_grad:
            return None
        if self._kernels_or_none() is None:
            return None
        shape = self._cache.get(("shape", x.dim())) or self._out_shape(x.dim())
        if self.shared is not None:
            output = self.shared.output(self, x)
            if output is not None:
                return torch.from_numpy(output.reshape(shape))
        threads = _threads()
        kernel, arguments = self._cache.get(("mv", threads)) or self._mv_plan(threads)
        column = x.numpy().reshape(-1)
        if self.kind == "bitmask" and self.in_features % 8:
            column = np.concatenate([column, np.zeros(8 - self.in_features % 8, np.float32)])
        y = np.empty(shape, dtype=np.float32)
        kernel(*arguments, column, y.reshape(-1))
        if self.bias is not None:
            y += self._bias32()
        return torch.from_numpy(y)

    def _out_shape(self, dims: int) -> tuple[int, ...]:
        """The output shape of one token given as ``dims`` dimensions (leading ones)."""
        self._cache["shape", dims] = (1,) * (dims - 1) + (self.out_features,)
        return self._cache["shape", dims]

    def _bias32(self) -> np.ndarray:
        if "bias" not in self._cache:
            self._cache["bias"] = self.bias.to(torch.float32).numpy()
        return self._cache["bias"]

    def _product(self, flat: Tensor) -> Tensor:
        """``flat @ W^T`` in float32, by the fastest path for its number of tokens."""
        tokens = flat.shape[0]
        kernels = self._kernels_or_none()
        if kernels is None or flat.device.type != "cpu":
            return self._tiles(flat, None)
        threads = _threads()
        if tokens == 1:  # decode: the hot path, its kernel and arguments looked up once
            return self._mv(flat, threads)
        if tokens == 0:
            return flat.new_zeros(0, self.out_features)
        limit = self.kernel_tokens
        if limit is None:
            limit = kernel_token_limit(self.kind, self.density)
        if tokens <= limit:
            return self._mm(kernels, flat, threads)
        return self._tiles(flat, kernels)

    def _kernels_or_none(self) -> Any:
        """The kernels module, or ``None`` after one warning when they cannot run (decided on
        the module's first product: ``SPARSELLM_SPARSE_KERNEL`` is read then)."""
        if "kernels" not in self._cache:
            reason = kernel_unavailable()
            if reason is not None:
                _warn_fallback(reason)
            self._cache["kernels"] = None if reason is not None else _kernels()
        return self._cache["kernels"]

    def _arrays(self) -> tuple[Any, ...]:
        """The buffers as numpy arrays, in the kernels' argument order (cached until the next
        ``_apply``)."""
        if "arrays" not in self._cache:
            values = self.values
            if values.dtype == torch.bfloat16:
                values_np = values.view(torch.int16).numpy()
            else:
                values_np = values.to(torch.float32).numpy()  # a copy only for other floats
            if self.kind == "nm24":
                arrays = (values_np, self.positions.numpy())
            elif self.kind == "bitmask":
                prefixes = _kernels().PREFIXES
                arrays = (self.bitmask.numpy(), values_np, self.row_offsets.numpy(), prefixes)
            else:
                cols = self.cols.numpy()
                cols = cols.view(np.uint16) if cols.dtype == np.int16 else cols
                counts, row_ptr = self.counts.numpy(), self.row_ptr.numpy()
                arrays = (values_np, cols, counts, row_ptr, self.width)
            self._cache["arrays"] = arrays
        return self._cache["arrays"]

    def _parts(self, threads: int) -> np.ndarray:
        """Row boundaries giving each thread the same number of bytes to read."""
        key = f"parts{threads}"
        if key not in self._cache:
            rows = self.out_features
            if self.kind == "nm24":
                read = np.arange(rows + 1, dtype=np.float64)
            elif self.kind == "bitmask":
                starts = np.append(self.row_offsets.numpy(), self.nnz).astype(np.float64)
                read = (
                    starts * self.values.element_size()
                    + np.arange(rows + 1) * self.bitmask.shape[1]
                )
            else:
                read = self.row_ptr.numpy().astype(np.float64)
            bounds = np.searchsorted(read, np.linspace(0, read[-1], threads + 1))
            bounds[0], bounds[-1] = 0, rows
            self._cache[key] = np.minimum(bounds, rows).astype(np.int64)
        return self._cache[key]

    def _padded_columns(self, flat: Tensor, rows: int) -> Tensor:
        """``flat`` [tokens, in] as [rows, 8 * bitmask bytes], zero-padded (the bitmask
        kernels read x in whole bytes of columns)."""
        width = -(-self.in_features // 8) * 8
        if width == self.in_features and rows == flat.shape[0]:
            return flat.contiguous()
        padded = flat.new_zeros(rows, width)
        padded[: flat.shape[0], : self.in_features] = flat
        return padded

    def _mv(self, x: Tensor, threads: int) -> Tensor:
        kernel, arguments = self._cache.get(("mv", threads)) or self._mv_plan(threads)
        if self.kind == "bitmask":
            x = self._padded_columns(x, 1)
        y = np.empty(self.out_features, dtype=np.float32)
        kernel(*arguments, x.numpy()[0], y)
        return torch.from_numpy(y).view(1, self.out_features)

    def _mv_plan(self, threads: int) -> tuple[Any, tuple]:
        """The one-token kernel and its leading arguments: on the calling thread for a small
        layer (waking the thread pool costs more than it saves), else rows split by threads."""
        kernels = self._cache["kernels"]
        name = {"bitmask": "bitmask_mv", "nm24": "nm24_mv", "blocked": "blocked_mv"}[self.kind]
        if self.nbytes < SERIAL_BYTES or threads == 1:
            plan = (getattr(kernels, f"{name}_serial"), self._arrays())
        else:
            plan = (getattr(kernels, name), (*self._arrays(), self._parts(threads)))
        self._cache["mv", threads] = plan
        return plan

    def _mm(self, kernels: Any, flat: Tensor, threads: int) -> Tensor:
        tokens, lanes = flat.shape[0], LANES
        tiles = -(-tokens // lanes)
        yt = torch.empty(tiles * self.out_features, lanes)
        parts = self._parts(threads)
        if self.kind == "bitmask":
            xp = self._padded_columns(flat, tiles * lanes)
            # [tiles, bytes, 8 tokens, 8 columns]: a byte's columns of a tile's tokens together.
            xq = xp.view(tiles, lanes, -1, 8).transpose(1, 2).contiguous()
            kernels.bitmask_mm(*self._arrays(), parts, xq.numpy(), yt.numpy())
        else:
            padded = flat.new_zeros(tiles * lanes, self.in_features)
            padded[:tokens] = flat
            # [tiles * in, lanes]: one weight meets a tile's tokens as one contiguous vector.
            xt = padded.view(tiles, lanes, self.in_features).transpose(1, 2).contiguous()
            xt = xt.view(tiles * self.in_features, lanes)
            run = kernels.nm24_mm if self.kind == "nm24" else kernels.blocked_mm
            run(*self._arrays(), parts, xt.numpy(), self.in_features, yt.numpy())
        y = yt.view(tiles, self.out_features, lanes).transpose(1, 2)
        return y.reshape(tiles * lanes, self.out_features)[:tokens]

    def _row_tiles(self) -> list[slice]:
        step = max(1, TILE_ELEMENTS // max(self.in_features, 1))
        return [
            slice(r, min(r + step, self.out_features)) for r in range(0, self.out_features, step)
        ]

    def _tiles(self, flat: Tensor, kernels: Any) -> Tensor:
        """Decode a tile of rows, multiply it densely, next tile: the weight is never whole."""
        out = torch.empty(self.out_features, flat.shape[0], device=flat.device)
        packed = None if kernels is not None else self.packed()
        buffer = None
        for rows in self._row_tiles():
            if kernels is None:
                tile = layout.decode_rows(packed, rows).to(flat.device)
            else:
                if buffer is None:
                    buffer = torch.empty(rows.stop - rows.start, self.in_features)
                tile = buffer[: rows.stop - rows.start]
                self._decode(kernels, rows.start, tile)
            torch.mm(tile, flat.t(), out=out[rows])
        return out.t()

    def _decode(self, kernels: Any, first: int, tile: Tensor) -> None:
        arrays = self._arrays()
        if self.kind == "nm24":
            kernels.nm24_decode(*arrays, first, tile.numpy())
        elif self.kind == "bitmask":
            kernels.bitmask_decode(*arrays[:3], first, tile.numpy())
        else:
            kernels.blocked_decode(*arrays, first, tile.numpy())


def _nm24_smaller(weight: Tensor) -> bool:
    """The 2:4 layout takes no more bytes than the u8 blocked one."""
    rows, cols = weight.shape
    size = weight.element_size()
    nnz = sum(int((weight[c] != 0).sum()) for c in layout.row_chunks(rows, cols))
    nm24 = rows * (cols // 2) * size + rows * -(-cols // 8)
    blocked = nnz * (size + 1) + rows * -(-cols // layout.BLOCK) * 2 + (rows + 1) * 8
    return nm24 <= blocked


def _bitmask_parts(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``bitmask``, ``values``, ``row_offsets`` of a dense ``[rows, cols]`` weight."""
    rows, cols = weight.shape
    nbytes = (cols + 7) // 8
    bitmask = torch.zeros(rows, nbytes, dtype=torch.uint8)
    counts = torch.zeros(rows, dtype=torch.int64)
    values = []
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    for chunk in layout.row_chunks(rows, cols):
        mask = weight[chunk] != 0
        padded = torch.zeros(mask.shape[0], nbytes * 8, dtype=torch.uint8)
        padded[:, :cols] = mask
        bitmask[chunk] = (padded.view(-1, nbytes, 8) * weights).sum(-1, dtype=torch.uint8)
        counts[chunk] = mask.sum(1)
        values.append(weight[chunk][mask])
    offsets = torch.zeros(rows, dtype=torch.int64)
    if rows > 1:
        offsets[1:] = torch.cumsum(counts[:-1], 0)
    flat = torch.cat(values) if values else torch.zeros(0, dtype=weight.dtype)
    return bitmask, flat, offsets
