"""The weight step: safeguarded sparse least squares for W1, Wg and W2.

Each weight solves ``min ‖A Wᵀ − T‖²`` over sparse W, where A is the step's input (X for up
and gate, p or the true activation for down) and T its target (z − b1, s − bg, or Y − b2).
This is a quadratic ``q(W) = ⟨W, W H⟩ − 2⟨W, C⟩ + ‖T‖²`` in the Grams ``H = AᵀA`` and
``C = TᵀA``, so no step needs the tokens again.

Candidate 1: the dense LS solution (damped, refined from the dense weight so directions the
data does not see keep their original value) made sparse, then masked Jacobi-preconditioned
CG on that mask. The support comes from one OBS sweep (:func:`obs_prune`, ``"sparsegpt"``;
it never revisits early columns, and the refit removes a third of its error on real LLM
blocks) or from the ADMM iterations of :mod:`sparsellm.solvers.admm` (``"admm"``: the
support moves while the penalty rises; 10-40 % lower ``q`` than OBS on SmolLM2's FFNs, at a
few seconds per matrix). Candidate 2: the current
sparse weight, CG-refined on its own mask. The lower ``q`` wins, compared from the Grams as
``⟨A − B, (A + B)H − 2C⟩``; the current weight is kept if neither is lower. OBS alone is not
a minimiser, so this is what makes the weight step monotone.

Ridge. With ``ridge`` = λ > 0 each step minimises ``q(W) + λ‖W − W_dense‖²`` instead: the same
quadratic in ``H + λI`` and ``C + λ W_dense``. The fit then leans towards the dense weight in the
directions the calibration tokens barely see. A sparse fit of a [d, f] down projection from
tens of thousands of tokens is loose: on SmolLM2 blocks 3 / 15 / 25 at 50 % its error on held-out
windows was 1.2-1.4x the error on the windows fitted; λ = mean ‖a_t‖² (see
:func:`ridge_strength`) cut the held-out error by 1.1-3.6 % (50 %, 70 % and 2:4) for a
calibration error 0.6-3 % higher. On the whole model the effect is mixed (README), so the
method leaves it off by default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsellm.linalg import damped_cholesky, one_thread
from sparsellm.masks import SparsityTarget
from sparsellm.solvers.admm import admm
from sparsellm.solvers.base import LayerStatistics, NumericalError
from sparsellm.solvers.sparsegpt import inverse_factor, obs_prune

# Iterative-refinement steps of the damped dense LS solution (removes most damping bias).
_LS_REFINE = 2


@dataclass
class WeightProblem:
    """One ``min q(W)`` of a batch whose problems share the Gram H."""

    name: str  # "up", "gate" or "down", for messages and the report
    anchor: Tensor  # the dense original weight
    current: Tensor  # the weight now in use
    cross: Tensor  # C = TᵀA, [out, in]
    feasible: bool  # current already meets the target (False only for the dense start)


@dataclass
class WeightStep:
    """The weight a solve kept and what it did to the objective."""

    weight: Tensor
    # q(new) − q(current) from the Grams (≤ 0 when current was feasible); with a ridge, see
    # :func:`sparse_ls_steps`
    delta: float
    choice: str  # "obs" or "admm" (the new support), "kept+cg" or "kept"
    retries: int = 0  # damping retries of the OBS sweep


def ridge_strength(scale: float, input_energy: float, tokens: int) -> float:
    """λ of a weight step's ridge: ``scale`` times the mean squared norm of the step's input
    rows, ``input_energy / tokens``. As a fraction of the Gram's mean diagonal this is
    ``scale · in_features / tokens``: the more tokens per weight of a row, the less pull."""
    return scale * input_energy / max(tokens, 1)


def with_ridge(gram: Tensor, ridge: float) -> Tensor:
    """``H + ridge·I`` as a new tensor (``gram`` itself when ``ridge`` is 0)."""
    if ridge <= 0:
        return gram
    ridged = gram.clone()
    ridged.diagonal().add_(ridge)
    return ridged


def damped_inverse(gram: Tensor, dampening: float) -> tuple[Tensor, int]:
    """``(H + λ·mean(diag H)·I)⁻¹`` as float32 and the damping retries.

    Factorised in float64 on the CPU; in float32 on accelerators, where float64 runs at a
    small fraction of the speed, with :func:`sparsellm.linalg.damped_cholesky`'s damping
    fallback for a factorisation that fails.
    """
    work = torch.float64 if gram.device.type == "cpu" else torch.float32
    factor, _, retries = damped_cholesky(gram.to(work), dampening)
    with one_thread(factor.device):
        inverse = torch.cholesky_inverse(factor)
    return inverse.to(torch.float32), retries


def anchored_ls(anchor: Tensor, gram: Tensor, cross: Tensor, inverse: Tensor) -> Tensor:
    """Dense solution of ``W H = C``: damped, refined from the dense weight.

    Starting from the dense weight (not from 0) and refining leaves the null space of H at the
    original weights: those directions do not change the calibration output, and the original
    value is the safest guess for other inputs. ``inverse`` is the damped inverse of H.
    """
    W = anchor.clone()
    for _ in range(_LS_REFINE):
        W.addmm_(torch.addmm(cross, W, gram, alpha=-1.0), inverse)
    return W


def quad_diffs(
    cands: list[Tensor], refs: list[Tensor], gram: Tensor, crosses: list[Tensor]
) -> list[float]:
    """``q(A) − q(B)`` for each pair, ``q(W) = ⟨W, W H⟩ − 2⟨W, C⟩`` (one matmul for all).

    Written as ``⟨A − B, (A + B) H − 2C⟩`` so the large common part cancels before rounding.
    """
    G = torch.addmm(
        torch.cat(crosses),
        torch.cat([a + b for a, b in zip(cands, refs, strict=True)]),
        gram,
        beta=-2.0,
    )
    out, row = [], 0
    for a, b in zip(cands, refs, strict=True):
        g = G[row : row + a.shape[0]]
        row += a.shape[0]
        out.append(float(((a - b).to(torch.float64) * g.to(torch.float64)).sum()))
    return out


def quad_value(W: Tensor, gram: Tensor, cross: Tensor, const: float) -> float:
    """``‖A Wᵀ − T‖² = ⟨W, W H⟩ − 2⟨W, C⟩ + ‖T‖²`` from the Grams (clamped at 0)."""
    WH = (W @ gram).to(torch.float64)
    W64 = W.to(torch.float64)
    return max(float((W64 * WH).sum() - 2.0 * (W64 * cross.to(torch.float64)).sum()) + const, 0.0)


def masked_pcg(W: Tensor, keep: Tensor, gram: Tensor, cross: Tensor, iters: int) -> Tensor:
    """Jacobi-preconditioned CG on ``min q(W)`` with W's support fixed, every row at once.

    Rows are independent problems sharing H, so each row carries its own CG scalars.
    """
    W = W.clone()
    if iters <= 0:
        return W
    keepf = keep.to(W.dtype)
    diag = gram.diagonal()
    dinv = 1.0 / diag.clamp_min(float(diag.max()) * 1e-12 + 1e-30)
    R = torch.addmm(cross, W, gram, alpha=-1.0).mul_(keepf)
    Z = R * dinv
    P = Z.clone()
    rz = (R * Z).sum(1, keepdim=True)
    for _ in range(iters):
        HP = (P @ gram).mul_(keepf)
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
class SupportSolver:
    """How a weight step finds its new support: ``"sparsegpt"`` (one OBS sweep) or ``"admm"``
    (at most ``admm_iterations``); ``memo`` keeps what depends on the Gram alone (the OBS
    factor, the ADMM eigenbasis) for the next step on the same Gram (the input Gram XᵀX is
    the same in every up/gate step of a solve)."""

    name: str = "sparsegpt"
    admm_iterations: int = 60
    memo: dict | None = None


def sparse_ls_steps(
    gram: Tensor,
    problems: list[WeightProblem],
    targets: Mapping[str, SparsityTarget],
    *,
    inverse: Tensor,
    dampening: float,
    blocksize: int,
    cg_iters: int,
    support: SupportSolver | None = None,
    ridge: float = 0.0,
) -> list[WeightStep]:
    """Safeguarded sparse least-squares solves sharing H (see the module docstring).

    With ``ridge`` = λ > 0, ``gram`` and ``inverse`` are those of ``H + λI`` (:func:`with_ridge`)
    and each problem's ``cross`` is ``C`` alone: ``λ·anchor`` is added here. A step's ``delta``
    is then ``q(new) + λ‖new − anchor‖² − q(current)``: the new value of the step's term, ridge
    included, less the current value of its data term (what the solver's history adds it to).

    Candidates: the anchored dense solution made sparse by ``support``, and the current weight
    if feasible; each CG-refined on its mask (rows are independent problems). Candidates are
    refined one at a time, so the device holds one CG run (about seven f x d matrices), not a
    stack of four.
    """
    support = support or SupportSolver()
    stats = LayerStatistics(tokens=0, hessian=gram)
    if support.memo is not None:
        stats.memo = support.memo
    steps = []
    for pb in problems:
        shift = 0.0
        if ridge > 0:
            shift = ridge * float((pb.current - pb.anchor).to(torch.float64).square().sum())
            pb = WeightProblem(
                pb.name, pb.anchor, pb.current, pb.cross + ridge * pb.anchor, pb.feasible
            )
        dense = anchored_ls(pb.anchor, gram, pb.cross, inverse)
        sparse, retries = _sparse_start(
            dense, stats, targets[pb.name], support, dampening, blocksize
        )
        del dense
        if not torch.isfinite(sparse).all():
            raise NumericalError(f"{support.name} solve of {pb.name} produced non-finite weights")
        refined = []
        for start in (sparse, pb.current) if pb.feasible else (sparse,):
            weight = masked_pcg(start, start != 0, gram, pb.cross, cg_iters)
            (delta,) = quad_diffs([weight], [pb.current], gram, [pb.cross])
            refined.append((delta, weight))
        label = "admm" if support.name == "admm" else "obs"
        step = _best_candidate(pb, refined, retries, label)
        step.delta += shift
        steps.append(step)
    return steps


def _sparse_start(
    dense: Tensor,
    stats: LayerStatistics,
    target: SparsityTarget,
    support: SupportSolver,
    dampening: float,
    blocksize: int,
) -> tuple[Tensor, int]:
    """``dense`` made sparse by the support solver (before the CG refit); damping retries."""
    if support.name == "admm":
        # The refit on the true Gram follows (masked_pcg), so ADMM's own CG is not run.
        result = admm(
            dense,
            stats,
            target,
            iterations=support.admm_iterations,
            cg_iterations=0,
            dampening=dampening,
        )
        return result.weight, 0
    # U of the damped H⁻¹ depends on H alone: one factorisation serves every problem here.
    key = ("obs.factor", dampening)
    if key not in stats.memo:
        stats.memo[key] = inverse_factor(stats.hessian, dampening)
    result = obs_prune(
        dense,
        stats.hessian,
        target,
        blocksize=blocksize,
        dampening=dampening,
        factor=stats.memo[key],
    )
    return result.weight, result.damping_retries


def _best_candidate(
    pb: WeightProblem, refined: list[tuple[float, Tensor]], retries: int, label: str
) -> WeightStep:
    """The refined candidate (the new support first, called ``label``, then the kept weight)
    with the lowest ``q``, or the current weight unchanged when it is feasible and no
    candidate is lower."""
    options = [
        (d if math.isfinite(d) else math.inf, w, name)
        for (d, w), name in zip(refined, (label, "kept+cg"), strict=False)
    ]
    if pb.feasible:
        options.append((0.0, pb.current.clone(), "kept"))
    delta, weight, choice = min(options, key=lambda t: t[0])
    if not math.isfinite(delta):
        raise NumericalError(f"sparse solve of {pb.name} produced non-finite objective")
    return WeightStep(weight.contiguous(), delta, choice, retries)
