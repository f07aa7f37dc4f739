"""The auxiliary step: p exactly, then z and s per element, for one block of tokens.

With the weights fixed, the objective separates over tokens (p) and over elements (z, s):
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
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsellm.linalg import one_thread, sq_norm
from sparsellm.solvers.base import NumericalError
from sparsellm.solvers.sparsellm.activations import Activation
from sparsellm.solvers.sparsellm.state import NamedSums

# Per-element safeguarded Newton steps for s (gated) or z (smooth non-gated) per epoch;
# warm-started from the previous epoch, one step per epoch keeps tracking the minimiser.
_NEWTON_STEPS = 1
# Elements per elementwise work block: keeps a dozen temporaries inside the CPU caches.
_ELEMENTWISE_BLOCK = 1 << 18

Derivs = tuple[Tensor, Tensor, Tensor]  # act, act', act'' at the same points


def p_system(W2: Tensor, c: float) -> Tensor:
    """``(W2 W2ᵀ + c I)⁻¹`` (d × d, float32) for the Woodbury form of the p-update, c = γ/β."""
    # float64 on the CPU; float32 on accelerators (slow float64), where the shift c > 0 keeps
    # K well conditioned; a failed factorisation is retried in float64.
    work = torch.float64 if W2.device.type == "cpu" else torch.float32
    for dtype in dict.fromkeys((work, torch.float64)):
        K = (W2 @ W2.T).to(dtype)
        K.diagonal().add_(c)
        with one_thread(K.device):
            L, failed = torch.linalg.cholesky_ex(K)
            inverse = None if failed else torch.cholesky_inverse(L)
        if inverse is not None:
            return inverse.to(torch.float32)
    raise NumericalError("p-update system W2W2ᵀ + (γ/β)I is not positive definite")


def p_update(sig: Tensor, T: Tensor, W2: Tensor, Kinv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact ``argmin_p γ‖p − σ‖² + β‖p W2ᵀ − T‖²`` for a block of tokens (rows).

    ``(βW2ᵀW2 + γI)⁻¹ = (I − W2ᵀ K⁻¹ W2)/γ`` with ``K = W2W2ᵀ + (γ/β)I`` turns the f × f system
    into ``p = σ + q W2``, ``q = (T − σW2ᵀ) K⁻¹``. Returns p, q and ‖T − σW2ᵀ‖² (float64).
    """
    r = torch.addmm(T, sig, W2.T, alpha=-1.0)
    q = r @ Kinv
    return torch.addmm(sig, q, W2), q, sq_norm(r)


def relu_branches(c: Tensor, w: float, p: Tensor, k: Tensor | None) -> Tensor:
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


def newton_step(
    x: Tensor, fx: Derivs, act: Activation, c: Tensor, w: float, p: Tensor, k: Tensor | None
) -> tuple[Tensor, Derivs]:
    """One safeguarded Newton step on ``φ(x) = w(x − c)² + (p − k·act(x))²`` per element.

    ``fx`` = act, act', act'' at x; ``k`` = None means k = 1. The curvature is Newton's, floored
    at half the Gauss–Newton value ``w + (k·act')²`` (> 0), so the step always points downhill
    and is Newton's near a minimum. The full and a quarter step are tried; each element takes
    the lower trial if it is not above its current φ, else keeps x (a NaN trial never is).
    Where φ is concave (plateaus between two basins) progress is slow but still monotone.
    Returns the new x and act, act', act'' there.
    """

    def evaluate(v: Tensor, fv: Derivs) -> tuple[Tensor, Tensor]:
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


def z_given_gate(m: Tensor, g: Tensor, p: Tensor, a_z: float) -> Tensor:
    """Exact ``argmin_z a_z(z − m)² + (p − g·z)²`` for a fixed gate value ``g = act(s)``."""
    return (a_z * m + g * p) / (a_z + g * g)


def _smooth_minimiser(
    x: Tensor, act: Activation, c: Tensor, w: float, p: Tensor, k: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``_NEWTON_STEPS`` safeguarded Newton steps from x; the new x and act there."""
    fx = act.derivs(x)
    for _ in range(_NEWTON_STEPS):
        x, fx = newton_step(x, fx, act, c, w, p, k)
    return x, fx[0]


def _minimise_in_place(
    x: Tensor, act: Activation, c: Tensor, w: float, p: Tensor, k: Tensor | None
) -> Tensor:
    """``x := argmin w(x − c)² + (p − k·act(x))²`` per element (k = 1 when None): exact for
    ReLU, safeguarded Newton otherwise. Returns ``act(x)`` at the new x."""
    if act.name == "relu":
        x.copy_(relu_branches(c, w, p, k))
        return torch.relu(x)
    new_x, value = _smooth_minimiser(x, act, c, w, p, k)
    x.copy_(new_x)
    return value


def _update_gated(
    act: Activation,
    a_z: float,
    a_s: float,
    m: Tensor,
    n: Tensor,
    z: Tensor,
    s: Tensor,
    p: Tensor,
    g: Tensor,
    sums: NamedSums,
) -> None:
    """z exact for the old gate, s one step (exact for ReLU), z exact again; in place."""
    z.copy_(z_given_gate(m, g, p, a_z))
    gate_value = _minimise_in_place(s, act, n, a_s, p, z)
    z.copy_(z_given_gate(m, gate_value, p, a_z))
    sums.add("gate", torch.dist(s, n).square().to(torch.float64))
    sums.add("act", torch.dist(p, gate_value.mul_(z)).square().to(torch.float64))
    sums.add("up", torch.dist(z, m).square().to(torch.float64))


def _update_plain(
    act: Activation, a_z: float, m: Tensor, z: Tensor, p: Tensor, sums: NamedSums
) -> None:
    """z exact (ReLU) or one safeguarded Newton step (smooth activations); in place."""
    value = _minimise_in_place(z, act, m, a_z, p, None)
    sums.add("act", torch.dist(p, value).square().to(torch.float64))
    sums.add("up", torch.dist(z, m).square().to(torch.float64))


def update_auxiliaries(
    act: Activation,
    a_z: float,
    a_s: float,
    m: Tensor,
    n: Tensor | None,
    z: Tensor,
    s: Tensor | None,
    p: Tensor,
    g: Tensor | None,
    sums: NamedSums,
) -> None:
    """Update z (and s) in place for a block of tokens given the new p; add the term sums.

    ``m``, ``n`` are the pre-activations of the current weights; ``a_z``, ``a_s`` are α/γ: the
    per-element problems only depend on these ratios. ``g`` is act(s) before the update (gated
    only; ``s`` None means a plain FFN). ``sums`` gets ‖z − m‖² (``"up"``), ‖s − n‖²
    (``"gate"``) and ‖p − σ(s, z)‖² (``"act"``) of the updated values.
    """
    rows, width = z.shape
    # On the CPU blocks that stay in cache; on accelerators the whole chunk at once (each
    # block costs ~40 kernel launches, and the chunk already fits the device budget).
    block = _ELEMENTWISE_BLOCK if z.device.type == "cpu" else z.numel()
    step = max(1, block // max(width, 1))
    for r0 in range(0, rows, step):
        sl = slice(r0, r0 + step)
        if s is not None:
            _update_gated(act, a_z, a_s, m[sl], n[sl], z[sl], s[sl], p[sl], g[sl], sums)
        else:
            _update_plain(act, a_z, m[sl], z[sl], p[sl], sums)
