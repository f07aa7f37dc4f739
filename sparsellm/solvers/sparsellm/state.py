"""What the SparseLLM stages share: the fixed problem, the penalties, the iterate and the log.

* :class:`FFNProblem`: the data, the dense weights and the settings (never changes).
* :class:`Penalties`: α, β, γ, given or from automatic scaling (fixed after the init pass).
* :class:`DensePass`: what the init pass learned from the dense weights.
* :class:`FFNState`: the iterate of the block-coordinate descent (weights, z, s) and the
  Grams of X that every epoch reuses.
* :class:`SolveLog`: what the user is told (history, choices, retries, seconds, progress).

Automatic penalty scaling (``alpha``/``beta``/``gamma`` = None): each term is divided by the
squared norm of its quantity in the dense model, ``α_z = 1/‖m₀‖²``, ``α_s = 1/‖n₀‖²``,
``γ = 1/‖σ(n₀, m₀)‖²``, ``β = 1/‖T‖²``. Every term is then a relative error, the objective is
invariant to the scale of X, of each weight and of the activations (the reference's 0.1 vs 5.0
is exactly such a scale), and the relative weights of the terms are 1 (``_AUTO_*``; results on
SmolLM2 blocks change by < 3 % over a 10× range of each). Explicit values are used as given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from sparsellm.masks import SparsityTarget
from sparsellm.memory import host_empty
from sparsellm.models.feed_forward import ffn_hidden
from sparsellm.solvers.base import NumericalError
from sparsellm.solvers.sparsellm.activations import Activation

# Relative weights of the dimensionless terms under automatic scaling.
_AUTO_ALPHA = 1.0
_AUTO_BETA = 1.0
_AUTO_GAMMA = 1.0

ProgressFn = Callable[[dict[str, Any]], None]
# Sums a tensor in place over the processes sharing the tokens (torch.distributed all-reduce).
ReduceFn = Callable[[Tensor], Tensor]


class SharedSolves(Protocol):
    """The processes sharing the tokens share the weight solves too (``distributed.Ranks``):
    each solve goes to one rank (:meth:`owners`, the same on every rank), which broadcasts it."""

    rank: int

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that solves each problem, given the problems' costs."""
        ...

    def broadcast_(self, tensor: Tensor, src: int) -> Tensor:
        """Overwrite ``tensor`` with rank ``src``'s, in place."""
        ...


@dataclass
class FFNSolveResult:
    """New feed-forward weights (float32, on ``up``'s device) and the solver's record.

    ``history[k]`` describes the state after epoch ``k`` (``k = 0``: the initial pruning of the
    dense state, i.e. local SparseGPT with a CG refit): the objective terms ``up``, ``gate``
    (None for plain FFNs), ``act``, ``down`` and their ``total`` with the α, β, γ in use
    (non-increasing in k), and ``output_error``, the true relative FFN output error of that
    epoch's weights, ``‖FFN(X) − Y‖² / ‖Y‖²`` (relative to the sum of squares of Y, not of
    Y − mean). ``output_error`` of the result is that figure for the returned weights, after
    the final down fit. ``info`` holds which candidate each weight solve kept (``choices``:
    ``"obs"`` or ``"admm"``, ``"kept+cg"`` or ``"kept"``), damping retries and seconds per stage.
    """

    up: Tensor
    down: Tensor
    gate: Tensor | None
    history: list[dict[str, Any]]
    output_error: float
    alpha_up: float
    alpha_gate: float | None
    beta: float
    gamma: float
    info: dict[str, Any] = field(default_factory=dict)
    input_gram: Tensor | None = None  # XᵀX / tokens over every rank (float32, d × d)
    tokens: int = 0  # tokens over every rank


class NamedSums:
    """float64 running sums held in one tensor, so one all-reduce covers all, read by name."""

    def __init__(self, names: tuple[str, ...], device: torch.device) -> None:
        self.names = names
        self.tensor = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, name: str, value: Tensor) -> None:
        """Add a scalar to the sum called ``name``."""
        self.tensor[self.names.index(name)] += value

    def values(self) -> dict[str, float]:
        """Every sum as a Python float, by name."""
        return {name: float(v) for name, v in zip(self.names, self.tensor, strict=True)}


class RowDifference:
    """``minuend − subtrahend`` as ``[N, d]`` float32 rows, formed a slice at a time when read;
    with ``toward`` and ``share`` the minuend moves that share of the way to ``toward``:
    ``minuend + share · (toward − minuend) − subtrahend``.

    SparseLLM's residual-path target ``Y = B* − r``: the operands are held anyway (the dense
    block outputs ``B₀``, in batches, as the guard's reference; the dense model's outputs
    ``Bₘ``, the next block's stream; ``r`` to form the pruned outputs), so storing the
    difference would cost one more ``[N, d]`` float32 on the host. The rows read are bit for
    bit those of the stored difference (at ``share`` 0 and 1, of the plain difference).
    """

    def __init__(
        self,
        minuend: Sequence[Tensor],
        subtrahend: Tensor,
        toward: Sequence[Tensor] | None = None,
        share: float = 0.0,
    ) -> None:
        if toward is None or share == 0:
            toward, share = None, 0.0
        elif share == 1:
            minuend, toward, share = toward, None, 0.0
        self.parts = _rows(minuend)  # the batches' rows
        self.toward = _rows(toward) if toward is not None else None
        self.share = share
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + part.shape[0])
        if self.starts[-1] != subtrahend.shape[0]:
            raise ValueError(f"{self.starts[-1]} rows minus {subtrahend.shape[0]}")
        self.subtrahend = subtrahend
        self.shape = subtrahend.shape

    def dim(self) -> int:
        return 2

    def _slice(self, parts: list[Tensor], start: int, stop: int) -> Tensor:
        pieces = [
            part[max(start - first, 0) : stop - first]
            for part, first in zip(parts, self.starts, strict=False)
            if first < stop and first + part.shape[0] > start
        ]
        return torch.cat(pieces) if pieces else self.subtrahend[:0]

    def __getitem__(self, rows: slice) -> Tensor:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("RowDifference is read in contiguous row ranges")
        minuend = self._slice(self.parts, start, stop)
        if self.toward is not None:
            minuend = blend(minuend, self._slice(self.toward, start, stop), self.share)
        return torch.sub(minuend, self.subtrahend[start:stop])  # float32 by type promotion


def blend(start: Tensor, toward: Tensor, share: float) -> Tensor:
    """``start + share · (toward − start)`` in float32: the block output ``B*`` a SparseLLM
    FFN is fitted to, from ``B₀`` towards ``Bₘ`` (a new tensor; the operands are kept)."""
    start = start.float()
    return start + share * (toward.float() - start)


def _rows(batches: Sequence[Tensor]) -> list[Tensor]:
    return [t.reshape(-1, t.shape[-1]) for t in batches]


def check_finite(name: str, t: Tensor | RowDifference | None) -> None:
    """Raise :class:`NumericalError` naming ``name`` if ``t`` holds NaN or Inf."""
    if isinstance(t, RowDifference):
        step = 4096
        finite = all(torch.isfinite(t[i : i + step]).all() for i in range(0, t.shape[0], step))
    else:
        finite = t is None or bool(torch.isfinite(t).all())
    if not finite:
        raise NumericalError(f"{name} contains NaN or Inf")


def affine(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """``x Wᵀ + b`` for tokens as rows."""
    return x @ W.T if b is None else torch.addmm(b, x, W.T)


@dataclass(frozen=True)
class FFNProblem:
    """What one solve works on and never changes: data, dense weights, settings.

    ``X`` and ``Y`` stay where the caller keeps them (``store``) and are loaded a chunk of
    tokens at a time; the weights and biases are float32 on ``device``, where the work happens.
    """

    X: Tensor  # [N, d] FFN inputs, tokens as rows
    Y: Tensor | RowDifference  # [N, d] target FFN outputs, down bias included
    dense_up: Tensor  # W1 [f, d]
    dense_down: Tensor  # W2 [d, f]
    dense_gate: Tensor | None  # Wg [f, d], gated FFNs only
    up_bias: Tensor | None  # b1 [f]
    down_bias: Tensor | None  # b2 [d]
    gate_bias: Tensor | None  # bg [f]
    act: Activation
    targets: dict[str, SparsityTarget]  # by matrix: "up", "down" (and "gate")
    device: torch.device
    chunks: list[tuple[int, int]]  # token ranges of one pass over the data
    hidden_blocks: list[tuple[int, int]]  # Gram blocks over the f hidden features
    dampening: float
    blocksize: int
    reduce: ReduceFn | None
    ranks: SharedSolves | None = None  # None: this process solves every weight itself
    weight_solver: str = "sparsegpt"  # each weight step's support: "sparsegpt" or "admm"
    admm_iterations: int = 60  # at most, per ADMM support solve
    # Pull of every weight step towards the dense weight: λ = ridge · mean ‖input row‖²
    # (:func:`.weights.ridge_strength`); 0: none, the plain objective.
    ridge: float = 0.0
    # What the support solver derived from the input Gram XᵀX (every up/gate step's).
    input_memo: dict = field(default_factory=dict)
    # [N] each token's weight in every Gram, cross sum and error of the solve (None: all 1),
    # on the store. The per-element steps (p, z, s) solve each token alone, so a weight,
    # which scales all of a token's terms, leaves them unchanged; the history's term sums
    # (up, gate, act, q) stay plain sums (they only report).
    token_weights: Tensor | None = None

    @property
    def gated(self) -> bool:
        """Whether the FFN has a gate projection."""
        return self.dense_gate is not None

    @property
    def store(self) -> torch.device:
        """Where X, Y and the auxiliaries z, s live."""
        return self.X.device

    def store_empty(self, width: int) -> Tensor:
        """An uninitialised float32 ``[N, width]`` tensor on the store (pinned host memory
        when the work happens on CUDA)."""
        shape = (self.X.shape[0], width)
        if self.store.type == "cpu":
            return host_empty(shape, torch.float32, self.device)
        return torch.empty(shape, dtype=torch.float32, device=self.store)

    def all_sum(self, *sums: Tensor) -> None:
        """Sum token sums in place over every process holding tokens (no-op when alone)."""
        if self.reduce is not None:
            for t in sums:
                self.reduce(t)

    def load(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Tokens ``start:stop`` as float32 on the work device: ``X`` rows and ``T = Y − b2``."""
        rows = self.X[start:stop].to(self.device, torch.float32, non_blocking=True)
        target = self.Y[start:stop].to(self.device, torch.float32, non_blocking=True)
        if self.down_bias is not None:
            target = target - self.down_bias
        return rows, target

    def weights(self, start: int, stop: int) -> tuple[Tensor | None, Tensor | None]:
        """Tokens ``start:stop``'s weights ``w`` and their square roots as float32 ``[rows, 1]``
        columns (None, None: all 1): ``Σ w uᵀu`` is the Gram of the rows times ``√w``."""
        if self.token_weights is None:
            return None, None
        w = self.token_weights[start:stop, None].to(self.device, torch.float32)
        return w, w.sqrt()

    def forward_hidden(
        self, rows: Tensor, up: Tensor, gate: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The true hidden activation ``σ(n, m)`` with the given weights, and ``m``, ``n``."""
        m = affine(rows, up, self.up_bias)
        n = affine(rows, gate, self.gate_bias) if self.gated else None
        return ffn_hidden(self.act.fn, n, m), m, n


@dataclass(frozen=True)
class Penalties:
    """The weights α_z, α_s, β, γ of the objective's terms (see the module docstring)."""

    alpha_up: float
    alpha_gate: float | None  # None for plain FFNs
    beta: float
    gamma: float

    @classmethod
    def resolve(
        cls,
        alpha: float | None,
        beta: float | None,
        gamma: float | None,
        scales: dict[str, float],
        gated: bool,
    ) -> Penalties:
        """Given values as they are; ``None`` divides by the term's dense squared norm."""

        def auto(given: float | None, weight: float, scale: float) -> float:
            return given if given is not None else weight / (scale if scale > 0 else 1.0)

        return cls(
            alpha_up=auto(alpha, _AUTO_ALPHA, scales["up"]),
            alpha_gate=auto(alpha, _AUTO_ALPHA, scales["gate"]) if gated else None,
            beta=auto(beta, _AUTO_BETA, scales["target"]),
            gamma=auto(gamma, _AUTO_GAMMA, scales["act"]),
        )

    @property
    def up_ratio(self) -> float:
        """α_z/γ: the per-element z problems depend only on this ratio."""
        return self.alpha_up / self.gamma

    @property
    def gate_ratio(self) -> float:
        """α_s/γ (0 for plain FFNs)."""
        return self.alpha_gate / self.gamma if self.alpha_gate is not None else 0.0

    @property
    def p_ratio(self) -> float:
        """γ/β, the shift of the p-update's d × d system."""
        return self.gamma / self.beta


@dataclass
class DensePass:
    """What the init pass learns with the dense weights (see :func:`.stages.dense_pass`)."""

    tokens: int  # over every rank
    input_gram: Tensor  # H = XᵀX [d, d]
    input_sum: Tensor  # column sums of X [d]
    down_gram: Tensor  # a₀ᵀa₀ over a strided token sample [f, f]
    down_cross: Tensor  # Tᵀa₀ over the same sample [d, f]
    stride: int  # of that sample
    scales: dict[str, float] = field(default_factory=dict)  # squared norms, DENSE_SCALES


@dataclass
class FFNState:
    """The iterate of the block-coordinate descent, which every stage reads and updates."""

    up: Tensor  # W1 now in use
    gate: Tensor | None  # Wg now in use
    down: Tensor  # W2 now in use
    # [N, f] auxiliary up / gate pre-activations on the store; None while they are the dense
    # pre-activations m₀, n₀, which the first epoch recomputes from X rather than storing.
    z: Tensor | None
    s: Tensor | None
    input_gram: Tensor  # H = XᵀX
    solve_gram: Tensor  # H + λ_in·I, the Gram of every up/gate solve (H itself without ridge)
    input_gram_inverse: Tensor  # its damped inverse, computed once
    input_sum: Tensor  # column sums of X: fold the biases into the cross-products
    penalties: Penalties
    target_sq: float  # ‖T‖² = ‖Y − b2‖²
    output_sq: float  # ‖Y‖² (1 when Y = 0): denominator of every output_error
    tokens: int  # over every rank
    # λ of the ridges (``FFNProblem.ridge``), fixed for the whole solve: of the up/gate
    # steps (the solve Gram's shift) and of the down steps
    input_ridge: float = 0.0
    down_ridge: float = 0.0

    def down_ridge_term(self, dense_down: Tensor) -> float:
        """``λ‖W2 − W2_dense‖²`` of the down weight now (0 without ridge)."""
        if self.down_ridge <= 0:
            return 0.0
        return self.down_ridge * float((self.down - dense_down).to(torch.float64).square().sum())


@dataclass
class SolveLog:
    """What the solver tells its caller: ``history``, ``info`` and progress callbacks."""

    progress: ProgressFn | None
    started: float = field(default_factory=time.perf_counter)
    history: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(
        default_factory=lambda: {"choices": [], "damping_retries": 0, "seconds": {}}
    )

    def report(self, stage: str, **extra: Any) -> None:
        """Call the progress callback with the stage, the elapsed seconds and ``extra``."""
        if self.progress is not None:
            self.progress({"stage": stage, "elapsed": time.perf_counter() - self.started, **extra})

    def timed(self, stage: str, since: float) -> None:
        """Record the seconds ``stage`` took, counted from ``since``."""
        self.info["seconds"][stage] = time.perf_counter() - since
