"""Memory sizes: parsing what users type, and what this machine has free."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int | None:
    """Bytes in ``text`` ("20GiB", "24GB", "512MiB", "1e9" is not accepted), ``None`` if it is
    not a size. ``KiB``/``MiB``/``GiB`` are powers of 1024, ``KB``/``MB``/``GB`` of 1000."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        return None
    number, prefix, binary = match.groups()
    prefix = prefix.lower()
    scale = 1024 ** "_kmgt".index(prefix) if binary and prefix else _UNITS[prefix]
    value = int(float(number) * scale)
    return value if value > 0 else None


def host_available() -> int:
    """Bytes of host memory available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_free(device: torch.device) -> int | None:
    """Bytes free on ``device``; ``None`` for the CPU, whose memory is the host's (no
    separate budget: chunks there follow the settings)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


# --------------------------------------------------------------------------- the memory model
#
# One formula sizes the engine's chunks (from the real block) and `sparsellm plan`'s figures
# (from a config). Device bytes = what one block needs whatever the data (weights, the solver's
# matrices) + bytes per token x tokens per chunk. The per-token and per-matrix counts below are
# the tensors the code holds at its peak, counted from the code (see the comments).

F32 = 4
F64 = 8
# Chunk caps under a device budget: beyond these, GEMMs and kernel launches gain nothing.
MAX_FORWARD_TOKENS = 16384
MAX_SOLVER_TOKENS = 8192


@dataclass(frozen=True)
class BlockShape:
    """The sizes of one decoder block that decide its memory."""

    hidden: int  # d, the width of the hidden states
    intermediate: int  # f, the FFN's inner width
    heads: int  # attention heads (the attention scores of a window are heads x seqlen²)
    params: int  # parameters of one block
    dtype_bytes: int  # bytes per weight and activation element (model dtype)
    gated: bool = True  # gate and up projections (LLaMA) or a single up projection (OPT)
    prunable: int = 0  # parameters of the block's Linear weights (the guard's host copy)
    eager_attention: bool = False  # materialises heads x seqlen scores per token (not SDPA)

    @classmethod
    def of_block(
        cls, block: nn.Module, hidden: int, heads: int, dtype_bytes: int, eager: bool = False
    ) -> BlockShape:
        """The shape of a real block: f is the widest side of its Linear layers."""
        linear_sizes = [max(m.weight.shape) for m in block.modules() if _is_linear(m)]
        gated = sum(1 for m in block.modules() if _is_linear(m)) >= 7
        return cls(
            hidden=hidden,
            intermediate=max([hidden, *linear_sizes]),
            heads=heads,
            params=sum(p.numel() for p in block.parameters()),
            dtype_bytes=dtype_bytes,
            gated=gated,
            prunable=sum(m.weight.numel() for m in block.modules() if _is_linear(m)),
            eager_attention=eager,
        )

    @classmethod
    def of_config(cls, config: object, dtype: torch.dtype) -> BlockShape:
        """The shape of one block of a ``transformers`` config, without building the model
        (see :func:`sparsellm.shapes.config_sizes`, which counts the parameters)."""
        from sparsellm.shapes import config_sizes

        sizes = config_sizes(config)
        return cls(
            hidden=sizes.hidden,
            intermediate=sizes.intermediate,
            heads=sizes.heads,
            params=sizes.block_params,
            dtype_bytes=torch.empty((), dtype=dtype).element_size(),
            gated=sizes.gated,
            prunable=sizes.block_prunable,
        )

    @property
    def ffn_weight_bytes(self) -> int:
        """One f x d matrix in float32."""
        return self.intermediate * self.hidden * F32


def _is_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and "Embedding" not in str(type(module))
    )


def forward_token_bytes(shape: BlockShape, seqlen: int) -> int:
    """Device bytes per token of a block's forward pass with statistics hooks: the hidden
    states, the attention's q/k/v/o and the FFN's inner activations alive at its peak (about
    4 d-wide and 2 f-wide rows in the model dtype, measured on llama and OPT blocks,
    ``tests/test_plan.py``), a float32 copy of a hooked layer's input when the model is not
    float32, and with eager attention a row of scores per head (SDPA, the default, holds
    none)."""
    d, f, b = shape.hidden, shape.intermediate, shape.dtype_bytes
    upcast = (d + f) * F32 if b != F32 else 0
    scores = shape.heads * seqlen * F32 if shape.eager_attention else 0
    return (4 * d + 2 * f) * b + upcast + scores


def solver_token_bytes(shape: BlockShape, device_type: str) -> int:
    """Device bytes per token of a SparseLLM pass: X rows and the target (float32, d), the
    residual and q (d); m, n, the activation, z, s, act(s), p and two temporaries (f; a plain
    FFN has no n, s, act(s)); and on accelerators the elementwise update's temporaries over the
    whole chunk (a dozen f-wide rows; on the CPU they stay in a fixed cache-sized block)."""
    d, f = shape.hidden, shape.intermediate
    rows = 9 if shape.gated else 6
    elementwise = 12 * f if device_type != "cpu" else 0
    return (4 * d + rows * f + elementwise) * F32


def solver_fixed_bytes(shape: BlockShape, method: str) -> int:
    """Device bytes a block's weight solves hold: SparseGPT: the d x d Hessian, its factor and
    inverse, a float32 weight and its pruned copy. SparseLLM adds the FFN's dense and current
    float32 weights (6 f x d gated, 4 plain), the cross products (3, 2), one candidate's
    masked-CG run with the OBS result and the candidates kept so far (about 12 f x d gated,
    11 plain: candidates are refined one at a time) and the f x f activation Gram with its
    factor and inverse."""
    d, f = shape.hidden, shape.intermediate
    local = 3 * d * d * F32 + 2 * f * d * F32
    if method != "sparsellm":
        return local
    matrices = 6 + 3 + 12 if shape.gated else 4 + 2 + 11
    return local + matrices * shape.ffn_weight_bytes + 3 * f * f * F32


def admm_basis_bytes(width: int) -> int:
    """Device bytes of the ADMM eigenbasis of a ``width`` x ``width`` Gram while it is formed:
    the float64 copy and eigenvectors and LAPACK's 2n² workspace of ``eigh``, then the float32
    scaled Gram and eigenvectors kept (10 float32 matrices in all)."""
    return 10 * width * width * F32


def solver_pass_bytes(shape: BlockShape) -> int:
    """Device bytes a SparseLLM pass over the tokens holds besides its chunk (the weight
    solves' stacks are gone by then): the dense and current float32 FFN weights (6 f x d gated,
    4 plain), the cross products it sums into (zᵀX, sᵀX, Tᵀp: 3 f x d gated, 2 plain), the
    f x f Gram pᵀp and the d x d Gram of X, its ridged copy (``--ridge``) and their inverse."""
    d, f = shape.hidden, shape.intermediate
    matrices = 9 if shape.gated else 6
    return (matrices * f * d + f * f + 3 * d * d) * F32


def forward_fixed_bytes(shape: BlockShape) -> int:
    """What a statistics pass holds whatever its batch: the d x d Gram sums it adds into
    (float64: order-independent sums, ``statistics.py``)."""
    return 3 * shape.hidden**2 * F64


def block_bytes(shape: BlockShape) -> int:
    """The block's own weights on the device."""
    return shape.params * shape.dtype_bytes


def block_sized_windows(shape: BlockShape, seqlen: int) -> int:
    """Windows per forward pass of an out-of-core run on the CPU: as many as keep the pass's
    activations within about the block's own bytes (at least one). There the device's memory
    is the host's that ``--offload disk`` saves, and the statistics do not depend on the batch
    (``statistics.py``), so the pruned weights are those of larger batches."""
    return int(max(1, block_bytes(shape) // (seqlen * forward_token_bytes(shape, seqlen))))


@dataclass(frozen=True)
class Budget:
    """Device bytes the engine may use (``None``: no limit, the settings decide)."""

    total: int | None

    @classmethod
    def resolve(cls, setting: str, device: torch.device) -> Budget:
        """``--device-memory``: a size, or ``auto`` (90 % of what the device has free now;
        no limit on the CPU, whose memory is the host's)."""
        if setting != "auto":
            return cls(parse_size(setting))
        free = device_free(device)
        return cls(None if free is None else int(free * 0.9))

    def forward_windows(self, shape: BlockShape, seqlen: int, requested: int) -> int:
        """Windows per forward pass: ``requested``; under a limit, no more than fit next to
        the block and its Grams, nor more than :data:`MAX_FORWARD_TOKENS` (matmuls are at full
        speed well before that; more would only take memory)."""
        if self.total is None:
            return requested
        room = self.total - block_bytes(shape) - forward_fixed_bytes(shape)
        fit = room // max(1, seqlen * forward_token_bytes(shape, seqlen))
        return int(max(1, min(requested, fit, MAX_FORWARD_TOKENS // seqlen)))

    def fits_ffn_admm(self, shape: BlockShape) -> bool:
        """Whether SparseLLM's ADMM supports fit next to the block and the weight solves: the
        eigenbasis of the f x f activation Gram is the largest (LLaMA-70B: 33 GiB). Where it
        does not, the FFN's weight steps take the OBS sweep (reported per block)."""
        if self.total is None:
            return True
        solves = solver_fixed_bytes(shape, "sparsellm") + admm_basis_bytes(shape.intermediate)
        return block_bytes(shape) + solves <= self.total

    def solver_tokens(self, shape: BlockShape, default: int, device_type: str) -> int:
        """Tokens per chunk of a SparseLLM pass: ``default`` without a limit, else what fits
        next to the block and what a pass holds (:func:`solver_pass_bytes`; the weight solves
        come after the pass), between 64 and :data:`MAX_SOLVER_TOKENS`."""
        if self.total is None:
            return default
        room = self.total - block_bytes(shape) - solver_pass_bytes(shape)
        fit = room // solver_token_bytes(shape, device_type)
        return int(max(64, min(fit, MAX_SOLVER_TOKENS)))


# --------------------------------------------------------------------------- host and phases
#
# What a run holds besides the device's block and chunk, counted from the code as it is. N is
# the calibration tokens of this process, d, f, b as in BlockShape.


def host_activation_bytes(
    shape: BlockShape,
    tokens: int,
    method: str,
    epochs: int = 1,
    spilled: bool = False,
    dense_model: bool = True,
) -> int:
    """Peak host bytes of calibration activations while a block is pruned (guard on).

    Every calibrated method: the block inputs (``BlockInputs.hidden``) and the dense outputs
    ``B₀`` (the guard's reference, kept by the statistics pass), [N, d] in the model dtype.
    Layer-wise methods then form the pruned outputs batch by batch, each dense batch dropped
    once compared with its pruned one (``guard``), so their sum stays [N, d]. SparseLLM
    instead holds, during its solve, ``FFNData`` (`pruners/ffn_data.py`): X (model dtype)
    and one float32 [N, d] (the residual, the target being read as dense outputs minus
    residual; or, on the general path, the target), and z, s [N, f] float32 when ``epochs``
    > 1 (the first epoch recomputes them); its pruned outputs are formed in the residual.
    ``dense_model`` (SparseLLM's ``correction`` > 0): the dense model's stream, one more
    [N, d] (its block outputs; the inputs they were computed from are dropped before the
    solve).

    ``spilled`` (an out-of-core store, ``--offload disk``): the outputs a block pass forms
    wait in a file (``spill.py``), so layer-wise methods hold only block 0's captured inputs.
    """
    d, f, b = shape.hidden, shape.intermediate, shape.dtype_bytes
    if method == "magnitude":  # data-free: no activations at all
        return 0
    held = 2 * tokens * d * b  # inputs + dense outputs
    if method != "sparsellm" and spilled:
        return tokens * d * b  # block 0's captured inputs; every output is in a file
    if method != "sparsellm":
        return held  # the pruned outputs take the dense ones' place as they form
    held += tokens * d * (b + F32)  # X, residual (or target)
    if dense_model:
        held += tokens * d * b  # the dense model's outputs of the block
    if epochs > 1:
        held += tokens * f * F32 * (2 if shape.gated else 1)  # z (and s)
    return held


def guard_copy_bytes(shape: BlockShape, method: str) -> int:
    """The guard's host copy of a block's prunable weights (model dtype), kept while the block
    is pruned so that a diverging block can be re-done; SparseGPT, the fallback itself, and
    data-free methods keep none."""
    return 0 if method in ("sparsegpt", "magnitude") else shape.prunable * shape.dtype_bytes


def device_phase_bytes(
    shape: BlockShape,
    seqlen: int,
    tokens: int,
    method: str,
    budget: Budget,
    windows: int,
    solver_chunk: int,
    device_type: str,
    ffn_solver: str = "admm",
) -> dict[str, int]:
    """Device bytes of a block's two phases beyond the block itself, with the chunks the engine
    picks under ``budget``: a forward pass of ``windows`` windows (``Budget.forward_windows``,
    next to the Gram matrices it reserves) and the solves (SparseLLM: with a chunk of
    ``Budget.solver_tokens`` tokens, ``solver_chunk`` when there is no limit, and the ADMM
    eigenbasis of the activation Gram when ``ffn_solver`` is ADMM and it fits the budget)."""
    if method == "magnitude":
        return {"forward": 0, "solve": 0, "windows": 0, "chunk": 0}
    windows = budget.forward_windows(shape, seqlen, windows)
    forward = windows * seqlen * forward_token_bytes(shape, seqlen) + forward_fixed_bytes(shape)
    solve, chunk = solver_fixed_bytes(shape, method), 0
    if method == "sparsellm" and ffn_solver == "admm" and budget.fits_ffn_admm(shape):
        solve += admm_basis_bytes(shape.intermediate)
    if method == "sparsellm":
        chunk = min(tokens, budget.solver_tokens(shape, solver_chunk, device_type))
        # The weight solves' stacks and a pass's chunk are never held together: a pass holds
        # only the matrices it reads or sums into (``solver_pass_bytes``).
        passes = solver_pass_bytes(shape) + chunk * solver_token_bytes(shape, device_type)
        solve = max(solve, passes)
    return {"forward": forward, "solve": solve, "windows": windows, "chunk": chunk}


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in host memory: itself when it is there already, else a copy in pinned
    memory (CUDA copies to and from pinned pages run asynchronously and twice as fast)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor)


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised host tensor, pinned when the work happens on CUDA."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS. glibc keeps freed storage in its heap,
    fragmented by the many chunk-sized temporaries of a block, so without this the resident
    size grows block after block (SmolLM2, disk offload: 365 -> 616 MB over 30 blocks with
    magnitude; flat with it). Called after every block."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back
        ctypes.CDLL("libc.so.6").malloc_trim(0)
