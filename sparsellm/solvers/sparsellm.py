"""SparseLLM for one feed-forward block: up, gate and down pruned jointly through auxiliaries.

Tokens are rows: ``X``, ``Y`` are ``[N, d]``; the auxiliaries ``z`` (up pre-activation), ``s``
(gate pre-activation, gated FFNs only) and ``p`` (input of the down projection) are ``[N, f]``.
With ``m = X W1ᵀ + b1``, ``n = X Wgᵀ + bg``, ``T = Y − b2`` and ``σ(s, z) = act(z)`` (plain FFN)
or ``act(s) ⊙ z`` (gated FFN) the solver minimises

    α_z‖z − m‖² + α_s‖s − n‖² + γ‖p − σ(s, z)‖² + β‖p W2ᵀ − T‖²

over sparse W1, Wg, W2 and free z, s, p by block-coordinate descent. Biases stay fixed.

Schedule (``E = epochs``)
    init      one pass with the dense weights: z, s := dense pre-activations, so with
              ``p := σ(s, z)`` every term is 0; ``H = XᵀX``; term scales. W1, Wg, W2 := sparse
              LS fits of that state (SparseGPT on dense inputs, plus the CG refit below).
    epoch k   one pass: true output error of the current weights; p (exact), then z, s per
              element; Grams of the new auxiliaries. Then W1, Wg (and W2 unless k = E) re-solved.
    final     one pass with the final W1, Wg: the true activation ``a = σ(n, m)`` (what the
              network computes); W2 re-solved on ``a`` against ``T`` (what is returned).

Every step from the initial pruning to the end of the last epoch is an exact minimiser or
safeguarded, so ``history[k]["total"]`` never increases (up to float rounding):
  * p: ``(βW2ᵀW2 + γI) p = βW2ᵀT + γσ``, solved by Woodbury as
    ``p = σ + q W2`` with ``q = (T − σW2ᵀ)(W2W2ᵀ + (γ/β)I)⁻¹``: one d × d system for all tokens,
    and the new down residual is ``p W2ᵀ − T = −(γ/β)·q``, so the β term costs nothing extra.
  * z: ReLU compares its two branches in closed form; gated FFNs have
    ``z = (α_z m + γ g p) / (α_z + γ g²)`` with ``g = act(s)``; other activations (GELU) take a
    safeguarded Gauss–Newton step per epoch (below).
  * s: z exact, one safeguarded Gauss–Newton step on s, z exact again (coordinate descent).
    Gauss–Newton curvature ``α + γ(z·act')²`` is positive, so the step is a descent direction;
    each element takes it only if its own objective does not increase (NaN trials never do).
    Warm-started from the previous epoch, one step per epoch keeps tracking the minimiser.
  * W: ``min ‖A Wᵀ − T‖²`` is a quadratic ``q(W) = ⟨W, W H⟩ − 2⟨W, C⟩ + ‖T‖²`` in the Grams
    ``H = AᵀA``, ``C = TᵀA``. Candidate 1: the dense LS solution (damped, refined from the dense
    weight so directions the data does not see keep their original value) pruned by one OBS
    sweep (:func:`obs_prune`), then masked Jacobi-preconditioned CG on that mask (the OBS sweep
    never revisits early columns; the refit removes a third of its error on real LLM blocks).
    Candidate 2: the current sparse weight, CG-refined on its own mask. The lower ``q`` wins,
    compared from the Grams as ``⟨A − B, (A + B)H − 2C⟩``; the current weight is kept if neither
    is lower. OBS alone is not a minimiser, so this is what makes the weight step monotone.

Automatic penalty scaling (``alpha``/``beta``/``gamma`` = None): each term is divided by the
squared norm of its quantity in the dense model, ``α_z = 1/‖m₀‖²``, ``α_s = 1/‖n₀‖²``,
``γ = 1/‖σ(n₀, m₀)‖²``, ``β = 1/‖T‖²``. Every term is then a relative error, the objective is
invariant to the scale of X, of each weight and of the activations (the reference's 0.1 vs 5.0
is exactly such a scale), and the relative weights of the terms are 1 (``_AUTO_*``; results on
SmolLM2 blocks change by < 3 % over a 10× range of each). Explicit values are used as given.

Cost: each pass is a few ``N·d·f`` matmuls, plus one ``N·f²`` Gram (upper block triangle only)
in the final pass and in non-final epochs; the init pass samples ``_INIT_DOWN_TOKENS`` tokens
for the Gram of its down solve, which only steers the first p-update. Tokens are processed in
chunks of ``chunk_size``; z and s live on X's device; only d × d, f × f and f × d matrices are
held whole; the damped inverse of ``XᵀX`` is computed once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sparsellm.linalg import add_gram_upper, gram_blocks, mirror_upper
from sparsellm.masks import SparsityTarget, is_valid_nm, prune_counts
from sparsellm.solvers.base import NumericalError
from sparsellm.solvers.sparsegpt import obs_prune

# Relative weights of the dimensionless terms under automatic scaling.
_AUTO_ALPHA = 1.0
_AUTO_BETA = 1.0
_AUTO_GAMMA = 1.0
# Per-element safeguarded Newton steps for s (gated) or z (smooth non-gated) per epoch;
# warm-started from the previous epoch, one step per epoch keeps tracking the minimiser.
_NEWTON_STEPS = 1
# Masked conjugate-gradient iterations after each OBS sweep (and on the kept weight). The
# final down fit (the one returned) gets more; the first down solve, which only steers the
# first p-update, gets none (no measurable effect on the final error).
_CG_ITERS = 8
_CG_ITERS_FINAL = 16
_CG_ITERS_INIT_DOWN = 0
# Iterative-refinement steps of the damped dense LS solution (removes most damping bias).
_LS_REFINE = 2
# Elements per elementwise work block: keeps a dozen temporaries inside the CPU caches.
_ELEMENTWISE_BLOCK = 1 << 18
# Tokens sampled (strided) for the Gram of the first down solve.
_INIT_DOWN_TOKENS = 4096

ActivationLike = Callable[[Tensor], Tensor] | str
ProgressFn = Callable[[dict[str, Any]], None]
# Sums a tensor in place over the processes sharing the tokens (torch.distributed all-reduce).
ReduceFn = Callable[[Tensor], Tensor]


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
    ``"obs"``, ``"kept+cg"`` or ``"kept"``), damping retries and seconds per stage.
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


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class _Activation:
    name: str
    fn: Callable[[Tensor], Tensor]
    derivs: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]  # value, first, second derivative


def _relu_derivs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.relu(x), (x > 0).to(x.dtype), torch.zeros_like(x)


def _silu_derivs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    sig = torch.sigmoid(x)
    comp = 1.0 - sig
    f = x * sig
    f1 = sig + f * comp  # σ(1 + x(1 − σ))
    f2 = (sig * comp).mul_((comp - sig).mul_(x).add_(2.0))  # σ(1 − σ)(2 + x(1 − 2σ))
    return f, f1, f2


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_TANH_K = 0.044715


def _gelu_derivs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x2 = x * x
    cdf = torch.erf(x * _INV_SQRT2).add_(1.0).mul_(0.5)
    pdf = torch.exp(x2 * -0.5).mul_(_INV_SQRT_2PI)
    return x * cdf, cdf + x * pdf, pdf * (2.0 - x2)


def _gelu_tanh(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _gelu_tanh_derivs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # f = x(1 + t)/2 with t = tanh(u), u = c(x + k x³)
    x2 = x * x
    t = torch.tanh(x2.mul(_TANH_K).add_(1.0).mul_(x).mul_(_TANH_C))
    sech2 = 1.0 - t * t
    du = x2.mul(3.0 * _TANH_C * _TANH_K).add_(_TANH_C)
    d2u = x * (6.0 * _TANH_C * _TANH_K)
    f1 = 0.5 * (1.0 + t) + 0.5 * x * sech2 * du
    f2 = sech2 * (du + 0.5 * x * (d2u - 2.0 * t * du * du))
    return 0.5 * x * (1.0 + t), f1, f2


def _autograd_derivs(
    fn: Callable[[Tensor], Tensor],
) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    def derivs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            y = fn(xr)
            (g1,) = torch.autograd.grad(y.sum(), xr, create_graph=True)
            g2 = None
            if g1.requires_grad:  # piecewise-linear functions have no second derivative graph
                (g2,) = torch.autograd.grad(g1.sum(), xr, allow_unused=True)
        g2 = torch.zeros_like(x) if g2 is None else g2.detach()
        return y.detach(), g1.detach(), g2

    return derivs


_BUILTIN = {
    "relu": _Activation("relu", torch.relu, _relu_derivs),
    "silu": _Activation("silu", torch.nn.functional.silu, _silu_derivs),
    "gelu": _Activation("gelu", torch.nn.functional.gelu, _gelu_derivs),
    "gelu_tanh": _Activation("gelu_tanh", _gelu_tanh, _gelu_tanh_derivs),
}
_ALIASES = {
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


def _resolve_activation(activation: ActivationLike) -> _Activation:
    F = torch.nn.functional
    if isinstance(activation, str):
        key = _ALIASES.get(activation.strip().lower())
        if key is None:
            raise ValueError(
                f"unknown activation {activation!r}; use one of {sorted(_ALIASES)} or a callable"
            )
        return _BUILTIN[key]
    if isinstance(activation, torch.nn.ReLU) or activation in (torch.relu, F.relu):
        return _BUILTIN["relu"]
    if isinstance(activation, torch.nn.SiLU) or activation is F.silu:
        return _BUILTIN["silu"]
    if isinstance(activation, torch.nn.GELU):
        return _BUILTIN["gelu_tanh" if activation.approximate == "tanh" else "gelu"]
    if activation is F.gelu:
        return _BUILTIN["gelu"]
    if callable(activation):
        # Must be elementwise; derivatives come from autograd (slower than the built-ins).
        return _Activation(
            getattr(activation, "__name__", "custom"), activation, _autograd_derivs(activation)
        )
    raise TypeError(f"activation must be a name or a callable, not {type(activation).__name__}")


# --------------------------------------------------------------------------- weight step


def _sq_norm(x: Tensor) -> Tensor:
    """Squared Frobenius norm as a float64 scalar (one fused reduction, no temporary)."""
    return torch.linalg.vector_norm(x).to(torch.float64).square()


def _damped_inverse(H: Tensor, dampening: float) -> Tensor:
    """``(H + λ·mean(diag H)·I)⁻¹`` in float64, damping raised tenfold on a failed Cholesky."""
    H64 = H.to(torch.float64)
    mean = H64.diagonal().mean()
    if not mean > 0:
        mean = torch.ones((), dtype=H64.dtype, device=H64.device)
    eye = torch.eye(H.shape[0], dtype=H64.dtype, device=H64.device)
    fraction = dampening if dampening > 0 else 1e-8
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H64 + fraction * mean * eye)
        if info == 0:
            return torch.cholesky_inverse(L)
        fraction *= 10
    raise NumericalError(f"Gram matrix not positive definite even with damping {fraction:g}")


def _anchored_ls(anchor: Tensor, H: Tensor, C: Tensor, inverse: Tensor) -> Tensor:
    """Dense solution of ``W H = C``: damped, refined from the dense weight.

    Starting from the dense weight (not from 0) and refining leaves the null space of H at the
    original weights: those directions do not change the calibration output, and the original
    value is the safest guess for other inputs. ``inverse`` is the damped inverse of H.
    """
    W = anchor.clone()
    for _ in range(_LS_REFINE):
        W.addmm_(torch.addmm(C, W, H, alpha=-1.0), inverse)
    return W


def _quad_diffs(
    cands: list[Tensor], refs: list[Tensor], H: Tensor, Cs: list[Tensor]
) -> list[float]:
    """``q(A) − q(B)`` for each pair, ``q(W) = ⟨W, W H⟩ − 2⟨W, C⟩`` (one matmul for all).

    Written as ``⟨A − B, (A + B) H − 2C⟩`` so the large common part cancels before rounding.
    """
    G = torch.addmm(
        torch.cat(Cs), torch.cat([a + b for a, b in zip(cands, refs, strict=True)]), H, beta=-2.0
    )
    out, row = [], 0
    for a, b in zip(cands, refs, strict=True):
        g = G[row : row + a.shape[0]]
        row += a.shape[0]
        out.append(float(((a - b).to(torch.float64) * g.to(torch.float64)).sum()))
    return out


def _quad_value(W: Tensor, H: Tensor, C: Tensor, const: float) -> float:
    """``‖A Wᵀ − T‖² = ⟨W, W H⟩ − 2⟨W, C⟩ + ‖T‖²`` from the Grams (clamped at 0)."""
    WH = (W @ H).to(torch.float64)
    W64 = W.to(torch.float64)
    return max(float((W64 * WH).sum() - 2.0 * (W64 * C.to(torch.float64)).sum()) + const, 0.0)


def _masked_pcg(W: Tensor, keep: Tensor, H: Tensor, C: Tensor, iters: int) -> Tensor:
    """Jacobi-preconditioned CG on ``min q(W)`` with W's support fixed, every row at once.

    Rows are independent problems sharing H, so each row carries its own CG scalars.
    """
    W = W.clone()
    if iters <= 0:
        return W
    keepf = keep.to(W.dtype)
    diag = H.diagonal()
    dinv = 1.0 / diag.clamp_min(float(diag.max()) * 1e-12 + 1e-30)
    R = torch.addmm(C, W, H, alpha=-1.0).mul_(keepf)
    Z = R * dinv
    P = Z.clone()
    rz = (R * Z).sum(1, keepdim=True)
    for _ in range(iters):
        HP = (P @ H).mul_(keepf)
        pHp = (P * HP).sum(1, keepdim=True)
        a = torch.where(pHp > 0, rz / pHp.clamp_min(1e-30), torch.zeros_like(pHp))
        W.addcmul_(a, P)
        R.addcmul_(a, HP, value=-1.0)
        Z = R * dinv
        rz_new = (R * Z).sum(1, keepdim=True)
        b = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        P = Z.addcmul_(b, P)
        rz = rz_new
    return W


@dataclass
class _Step:
    weight: Tensor
    delta: float  # q(new) − q(current) from the Grams (≤ 0 when current was feasible)
    choice: str
    retries: int = 0


@dataclass
class _Problem:
    """One ``min q(W)`` sharing its Gram H with the others of a batch."""

    name: str
    anchor: Tensor  # dense original weight
    current: Tensor  # weight now in use
    C: Tensor
    feasible: bool  # current already meets the target (False only for the dense start)


def _sparse_ls_steps(
    H: Tensor,
    problems: list[_Problem],
    target: SparsityTarget,
    *,
    inverse: Tensor,
    dampening: float,
    blocksize: int,
    cg_iters: int,
) -> list[_Step]:
    """Safeguarded sparse least-squares solves sharing H (see the module docstring).

    Candidates: OBS on the anchored dense solution, and the current weight if feasible; both
    CG-refined on their masks in one stacked CG run (rows are independent problems).
    """
    cands, refs, Cs, owners, retries = [], [], [], [], {}
    for k, pb in enumerate(problems):
        dense = _anchored_ls(pb.anchor, H, pb.C, inverse)
        res = obs_prune(dense, H, target, blocksize=blocksize, dampening=dampening)
        if not torch.isfinite(res.weight).all():
            raise NumericalError(f"OBS sweep of {pb.name} produced non-finite weights")
        retries[k] = res.damping_retries
        for start in (res.weight, pb.current) if pb.feasible else (res.weight,):
            cands.append(start)
            refs.append(pb.current)
            Cs.append(pb.C)
            owners.append(k)
    stacked = torch.cat(cands)
    refined = _masked_pcg(stacked, stacked != 0, H, torch.cat(Cs), cg_iters)
    refined = list(refined.split([c.shape[0] for c in cands]))
    deltas = _quad_diffs(refined, refs, H, Cs)
    steps = []
    for k, pb in enumerate(problems):
        mine = [(d, w) for d, w, o in zip(deltas, refined, owners, strict=True) if o == k]
        options = [
            (d if math.isfinite(d) else math.inf, w, label)
            for (d, w), label in zip(mine, ("obs", "kept+cg"), strict=False)
        ]
        if pb.feasible:
            options.append((0.0, pb.current.clone(), "kept"))
        delta, weight, choice = min(options, key=lambda t: t[0])
        if not math.isfinite(delta):
            raise NumericalError(f"sparse solve of {pb.name} produced non-finite objective")
        steps.append(_Step(weight.contiguous(), delta, choice, retries[k]))
    return steps


# --------------------------------------------------------------------------- per-element steps


def _p_system(W2: Tensor, c: float) -> Tensor:
    """``(W2 W2ᵀ + c I)⁻¹`` (d × d, float32) for the Woodbury form of the p-update, c = γ/β."""
    K = (W2 @ W2.T).to(torch.float64)
    K.diagonal().add_(c)
    L, failed = torch.linalg.cholesky_ex(K)
    if failed:
        raise NumericalError("p-update system W2W2ᵀ + (γ/β)I is not positive definite")
    return torch.cholesky_inverse(L).to(torch.float32)


def _p_update(sig: Tensor, T: Tensor, W2: Tensor, Kinv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact ``argmin_p γ‖p − σ‖² + β‖p W2ᵀ − T‖²`` for a block of tokens (rows).

    ``(βW2ᵀW2 + γI)⁻¹ = (I − W2ᵀ K⁻¹ W2)/γ`` with ``K = W2W2ᵀ + (γ/β)I`` turns the f × f system
    into ``p = σ + q W2``, ``q = (T − σW2ᵀ) K⁻¹``. Returns p, q and ‖T − σW2ᵀ‖² (float64).
    """
    r = torch.addmm(T, sig, W2.T, alpha=-1.0)
    q = r @ Kinv
    return torch.addmm(sig, q, W2), q, _sq_norm(r)


def _relu_branches(c: Tensor, w: float, p: Tensor, k: Tensor | None) -> Tensor:
    """Exact ``argmin_x w(x − c)² + (p − k·relu(x))²`` (k = 1 when None): best of both branches."""
    if k is None:
        pos = ((w * c + p) / (w + 1.0)).clamp_min_(0.0)
        pos_res = p - pos
    else:
        pos = ((w * c + k * p) / (w + k * k)).clamp_min_(0.0)
        pos_res = p - k * pos
    neg = c.clamp_max(0.0)
    phi_pos = w * (pos - c).square_() + pos_res.square_()
    phi_neg = w * (neg - c).square_() + p * p
    return torch.where(phi_pos <= phi_neg, pos, neg)


def _newton_step(
    x: Tensor,
    fx: tuple[Tensor, Tensor, Tensor],
    act: _Activation,
    c: Tensor,
    w: float,
    p: Tensor,
    k: Tensor | None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One safeguarded Newton step on ``φ(x) = w(x − c)² + (p − k·act(x))²`` per element.

    ``fx`` = act, act', act'' at x; ``k`` = None means k = 1. The curvature is Newton's, floored
    at half the Gauss–Newton value ``w + (k·act')²`` (> 0), so the step always points downhill
    and is Newton's near a minimum. The full and a quarter step are tried; each element takes
    the lower trial if it is not above its current φ, else keeps x (a NaN trial never is).
    Where φ is concave (plateaus between two basins) progress is slow but still monotone.
    Returns the new x and act, act', act'' there.
    """

    def evaluate(v: Tensor, fv: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        e = p - fv[0] if k is None else p - k * fv[0]
        return e, (v - c).square_().mul_(w).addcmul_(e, e)

    e, phi = evaluate(x, fx)
    j = fx[1] if k is None else k * fx[1]
    gn = j.square().add_(w)
    curvature = fx[2] * e if k is None else k * fx[2] * e
    h = torch.maximum(gn - curvature, gn.mul(0.5))
    step = (x - c).mul_(w).addcmul_(j, e, value=-1.0).div_(h)
    full = x - step
    # Second trial: a quarter step, for where the quadratic model overshoots.
    other = step.mul_(-0.25).add_(x)
    f_full, f_other = act.derivs(full), act.derivs(other)
    phi_full = evaluate(full, f_full)[1]
    phi_other = evaluate(other, f_other)[1]
    take_full = (phi_full <= phi) & (phi_full <= phi_other)
    take_other = (phi_other <= phi) & ~take_full

    def pick(a: Tensor, b: Tensor, current: Tensor) -> Tensor:
        return torch.where(take_full, a, torch.where(take_other, b, current))

    new_x = pick(full, other, x)
    return new_x, tuple(pick(a, b, cur) for a, b, cur in zip(f_full, f_other, fx, strict=True))


def _z_given_gate(m: Tensor, g: Tensor, p: Tensor, a_z: float) -> Tensor:
    return (a_z * m + g * p) / (a_z + g * g)


def _update_aux(
    act: _Activation,
    gated: bool,
    a_z: float,
    a_s: float,
    m: Tensor,
    n: Tensor | None,
    z: Tensor,
    s: Tensor | None,
    p: Tensor,
    g: Tensor | None,
    sums: Tensor,
) -> None:
    """Update z (and s) in place for a block of tokens given the new p; add the term sums.

    ``a_z``, ``a_s`` are α/γ: the per-element problems only depend on these ratios. ``g`` is
    act(s) before the update (gated only). ``sums`` (float64) gets ‖z − m‖², ‖s − n‖² and
    ‖p − σ(s, z)‖² of the updated values.
    """
    rows, width = z.shape
    step = max(1, _ELEMENTWISE_BLOCK // max(width, 1))
    for r0 in range(0, rows, step):
        sl = slice(r0, r0 + step)
        mr, pr, zr = m[sl], p[sl], z[sl]
        if gated:
            nr, sr = n[sl], s[sl]
            zr.copy_(_z_given_gate(mr, g[sl], pr, a_z))
            if act.name == "relu":
                sr.copy_(_relu_branches(nr, a_s, pr, zr))
                gr = torch.relu(sr)
            else:
                x, fx = sr, act.derivs(sr)
                for _ in range(_NEWTON_STEPS):
                    x, fx = _newton_step(x, fx, act, nr, a_s, pr, zr)
                sr.copy_(x)
                gr = fx[0]
            zr.copy_(_z_given_gate(mr, gr, pr, a_z))
            sums[1] += torch.dist(sr, nr).square().to(torch.float64)
            sums[2] += torch.dist(pr, gr.mul_(zr)).square().to(torch.float64)
        else:
            if act.name == "relu":
                zr.copy_(_relu_branches(mr, a_z, pr, None))
                value = torch.relu(zr)
            else:
                x, fx = zr, act.derivs(zr)
                for _ in range(_NEWTON_STEPS):
                    x, fx = _newton_step(x, fx, act, mr, a_z, pr, None)
                zr.copy_(x)
                value = fx[0]
            sums[2] += torch.dist(pr, value).square().to(torch.float64)
        sums[0] += torch.dist(zr, mr).square().to(torch.float64)


# --------------------------------------------------------------------------- the solver


def _affine(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    return x @ W.T if b is None else torch.addmm(b, x, W.T)


def _check_finite(name: str, t: Tensor | None) -> None:
    if t is not None and not torch.isfinite(t).all():
        raise NumericalError(f"{name} contains NaN or Inf")


def _check_sparsity(name: str, W: Tensor, target: SparsityTarget) -> None:
    if target.is_nm:
        ok = is_valid_nm(W, target.n, target.m)
    else:
        ok = int((W == 0).sum()) >= int(prune_counts([W.numel()], target.sparsity)[0])
    if not ok:
        raise RuntimeError(f"{name} misses the sparsity target {target} (solver bug)")


def sparsellm_ffn(
    X: Tensor,
    Y: Tensor,
    up: Tensor,
    up_bias: Tensor | None,
    down: Tensor,
    down_bias: Tensor | None,
    target: SparsityTarget,
    *,
    gate: Tensor | None = None,
    gate_bias: Tensor | None = None,
    activation: ActivationLike,
    epochs: int = 1,
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    chunk_size: int = 2048,
    device: torch.device | str | None = None,
    dampening: float = 0.01,
    blocksize: int = 128,
    progress: ProgressFn | None = None,
    reduce: ReduceFn | None = None,
) -> FFNSolveResult:
    """Prune a feed-forward block's up (and gate) and down projections jointly (SparseLLM).

    Args:
        X: ``[N, d]`` FFN inputs, tokens as rows, any float dtype (computed in float32).
        Y: ``[N, d]`` target FFN outputs (including the down bias), usually the dense output.
        up, up_bias: ``[f, d]``, ``[f]`` up projection W1 (the only input projection if plain).
        down, down_bias: ``[d, f]``, ``[d]`` down projection W2.
        target: sparsity (unstructured, exact count per matrix) or N:M for every weight.
        gate, gate_bias: ``[f, d]``, ``[f]`` gate projection of a gated FFN, whose activation is
            ``act(X Wgᵀ + bg) ⊙ (X W1ᵀ + b1)``; without it the FFN is ``act(X W1ᵀ + b1)``.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` (aliases ``gelu_new``,
            ``gelu_pytorch_tanh``), ``"silu"``, or an elementwise callable.
        epochs: alternation rounds after the initial pruning (0 = sequential SparseGPT with a
            final down-projection fit on the pruned activations).
        alpha, beta, gamma: penalties; ``None`` = automatic (each term divided by its dense scale).
        chunk_size: tokens per block of the passes over the data (bounds the temporaries).
        device: where to compute; z and s stay on X's device.
        dampening: Gram damping fraction of the mean diagonal (LS solves and OBS).
        blocksize: OBS column block.
        progress: called with a dict after each stage.
        reduce: for tokens sharded across processes: sums a tensor in place over all of them
            (an all-reduce). Every token sum (Grams, cross-products, norms) goes through it
            before it is used, so each process solves the problem of all tokens; ``X``/``Y``
            are then this process's rows. ``None``: all tokens are here.

    Returns:
        :class:`FFNSolveResult` with float32 weights on ``up``'s device.

    Raises:
        NumericalError: non-finite inputs or a solve that produced NaN/Inf.
    """
    started = time.perf_counter()
    act = _resolve_activation(activation)
    gated = gate is not None
    if X.dim() != 2 or Y.shape != X.shape:
        raise ValueError(f"X and Y must both be [N, d]; got {tuple(X.shape)}, {tuple(Y.shape)}")
    N, d = X.shape
    f = up.shape[0]
    if up.shape != (f, d) or down.shape != (d, f) or (gated and gate.shape != (f, d)):
        raise ValueError(
            f"weights do not match d={d}: up {tuple(up.shape)}, down {tuple(down.shape)}"
            + (f", gate {tuple(gate.shape)}" if gated else "")
        )
    for name, b, size in (
        ("up_bias", up_bias, f),
        ("gate_bias", gate_bias, f),
        ("down_bias", down_bias, d),
    ):
        if b is not None and b.shape != (size,):
            raise ValueError(f"{name} must have shape [{size}], got {tuple(b.shape)}")
    if gate_bias is not None and not gated:
        raise ValueError("gate_bias given without gate")
    if epochs < 0 or chunk_size < 1 or N < 1:
        raise ValueError("epochs must be >= 0, chunk_size >= 1 and X non-empty")
    for name, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v}")

    dev = torch.device(device) if device is not None else X.device

    def total(*sums: Tensor) -> None:
        if reduce is not None:
            for t in sums:
                reduce(t)

    store = X.device
    f32 = torch.float32
    for name, t in (
        ("X", X),
        ("Y", Y),
        ("up", up),
        ("down", down),
        ("gate", gate),
        ("up_bias", up_bias),
        ("down_bias", down_bias),
        ("gate_bias", gate_bias),
    ):
        _check_finite(name, t)

    def prep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(dev, f32)

    W1_0, W2_0, Wg_0 = prep(up), prep(down), prep(gate)
    b1, b2, bg = prep(up_bias), prep(down_bias), prep(gate_bias)
    chunks = [(i, min(i + chunk_size, N)) for i in range(0, N, chunk_size)]
    fblocks = gram_blocks(f)
    history: list[dict[str, Any]] = []
    info: dict[str, Any] = {"choices": [], "damping_retries": 0, "seconds": {}}

    def report(stage: str, **extra: Any) -> None:
        if progress is not None:
            progress({"stage": stage, "elapsed": time.perf_counter() - started, **extra})

    def load(i: int, j: int) -> tuple[Tensor, Tensor]:
        Xc = X[i:j].to(dev, f32, non_blocking=True)
        Tc = Y[i:j].to(dev, f32, non_blocking=True)
        if b2 is not None:
            Tc = Tc - b2
        return Xc, Tc

    def true_activation(
        Xc: Tensor, W1: Tensor, Wg: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        m = _affine(Xc, W1, b1)
        if gated:
            n = _affine(Xc, Wg, bg)
            return act.fn(n).mul_(m), m, n
        return act.fn(m), m, None

    # ---------------------------------------------------------------- init pass (dense)
    t0 = time.perf_counter()
    z = torch.empty(N, f, dtype=f32, device=store)
    s = torch.empty(N, f, dtype=f32, device=store) if gated else None
    H = torch.zeros(d, d, dtype=f32, device=dev)
    x_sum = torch.zeros(d, dtype=f32, device=dev)
    H2 = torch.zeros(f, f, dtype=f32, device=dev)
    C2 = torch.zeros(d, f, dtype=f32, device=dev)
    # The first down solve only steers the first p-update (the down weight that is returned
    # is refitted on the pruned activations at the end), so a strided token sample suffices
    # for its f × f Gram, the most expensive product of this pass.
    tokens_all = torch.tensor([float(N)], dtype=torch.float64, device=dev)
    total(tokens_all)
    stride = 1 if epochs == 0 else max(1, math.ceil(float(tokens_all) / _INIT_DOWN_TOKENS))
    # ‖m‖², ‖n‖², ‖a‖², ‖T‖², ‖Y‖², ‖T‖² of the sample
    scales = torch.zeros(6, dtype=torch.float64, device=dev)
    for i, j in chunks:
        Xc, Tc = load(i, j)
        H.addmm_(Xc.T, Xc)
        x_sum += Xc.sum(0)
        a, m, n = true_activation(Xc, W1_0, Wg_0)
        z[i:j] = m
        scales[0] += _sq_norm(m)
        if gated:
            s[i:j] = n
            scales[1] += _sq_norm(n)
        scales[2] += _sq_norm(a)
        scales[3] += _sq_norm(Tc)
        scales[4] += _sq_norm(Tc if b2 is None else Tc + b2)
        off = (-i) % stride
        add_gram_upper(H2, a[off::stride], fblocks)
        C2.addmm_(Tc[off::stride].T, a[off::stride])
        scales[5] += _sq_norm(Tc[off::stride])
    total(H, x_sum, H2, C2, scales)
    mirror_upper(H2, fblocks)
    sq_m, sq_n, sq_a, sq_t, sq_y = (float(v) for v in scales[:5])
    if not all(math.isfinite(v) for v in (sq_m, sq_n, sq_a, sq_t, sq_y)):
        raise NumericalError("dense forward pass overflowed (non-finite activations)")
    _check_finite("input Gram XᵀX", H)
    _check_finite("dense activation Gram", H2)
    y_norm = sq_y if sq_y > 0 else 1.0

    def auto(v: float | None, mult: float, scale: float) -> float:
        return v if v is not None else mult / (scale if scale > 0 else 1.0)

    alpha_z = auto(alpha, _AUTO_ALPHA, sq_m)
    alpha_s = auto(alpha, _AUTO_ALPHA, sq_n) if gated else None
    beta_ = auto(beta, _AUTO_BETA, sq_t)
    gamma_ = auto(gamma, _AUTO_GAMMA, sq_a)
    a_z = alpha_z / gamma_
    a_s = alpha_s / gamma_ if gated else 0.0
    c = gamma_ / beta_
    info["seconds"]["init_pass"] = time.perf_counter() - t0
    report("init")

    # ---------------------------------------------------------------- initial pruning
    def solve(
        Hm: Tensor,
        problems: list[_Problem],
        epoch: int,
        inverse: Tensor | None = None,
        cg_iters: int = _CG_ITERS,
    ) -> list[_Step]:
        if inverse is None:
            inverse = _damped_inverse(Hm, dampening).to(f32)
        steps = _sparse_ls_steps(
            Hm,
            problems,
            target,
            inverse=inverse,
            dampening=dampening,
            blocksize=blocksize,
            cg_iters=cg_iters,
        )
        for pb, step in zip(problems, steps, strict=True):
            _check_finite(f"{pb.name} after epoch {epoch}", step.weight)
            info["choices"].append((epoch, pb.name, step.choice))
            info["damping_retries"] += step.retries
        return steps

    def input_problems(C1: Tensor, Cg: Tensor | None, feasible: bool) -> list[_Problem]:
        out = [_Problem("up", W1_0, W1, C1, feasible)]
        if gated:
            out.append(_Problem("gate", Wg_0, Wg, Cg, feasible))
        return out

    t0 = time.perf_counter()
    # H = XᵀX never changes: its damped inverse serves every up/gate solve.
    H_inv = _damped_inverse(H, dampening).to(f32)
    # z, s are the dense pre-activations, so C = W_dense·H exactly: no pass needed.
    W1, Wg = W1_0, Wg_0
    steps = solve(
        H,
        input_problems(W1_0 @ H, Wg_0 @ H if gated else None, False),
        0,
        H_inv,
    )
    step1, stepg = steps[0], (steps[1] if gated else None)
    W1 = step1.weight
    Wg = stepg.weight if gated else None
    # ‖a₀W2ᵀ − T‖² (0 when Y is the dense output); with a token sample this is an estimate,
    # replaced by the exact figure during the first epoch's pass.
    dense_down = _quad_value(W2_0, H2, C2, float(scales[5])) * stride
    (step2,) = solve(H2, [_Problem("down", W2_0, W2_0, C2, False)], 0, cg_iters=_CG_ITERS_INIT_DOWN)
    W2 = step2.weight
    rec = {
        "epoch": 0,
        "up": alpha_z * max(step1.delta, 0.0),
        "gate": alpha_s * max(stepg.delta, 0.0) if gated else None,
        "act": 0.0,
        "down": beta_ * max(dense_down + step2.delta, 0.0),
    }
    rec["total"] = rec["up"] + (rec["gate"] or 0.0) + rec["act"] + rec["down"]
    history.append(rec)
    info["seconds"]["init_solve"] = time.perf_counter() - t0
    report("epoch", epoch=0, total=rec["total"])
    del H2, C2

    # ---------------------------------------------------------------- epochs
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        last = epoch == epochs
        Kinv = _p_system(W2, c)
        C1 = torch.zeros(f, d, dtype=f32, device=dev)
        Cg = torch.zeros(f, d, dtype=f32, device=dev) if gated else None
        if not last:
            H2 = torch.zeros(f, f, dtype=f32, device=dev)
            C2 = torch.zeros(d, f, dtype=f32, device=dev)
        # up, gate, act, ‖q‖², true error, down term before the p-update
        sums = torch.zeros(6, dtype=torch.float64, device=dev)
        for i, j in chunks:
            Xc, Tc = load(i, j)
            a, m, n = true_activation(Xc, W1, Wg)
            sums[4] += _sq_norm(torch.addmm(Tc, a, W2.T, alpha=1.0, beta=-1.0))
            del a
            zc = z[i:j].to(dev)
            sc = s[i:j].to(dev) if gated else None
            if gated:
                g = act.fn(sc)
                sig = g * zc
            else:
                g = None
                sig = act.fn(zc)
            p, q, r_sq = _p_update(sig, Tc, W2, Kinv)
            sums[3] += _sq_norm(q)
            sums[5] += r_sq
            del sig, q
            _update_aux(act, gated, a_z, a_s, m, n, zc, sc, p, g, sums)
            if zc.device != store:
                z[i:j] = zc
                if gated:
                    s[i:j] = sc
            C1.addmm_(zc.T, Xc)
            if gated:
                Cg.addmm_(sc.T, Xc)
            if not last:
                add_gram_upper(H2, p, fblocks)
                C2.addmm_(Tc.T, p)
        total(C1, sums, *([Cg] if gated else []), *([] if last else [H2, C2]))
        vals = [float(v) for v in sums]
        if not all(math.isfinite(v) for v in vals):
            raise NumericalError(f"auxiliary update of epoch {epoch} produced NaN/Inf")
        prev = history[-1]
        prev["output_error"] = vals[4] / y_norm
        if epoch == 1:  # exact down term of the initial state (the init pass may have sampled)
            prev["down"] = beta_ * vals[5]
            prev["total"] = prev["up"] + (prev["gate"] or 0.0) + prev["act"] + prev["down"]
        # C = (z − b)ᵀX, with the bias folded in through the column sums of X.
        if b1 is not None:
            C1.addr_(b1, x_sum, alpha=-1.0)
        if gated and bg is not None:
            Cg.addr_(bg, x_sum, alpha=-1.0)
        steps = solve(H, input_problems(C1, Cg, True), epoch, H_inv)
        step1, stepg = steps[0], (steps[1] if gated else None)
        W1 = step1.weight
        rec = {"epoch": epoch, "up": alpha_z * max(vals[0] + step1.delta, 0.0)}
        if gated:
            Wg = stepg.weight
            rec["gate"] = alpha_s * max(vals[1] + stepg.delta, 0.0)
        else:
            rec["gate"] = None
        rec["act"] = gamma_ * vals[2]
        down_sq = c * c * vals[3]  # residual of the new p is −(γ/β)·q
        if not last:
            mirror_upper(H2, fblocks)
            (step2,) = solve(H2, [_Problem("down", W2_0, W2, C2, True)], epoch)
            W2 = step2.weight
            down_sq += step2.delta
            del H2, C2
        rec["down"] = beta_ * max(down_sq, 0.0)
        rec["total"] = rec["up"] + (rec["gate"] or 0.0) + rec["act"] + rec["down"]
        history.append(rec)
        info["seconds"][f"epoch_{epoch}"] = time.perf_counter() - t0
        report("epoch", epoch=epoch, total=rec["total"])
        del C1, Cg

    # ---------------------------------------------------------------- final down fit
    t0 = time.perf_counter()
    Ha = torch.zeros(f, f, dtype=f32, device=dev)
    Ca = torch.zeros(d, f, dtype=f32, device=dev)
    for i, j in chunks:
        Xc, Tc = load(i, j)
        a, _, _ = true_activation(Xc, W1, Wg)
        add_gram_upper(Ha, a, fblocks)
        Ca.addmm_(Tc.T, a)
    total(Ha, Ca)
    mirror_upper(Ha, fblocks)
    _check_finite("activation Gram of the pruned up/gate", Ha)
    before = _quad_value(W2, Ha, Ca, sq_t)
    history[-1]["output_error"] = before / y_norm
    (step2,) = solve(
        Ha, [_Problem("down", W2_0, W2, Ca, True)], epochs + 1, cg_iters=_CG_ITERS_FINAL
    )
    W2 = step2.weight
    final_error = max(before + step2.delta, 0.0) / y_norm
    info["seconds"]["final"] = time.perf_counter() - t0
    info["seconds"]["total"] = time.perf_counter() - started
    info["output_error_denominator"] = "sum of squares of Y"
    report("final", output_error=final_error)

    _check_sparsity("up", W1, target)
    _check_sparsity("down", W2, target)
    if gated:
        _check_sparsity("gate", Wg, target)
    out_dev = up.device
    return FFNSolveResult(
        up=W1.to(out_dev),
        down=W2.to(out_dev),
        gate=Wg.to(out_dev) if gated else None,
        history=history,
        output_error=final_error,
        alpha_up=alpha_z,
        alpha_gate=alpha_s,
        beta=beta_,
        gamma=gamma_,
        info=info,
    )
