"""The rules a :class:`~sparsellm.optim.SparseOptimizer` applies after each base step.

A rule does one job. The wrapper binds its rules once, in list order, when it is built, and after
every base step (once the held-at-zero masks are re-applied) calls each rule's ``apply`` in the
same order, under ``torch.no_grad()``. Entries a rule puts into ``opt.masks`` are *held*: the
wrapper zeroes their gradients before, and the entries themselves after, every base step.

Proximal gradient descent minimises ``f(w) + λ·R(w)`` by alternating a gradient step on ``f``
with the proximal map of the penalty, ``prox_{τR}(z) = argmin_w τ·R(w) + ½‖w − z‖²`` with
``τ = lr·λ``. The base optimizer takes the gradient step (momentum, adaptivity and weight decay
untouched); the proximal rules here take the prox:

* :class:`L1Proximal`, ``R = ‖w‖₁`` — soft threshold ``w ← sign(w)·max(|w| − τ, 0)``;
* :class:`HardThreshold`, ``R = ‖w‖₀`` (count of non-zeros) — per coordinate the choice is
  between keeping ``z`` (cost ``τ``) and zeroing it (cost ``z²/2``), so the prox is the hard
  threshold ``w ← w·[|w| > √(2τ)]`` (ties go to zero).

:class:`FrozenMask` holds the zeros of an already pruned model; the sparsity schedule is
:class:`~sparsellm.optim.schedule.GradualSparsity`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sparsellm.optim.optimizer import SparseOptimizer

__all__ = ["FrozenMask", "HardThreshold", "L1Proximal", "SparsityRule", "adam_denominator"]


class SparsityRule:
    """Base of the rules: every hook does nothing unless a rule overrides it.

    A rule instance belongs to one optimizer (it may keep per-parameter state sized at
    :meth:`bind`).
    """

    def bind(self, opt: SparseOptimizer) -> None:
        """Prepare for ``opt``'s selected parameters; called once when ``opt`` is built."""

    def apply(self, opt: SparseOptimizer) -> None:
        """Act on the selected parameters after a base step (``opt.sparse_step`` counts it)."""

    def state_dict(self, opt: SparseOptimizer, indices: list[int]) -> dict[str, Any]:
        """Entries for the wrapper's checkpoint, tensors keyed by ``indices`` (the selected
        params' numbers in the packed state dict)."""
        return {}

    def load_state_dict(
        self, opt: SparseOptimizer, saved: dict[str, Any], indices: list[int]
    ) -> None:
        """Restore from the wrapper's checkpoint entry ``saved`` (see :meth:`state_dict`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FrozenMask(SparsityRule):
    """Hold the zeros present when the wrapper is built exactly at zero forever.

    For sparse fine-tuning after one-shot pruning: the wrapper masks their gradients before the
    base step and re-zeroes them after it, so momentum and weight decay cannot revive them.
    """

    def bind(self, opt: SparseOptimizer) -> None:
        for i, (_, p) in enumerate(opt.sparsified_parameters):
            mask = p.detach() == 0
            if bool(mask.any()):  # a dense tensor needs no mask work at every step
                opt.masks[i] = mask


def adam_denominator(state: Any, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor | None:
    """``√v̂ + eps`` of an Adam-style optimizer for ``p`` (``v̂`` the bias-corrected second
    moment, ``max_exp_avg_sq`` under AMSGrad), or None if its state has no diagonal one."""
    param_state = state.get(p, {})
    amsgrad = group.get("amsgrad") and "max_exp_avg_sq" in param_state
    v = param_state.get("max_exp_avg_sq" if amsgrad else "exp_avg_sq")
    eps = group.get("eps", 1e-8)
    # Factored or otherwise different second moments (Adafactor) are not a diagonal metric.
    if not isinstance(v, torch.Tensor) or v.shape != p.shape:
        return None
    if not isinstance(eps, float | int):
        return None
    correction = 1.0
    betas = group.get("betas")
    step = param_state.get("step")
    if isinstance(betas, tuple | list) and step is not None:
        correction = 1.0 - float(betas[1]) ** float(step)
    if correction <= 0:
        return None
    return (v / correction).sqrt_().add_(eps).to(p.dtype)


class _Proximal(SparsityRule):
    """The prox of ``lam·R`` with ``τ = lr·lam``, ``lr`` read from each param group at every
    step (so LR schedulers scale it).

    Adam-style base optimizers (``exp_avg_sq`` in the param's state): with ``preconditioned``
    (default) the prox is taken in the metric Adam steps in, ``D = diag(√v̂ + eps)``, which makes
    the threshold per coordinate, ``τ_i = lr·lam / (√v̂_i + eps)``. This is the step that
    actually minimises ``f(w) + lam·R(w)``: the fixed points of a proximal gradient method do not
    depend on the metric, so ``lam`` means the same as with SGD. ``preconditioned=False`` uses
    the scalar ``τ = lr·lam`` ("decoupled", like AdamW's weight decay); its fixed points solve a
    reweighted problem, ``∇f ∈ −lam·D·∂R(w)``. Other optimizers always get the scalar ``τ``.
    Caveat of the Adam metric: ``lam`` is in gradient units, and in the first steps ``v̂`` rests
    on a few gradients, so coordinates whose gradients have been ~0 get a very large ``τ_i``
    and are cut at once. ``lam = 0`` does nothing (bit-identical to the base optimizer).
    """

    def __init__(self, lam: float, *, preconditioned: bool = True) -> None:
        lam = float(lam)
        if not (lam >= 0.0 and math.isfinite(lam)):
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
        self.lam = lam
        self.preconditioned = bool(preconditioned)

    def apply(self, opt: SparseOptimizer) -> None:
        if self.lam == 0.0:
            return
        selected = {id(p) for _, p in opt.sparsified_parameters}
        for group in opt.param_groups:
            scale = float(group["lr"]) * self.lam
            for p in group["params"]:
                if id(p) not in selected:
                    continue
                tau: float | torch.Tensor = scale
                denom = adam_denominator(opt.state, group, p) if self.preconditioned else None
                if denom is not None:
                    tau = scale / denom
                self.prox(p, tau)

    def prox(self, p: torch.Tensor, tau: float | torch.Tensor) -> None:
        """Replace ``p`` in place by the prox of ``τ·R`` at ``p``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lam={self.lam}, preconditioned={self.preconditioned})"


class L1Proximal(_Proximal):
    """Soft threshold, the prox of ``lam·‖w‖₁``: ``w ← sign(w)·max(|w| − τ, 0)``."""

    def prox(self, p: torch.Tensor, tau: float | torch.Tensor) -> None:
        shrunk = (p.abs() - tau).clamp_min_(0)
        p.copy_(p.sign() * shrunk)


class HardThreshold(_Proximal):
    """Hard threshold, the prox of ``lam·‖w‖₀``: zero ``w_i`` iff ``|w_i| ≤ √(2τ_i)``;
    survivors are left unchanged."""

    def prox(self, p: torch.Tensor, tau: float | torch.Tensor) -> None:
        threshold = (2 * tau) ** 0.5
        p.masked_fill_(p.abs() <= threshold, 0)
