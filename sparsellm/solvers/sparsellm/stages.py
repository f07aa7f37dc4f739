"""The stages of one SparseLLM solve, in the order :func:`.solve.sparsellm_ffn` runs them.

    init      :func:`dense_pass`: one pass with the dense weights: z, s := dense
              pre-activations, so with ``p := σ(s, z)`` every term is 0; ``H = XᵀX``; term
              scales. :func:`initial_pruning`: W1, Wg, W2 := sparse LS fits of that state
              (SparseGPT on dense inputs, plus the CG refit of :mod:`.weights`).
    epoch k   :func:`run_epoch`: one pass: true output error of the current weights; p (exact),
              then z, s per element (:mod:`.auxiliaries`); Grams of the new auxiliaries. Then
              W1, Wg (and W2 unless k = E) re-solved.
    final     :func:`final_down_fit`: one pass with the final W1, Wg: the true activation
              ``a = σ(n, m)`` (what the network computes); W2 re-solved on ``a`` against ``T``.

Each pass is a few ``N·d·f`` matmuls, plus one ``N·f²`` Gram (upper block triangle only) in
the final pass and in non-final epochs; the init pass runs the dense FFN on a sample of
``_INIT_DOWN_TOKENS`` tokens only, for the Gram of its down solve, which only steers the first
p-update, and the scales of the penalties (``XᵀX`` takes every token). Tokens are processed in
chunks; z and s live on X's device; only d × d, f × f and f × d matrices are held whole; the
damped inverse of ``XᵀX`` is computed once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparsellm.linalg import add_gram_upper, mirror_upper, sq_norm
from sparsellm.models.feed_forward import ffn_hidden
from sparsellm.solvers.base import NumericalError
from sparsellm.solvers.sparsellm.auxiliaries import p_system, p_update, update_auxiliaries
from sparsellm.solvers.sparsellm.state import (
    DensePass,
    FFNProblem,
    FFNState,
    NamedSums,
    Penalties,
    SolveLog,
    affine,
    check_finite,
)
from sparsellm.solvers.sparsellm.steps import input_problems, solve_down, solve_weights
from sparsellm.solvers.sparsellm.weights import (
    WeightProblem,
    damped_inverse,
    quad_value,
    ridge_strength,
    with_ridge,
)

# Masked conjugate-gradient iterations: CG_ITERS (steps.py) after each OBS sweep; the final
# down fit (the one returned) gets more; the first down solve, which only steers the first
# p-update, gets none (no measurable effect on the final error).
_CG_ITERS_FINAL = 16
_CG_ITERS_INIT_DOWN = 0
# Tokens sampled (strided) for the Gram of the first down solve.
_INIT_DOWN_TOKENS = 4096
# Its support solver: one OBS sweep. Under ADMM this solve cost an f × f eigendecomposition
# and the most expensive iterations of the block (W2 is d × f) for a weight that is replaced.
_INIT_DOWN = "sparsegpt"

# Squared norms of the dense pass: ‖m‖², ‖n‖², ‖a‖², ‖T‖², ‖Y‖², ‖T‖² of the sampled tokens,
# and the count of those tokens (m, n, a are summed over the sample, then scaled to all).
DENSE_SCALES = ("up", "gate", "act", "target", "output", "target_sample", "sampled")
_SAMPLED_SCALES = ("up", "gate", "act")
# Sums of an epoch pass: ‖z − m‖², ‖s − n‖², ‖p − σ(s, z)‖² of the new auxiliaries, ‖q‖²,
# ‖FFN(X) − Y‖² of the current weights, ‖σW2ᵀ − T‖² before the p-update.
EPOCH_TERMS = ("up", "gate", "act", "q", "output", "down_before")


def _times(rows: Tensor, column: Tensor | None) -> Tensor:
    """``rows`` scaled by a per-token column (unchanged for None: every weight 1)."""
    return rows if column is None else rows * column


def _record(epoch: int, up: float, gate: float | None, act: float, down: float) -> dict[str, Any]:
    """One ``history`` entry: the objective terms and their total."""
    rec = {"epoch": epoch, "up": up, "gate": gate, "act": act, "down": down}
    rec["total"] = _total(rec)
    return rec


def _total(rec: dict[str, Any]) -> float:
    return rec["up"] + (rec["gate"] or 0.0) + rec["act"] + rec["down"]


# --------------------------------------------------------------------------- init


def dense_pass(problem: FFNProblem, epochs: int) -> DensePass:
    """One pass with the dense weights: auxiliaries, ``XᵀX``, the first down Grams, scales."""
    N, d = problem.X.shape
    f = problem.dense_up.shape[0]
    f32, dev = torch.float32, problem.device
    tokens_all = torch.tensor([float(N)], dtype=torch.float64, device=dev)
    problem.all_sum(tokens_all)
    out = DensePass(
        tokens=int(tokens_all),
        input_gram=torch.zeros(d, d, dtype=f32, device=dev),
        input_sum=torch.zeros(d, dtype=f32, device=dev),
        down_gram=torch.zeros(f, f, dtype=f32, device=dev),
        down_cross=torch.zeros(d, f, dtype=f32, device=dev),
        # The first down solve only steers the first p-update (the down weight returned is
        # refitted on the pruned activations at the end), so a strided token sample suffices
        # for its f × f Gram, the most expensive product of this pass.
        stride=1 if epochs == 0 else max(1, math.ceil(float(tokens_all) / _INIT_DOWN_TOKENS)),
    )
    scales = NamedSums(DENSE_SCALES, dev)
    for start, stop in problem.chunks:
        _dense_chunk(problem, out, scales, start, stop)
    problem.all_sum(out.input_gram, out.input_sum, out.down_gram, out.down_cross, scales.tensor)
    mirror_upper(out.down_gram, problem.hidden_blocks)
    out.scales = scales.values()
    for name in _SAMPLED_SCALES:  # the sample's share of the tokens, as a sum over all
        out.scales[name] *= out.tokens / max(out.scales["sampled"], 1.0)
    if not all(math.isfinite(v) for v in out.scales.values()):
        raise NumericalError("dense forward pass overflowed (non-finite activations)")
    check_finite("input Gram XᵀX", out.input_gram)
    check_finite("dense activation Gram", out.down_gram)
    return out


def _dense_chunk(
    problem: FFNProblem, out: DensePass, scales: NamedSums, start: int, stop: int
) -> None:
    rows, target = problem.load(start, stop)
    w, root = problem.weights(start, stop)
    weighted = _times(rows, w)
    out.input_gram.addmm_(weighted.T, rows)
    out.input_sum += weighted.sum(0)
    scales.add("target", sq_norm(_times(target, root)))
    output = target if problem.down_bias is None else target + problem.down_bias
    scales.add("output", sq_norm(_times(output, root)))
    # Every stride-th token counted from token 0, whichever chunk it falls in. The dense
    # activations are needed for the sample alone: the first down solve's Grams, and the
    # scales of m, n, a (they only set the penalties), so the FFN runs on the sample only.
    offset = (-start) % out.stride
    sample, target_sample = rows[offset :: out.stride], target[offset :: out.stride]
    root = None if root is None else root[offset :: out.stride]
    hidden, m, n = problem.forward_hidden(sample, problem.dense_up, problem.dense_gate)
    scales.add("up", sq_norm(_times(m, root)))
    if n is not None:
        scales.add("gate", sq_norm(_times(n, root)))
    hidden, target_sample = _times(hidden, root), _times(target_sample, root)
    scales.add("act", sq_norm(hidden))
    scales.add("sampled", float(sample.shape[0]))
    add_gram_upper(out.down_gram, hidden, problem.hidden_blocks)
    out.down_cross.addmm_(target_sample.T, hidden)
    scales.add("target_sample", sq_norm(target_sample))


def initial_pruning(
    problem: FFNProblem, dense: DensePass, penalties: Penalties, log: SolveLog
) -> FFNState:
    """Epoch 0: W1, Wg, W2 := sparse LS fits of the dense state; the starting iterate."""
    gram = dense.input_gram
    # λ of the ridges, fixed for the solve: the mean squared norm of the input rows (X for
    # up/gate, the dense activation for down) times problem.ridge.
    input_ridge = ridge_strength(problem.ridge, float(gram.trace()), dense.tokens)
    down_ridge = ridge_strength(problem.ridge, dense.scales["act"], dense.tokens)
    solve_gram = with_ridge(gram, input_ridge)
    # H = XᵀX never changes: its damped inverse serves every up/gate solve.
    inverse, retries = damped_inverse(solve_gram, problem.dampening)
    log.info["damping_retries"] += retries
    state = FFNState(
        up=problem.dense_up,
        gate=problem.dense_gate,
        down=problem.dense_down,
        z=None,
        s=None,
        input_gram=gram,
        solve_gram=solve_gram,
        input_gram_inverse=inverse,
        input_sum=dense.input_sum,
        penalties=penalties,
        target_sq=dense.scales["target"],
        output_sq=dense.scales["output"] if dense.scales["output"] > 0 else 1.0,
        tokens=dense.tokens,
        input_ridge=input_ridge,
        down_ridge=down_ridge,
    )
    # z, s are the dense pre-activations, so C = W_dense·H exactly: no pass needed.
    up_cross = problem.dense_up @ gram
    gate_cross = problem.dense_gate @ gram if problem.gated else None
    inputs = input_problems(problem, state, up_cross, gate_cross, feasible=False)
    steps = solve_weights(
        problem, log, solve_gram, inputs, 0, inverse, memo=problem.input_memo, ridge=input_ridge
    )
    state.up = steps[0].weight
    state.gate = steps[1].weight if problem.gated else None
    # ‖a₀W2ᵀ − T‖² (0 when Y is the dense output) on the token sample, before the down step
    # and with its delta, scaled to all tokens: an estimate, replaced by the exact figure in
    # the first epoch's pass. This down solve only steers the first p-update: no ridge (its
    # Gram is a sample's).
    sample_sq = dense.scales["target_sample"]
    dense_down = quad_value(problem.dense_down, dense.down_gram, dense.down_cross, sample_sq)
    down = WeightProblem("down", problem.dense_down, problem.dense_down, dense.down_cross, False)
    (down_step,) = solve_weights(
        problem, log, dense.down_gram, [down], 0, cg_iters=_CG_ITERS_INIT_DOWN, solver=_INIT_DOWN
    )
    state.down = down_step.weight
    log.history.append(
        _record(
            0,
            up=penalties.alpha_up * max(steps[0].delta, 0.0),
            gate=penalties.alpha_gate * max(steps[1].delta, 0.0) if problem.gated else None,
            act=0.0,
            down=penalties.beta * max((dense_down + down_step.delta) * dense.stride, 0.0),
        )
    )
    return state


# --------------------------------------------------------------------------- epochs


@dataclass
class _EpochSums:
    """What an epoch pass accumulates for the weight solves that follow it."""

    up_cross: Tensor  # zᵀX [f, d]
    gate_cross: Tensor | None  # sᵀX [f, d]
    down_gram: Tensor | None  # pᵀp [f, f], upper blocks (None in the last epoch)
    down_cross: Tensor | None  # Tᵀp [d, f]
    terms: NamedSums  # EPOCH_TERMS


def run_epoch(problem: FFNProblem, state: FFNState, log: SolveLog, epoch: int, last: bool) -> None:
    """One epoch: auxiliary updates over all tokens, then the weight solves."""
    sums = _epoch_pass(problem, state, last)
    terms = sums.terms.values()
    if not all(math.isfinite(v) for v in terms.values()):
        raise NumericalError(f"auxiliary update of epoch {epoch} produced NaN/Inf")
    previous = log.history[-1]
    previous["output_error"] = terms["output"] / state.output_sq
    if epoch == 1:  # exact down term of the initial state (the init pass may have sampled)
        down_ridge = state.down_ridge_term(problem.dense_down)
        previous["down"] = state.penalties.beta * (terms["down_before"] + down_ridge)
        previous["total"] = _total(previous)
    _epoch_solves(problem, state, log, epoch, sums, terms)


def _epoch_pass(problem: FFNProblem, state: FFNState, last: bool) -> _EpochSums:
    N, d = problem.X.shape
    f = problem.dense_up.shape[0]
    f32, dev = torch.float32, problem.device
    p_inverse = p_system(state.down, state.penalties.p_ratio)
    sums = _EpochSums(
        up_cross=torch.zeros(f, d, dtype=f32, device=dev),
        gate_cross=torch.zeros(f, d, dtype=f32, device=dev) if problem.gated else None,
        down_gram=None if last else torch.zeros(f, f, dtype=f32, device=dev),
        down_cross=None if last else torch.zeros(d, f, dtype=f32, device=dev),
        terms=NamedSums(EPOCH_TERMS, dev),
    )
    fresh = state.z is None  # z, s are still the dense pre-activations: recompute them
    if fresh and not last:  # the next epoch starts from this one's auxiliaries
        state.z = problem.store_empty(f)
        state.s = problem.store_empty(f) if problem.gated else None
    for start, stop in problem.chunks:
        z, s = _load_auxiliaries(problem, state, fresh, start, stop)
        _epoch_chunk(problem, state, sums, p_inverse, (z, s), start, stop)
        if not last and (fresh or z.device != problem.store):
            state.z[start:stop] = z
            if problem.gated:
                state.s[start:stop] = s
    gate = [sums.gate_cross] if problem.gated else []
    down = [] if last else [sums.down_gram, sums.down_cross]
    problem.all_sum(sums.up_cross, sums.terms.tensor, *gate, *down)
    return sums


def _load_auxiliaries(
    problem: FFNProblem, state: FFNState, fresh: bool, start: int, stop: int
) -> tuple[Tensor, Tensor | None]:
    """z, s of tokens ``start:stop`` on the work device: recomputed dense pre-activations
    (``fresh``), else the stored ones (views, updated in place, when stored there)."""
    if fresh:
        rows = problem.X[start:stop].to(problem.device, torch.float32, non_blocking=True)
        z = affine(rows, problem.dense_up, problem.up_bias)
        s = affine(rows, problem.dense_gate, problem.gate_bias) if problem.gated else None
        return z, s
    z = state.z[start:stop].to(problem.device, non_blocking=True)
    s = state.s[start:stop].to(problem.device, non_blocking=True) if problem.gated else None
    return z, s


def _epoch_chunk(
    problem: FFNProblem,
    state: FFNState,
    sums: _EpochSums,
    p_inverse: Tensor,
    auxiliaries: tuple[Tensor, Tensor | None],
    start: int,
    stop: int,
) -> None:
    """The auxiliary update of tokens ``start:stop`` (z, s in place) and their sums."""
    rows, target = problem.load(start, stop)
    w, root = problem.weights(start, stop)
    z, s = auxiliaries
    hidden, m, n = problem.forward_hidden(rows, state.up, state.gate)
    error = torch.addmm(target, hidden, state.down.T, alpha=1.0, beta=-1.0)
    sums.terms.add("output", sq_norm(_times(error, root)))
    del hidden, error
    gate_value = problem.act.fn(s) if problem.gated else None  # act(s) before the update
    hidden = ffn_hidden(problem.act.fn, s, z, gate_value)
    p, q, r_sq = p_update(hidden, target, state.down, p_inverse)
    del hidden
    sums.terms.add("q", sq_norm(q))
    sums.terms.add("down_before", r_sq)
    del q
    ratios = state.penalties
    update_auxiliaries(
        problem.act, ratios.up_ratio, ratios.gate_ratio, m, n, z, s, p, gate_value, sums.terms
    )
    weighted = _times(rows, w)
    sums.up_cross.addmm_(z.T, weighted)
    if problem.gated:
        sums.gate_cross.addmm_(s.T, weighted)
    if sums.down_gram is not None:
        add_gram_upper(sums.down_gram, _times(p, root), problem.hidden_blocks)
        sums.down_cross.addmm_(_times(target, w).T, p)


def _epoch_solves(
    problem: FFNProblem,
    state: FFNState,
    log: SolveLog,
    epoch: int,
    sums: _EpochSums,
    terms: dict[str, float],
) -> None:
    penalties = state.penalties
    # C = (z − b)ᵀX, with the bias folded in through the column sums of X.
    if problem.up_bias is not None:
        sums.up_cross.addr_(problem.up_bias, state.input_sum, alpha=-1.0)
    if problem.gated and problem.gate_bias is not None:
        sums.gate_cross.addr_(problem.gate_bias, state.input_sum, alpha=-1.0)
    inputs = input_problems(problem, state, sums.up_cross, sums.gate_cross, feasible=True)
    steps = solve_weights(
        problem,
        log,
        state.solve_gram,
        inputs,
        epoch,
        state.input_gram_inverse,
        memo=problem.input_memo,
        ridge=state.input_ridge,
    )
    state.up = steps[0].weight
    gate_term = None
    if problem.gated:
        state.gate = steps[1].weight
        gate_term = penalties.alpha_gate * max(terms["gate"] + steps[1].delta, 0.0)
    c = penalties.p_ratio
    down_sq = c * c * terms["q"]  # residual of the new p is −(γ/β)·q
    if sums.down_gram is not None:
        mirror_upper(sums.down_gram, problem.hidden_blocks)
        down_sq += solve_down(problem, state, log, sums.down_gram, sums.down_cross, epoch)
    else:  # W2 stays: its ridge term as it is
        down_sq += state.down_ridge_term(problem.dense_down)
    log.history.append(
        _record(
            epoch,
            up=penalties.alpha_up * max(terms["up"] + steps[0].delta, 0.0),
            gate=gate_term,
            act=penalties.gamma * terms["act"],
            down=penalties.beta * max(down_sq, 0.0),
        )
    )


# --------------------------------------------------------------------------- final


def final_down_fit(problem: FFNProblem, state: FFNState, log: SolveLog, epoch: int) -> float:
    """W2 re-solved on the true activation of the final W1, Wg; returns its output error."""
    d, f = problem.dense_down.shape
    gram = torch.zeros(f, f, dtype=torch.float32, device=problem.device)
    cross = torch.zeros(d, f, dtype=torch.float32, device=problem.device)
    for start, stop in problem.chunks:
        rows, target = problem.load(start, stop)
        w, root = problem.weights(start, stop)
        hidden, _, _ = problem.forward_hidden(rows, state.up, state.gate)
        add_gram_upper(gram, _times(hidden, root), problem.hidden_blocks)
        cross.addmm_(_times(target, w).T, hidden)
    problem.all_sum(gram, cross)
    mirror_upper(gram, problem.hidden_blocks)
    check_finite("activation Gram of the pruned up/gate", gram)
    before = quad_value(state.down, gram, cross, state.target_sq)
    log.history[-1]["output_error"] = before / state.output_sq
    delta = solve_down(problem, state, log, gram, cross, epoch, cg_iters=_CG_ITERS_FINAL)
    after = before + delta - state.down_ridge_term(problem.dense_down)
    return max(after, 0.0) / state.output_sq
