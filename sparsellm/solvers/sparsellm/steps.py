"""The weight steps of a SparseLLM solve: each sparse least-squares problem solved here, or,
across ranks, by one rank and broadcast to the others; the up/gate problems on ``H = XᵀX`` and
the down re-solve that the stages build them from."""

from __future__ import annotations

import torch
from torch import Tensor

from sparsellm.solvers.base import NumericalError
from sparsellm.solvers.sparsellm.state import FFNProblem, FFNState, SolveLog, check_finite
from sparsellm.solvers.sparsellm.weights import (
    SupportSolver,
    WeightProblem,
    WeightStep,
    damped_inverse,
    sparse_ls_steps,
)

# Masked conjugate-gradient iterations after each OBS sweep (and on the kept weight).
CG_ITERS = 8


def solve_weights(
    problem: FFNProblem,
    log: SolveLog,
    gram: Tensor,
    weights: list[WeightProblem],
    epoch: int,
    inverse: Tensor | None = None,
    cg_iters: int = CG_ITERS,
    memo: dict | None = None,
    solver: str | None = None,
    ridge: float = 0.0,
) -> list[WeightStep]:
    """Weight steps sharing ``gram``; logs each choice and the damping retries.

    ``memo`` keeps what the support solver derives from ``gram`` alone for later steps on the
    same Gram (pass ``problem.input_memo`` with the input Gram, nothing otherwise). ``solver``
    overrides ``problem.weight_solver`` for these steps. With ``ridge`` > 0, ``gram`` (and
    ``inverse``) are ``H + ridge·I``'s (see :func:`.weights.sparse_ls_steps`). With
    ``problem.ranks`` each weight is solved on one rank and its step broadcast.
    """
    support = SupportSolver(solver or problem.weight_solver, problem.admm_iterations, memo)
    solve = _local_steps if problem.ranks is None else _shared_steps
    steps, retries = solve(problem, gram, weights, inverse, cg_iters, support, ridge)
    log.info["damping_retries"] += retries
    for wp, step in zip(weights, steps, strict=True):
        check_finite(f"{wp.name} after epoch {epoch}", step.weight)
        log.info["choices"].append((epoch, wp.name, step.choice))
        log.info["damping_retries"] += step.retries
    return steps


def input_problems(
    problem: FFNProblem,
    state: FFNState,
    up_cross: Tensor,
    gate_cross: Tensor | None,
    feasible: bool,
) -> list[WeightProblem]:
    """The up (and gate) problems, which share ``H = XᵀX``."""
    out = [WeightProblem("up", problem.dense_up, state.up, up_cross, feasible)]
    if problem.gated:
        out.append(WeightProblem("gate", problem.dense_gate, state.gate, gate_cross, feasible))
    return out


def solve_down(
    problem: FFNProblem,
    state: FFNState,
    log: SolveLog,
    gram: Tensor,
    cross: Tensor,
    epoch: int,
    cg_iters: int = CG_ITERS,
) -> float:
    """W2 re-solved from its (consumed) Grams, with the solve's down ridge added to ``gram`` in
    place; returns the step's delta (see :func:`.weights.sparse_ls_steps`)."""
    if state.down_ridge > 0:
        gram.diagonal().add_(state.down_ridge)
    down = WeightProblem("down", problem.dense_down, state.down, cross, True)
    (step,) = solve_weights(
        problem, log, gram, [down], epoch, cg_iters=cg_iters, ridge=state.down_ridge
    )
    state.down = step.weight
    return step.delta


def _local_steps(
    problem: FFNProblem,
    gram: Tensor,
    weights: list[WeightProblem],
    inverse: Tensor | None,
    cg_iters: int,
    support: SupportSolver,
    ridge: float,
) -> tuple[list[WeightStep], int]:
    """The steps solved here, and the damping retries of ``gram``'s inverse (if computed)."""
    retries = 0
    if inverse is None:
        inverse, retries = damped_inverse(gram, problem.dampening)
    steps = sparse_ls_steps(
        gram,
        weights,
        problem.targets,
        inverse=inverse,
        dampening=problem.dampening,
        blocksize=problem.blocksize,
        cg_iters=cg_iters,
        support=support,
        ridge=ridge,
    )
    return steps, retries


def _shared_steps(
    problem: FFNProblem,
    gram: Tensor,
    weights: list[WeightProblem],
    inverse: Tensor | None,
    cg_iters: int,
    support: SupportSolver,
    ridge: float,
) -> tuple[list[WeightStep], int]:
    """Each weight solved by one rank (by its OBS cost, rows × cols²), its step broadcast.

    Every rank holds the same all-reduced Grams and weights, so a step solved on any of them
    is the step of all; the inverse's retries are counted once, by ``weights[0]``'s owner.
    """
    ranks = problem.ranks
    owners = ranks.owners([float(w.anchor.shape[0] * w.anchor.shape[1] ** 2) for w in weights])
    mine = [w for w, owner in zip(weights, owners, strict=True) if owner == ranks.rank]
    solved: dict[str, WeightStep] = {}
    retries, failure = 0, None
    try:
        if mine:
            steps, retries = _local_steps(problem, gram, mine, inverse, cg_iters, support, ridge)
            solved = {w.name: step for w, step in zip(mine, steps, strict=True)}
    except NumericalError as exc:  # raised on every rank below, so all take the fallback
        failure = exc
    out = [
        _share_step(problem, w, solved.get(w.name), owner, failure, retries if k == 0 else 0)
        for k, (w, owner) in enumerate(zip(weights, owners, strict=True))
    ]
    return [step for step, _ in out], out[0][1]


_CHOICES = ("obs", "admm", "kept+cg", "kept")  # WeightStep.choice, by index in a broadcast


def _share_step(
    problem: FFNProblem,
    wp: WeightProblem,
    step: WeightStep | None,
    owner: int,
    failure: NumericalError | None,
    inverse_retries: int,
) -> tuple[WeightStep, int]:
    """``wp``'s step and inverse retries from its ``owner`` rank on every rank."""
    ranks, device = problem.ranks, wp.anchor.device
    figures = torch.zeros(5, dtype=torch.float64)  # delta, choice, retries, inverse's, failed
    if ranks.rank == owner:
        if failure is not None:
            figures[4] = 1.0
        else:
            choice = _CHOICES.index(step.choice)
            figures[:4] = torch.tensor([step.delta, choice, step.retries, inverse_retries])
    delta, choice, retries, inverse_retries, failed = ranks.broadcast_(
        figures.to(device), owner
    ).tolist()
    if failed:
        if failure is not None and ranks.rank == owner:
            raise failure
        raise NumericalError(f"sparse solve of {wp.name} failed on rank {owner}")
    if step is not None:
        weight = step.weight
    else:  # broadcasts need contiguous buffers; the anchor may be a view of a fused weight
        weight = torch.empty(wp.anchor.shape, dtype=torch.float32, device=device)
    ranks.broadcast_(weight, owner)
    return WeightStep(weight, delta, _CHOICES[int(choice)], int(retries)), int(inverse_retries)
