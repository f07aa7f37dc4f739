""":func:`sparsellm_ffn`: checks the arguments, builds the problem and runs the stages."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
from torch import Tensor

from sparsellm.linalg import gram_blocks
from sparsellm.masks import SparsityTarget, is_valid_nm, prune_counts
from sparsellm.solvers.sparsellm.activations import (
    Activation,
    ActivationLike,
    resolve_activation,
)
from sparsellm.solvers.sparsellm.stages import (
    dense_pass,
    final_down_fit,
    initial_pruning,
    run_epoch,
)
from sparsellm.solvers.sparsellm.state import (
    FFNProblem,
    FFNSolveResult,
    FFNState,
    Penalties,
    ProgressFn,
    ReduceFn,
    RowDifference,
    SharedSolves,
    SolveLog,
    check_finite,
)

Requested = tuple[float | None, float | None, float | None]  # alpha, beta, gamma as given
WEIGHT_SOLVERS = ("sparsegpt", "admm")


def sparsellm_ffn(
    X: Tensor,
    Y: Tensor | RowDifference,
    up: Tensor,
    up_bias: Tensor | None,
    down: Tensor,
    down_bias: Tensor | None,
    target: SparsityTarget | Mapping[str, SparsityTarget],
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
    weight_solver: str = "sparsegpt",
    admm_iterations: int = 60,
    progress: ProgressFn | None = None,
    reduce: ReduceFn | None = None,
    ranks: SharedSolves | None = None,
    token_weights: Tensor | None = None,
    ridge: float = 0.0,
) -> FFNSolveResult:
    """Prune a feed-forward block's up (and gate) and down projections jointly (SparseLLM).

    Args:
        X, Y: ``[N, d]`` FFN inputs and target outputs (down bias included; usually the dense
            output), tokens as rows, any float dtype (computed in float32); Y may be a
            :class:`RowDifference`, formed a chunk at a time.
        up, up_bias, down, down_bias: W1 ``[f, d]`` and b1 ``[f]`` (the only input projection
            of a plain FFN), W2 ``[d, f]`` and b2 ``[d]``.
        target: sparsity (unstructured, exact count per matrix) or N:M for every weight, or
            one target per matrix by name (``"up"``, ``"down"``, ``"gate"``).
        gate, gate_bias: Wg ``[f, d]``, bg ``[f]`` of a gated FFN, which computes
            ``act(X Wgᵀ + bg) ⊙ (X W1ᵀ + b1)``; without them the FFN is ``act(X W1ᵀ + b1)``.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` (aliases ``gelu_new``,
            ``gelu_pytorch_tanh``), ``"silu"``, or an elementwise callable.
        epochs: alternation rounds after the initial pruning (0 = sequential SparseGPT with a
            final down-projection fit on the pruned activations).
        alpha, beta, gamma: penalties; ``None`` = automatic (each term divided by its dense scale).
        chunk_size, device: tokens per block of a pass; where to compute. X, Y and the
            auxiliaries z, s stay where X is (host memory) and visit ``device`` a chunk at a
            time; z, s are stored only when ``epochs`` > 1 (the first epoch recomputes the
            dense pre-activations from X).
        dampening, blocksize: Gram damping (fraction of the mean diagonal); OBS column block.
        weight_solver: how each weight step finds its support: ``"sparsegpt"`` (one OBS
            sweep) or ``"admm"`` (ADMM with a rising penalty, at most ``admm_iterations``).
        progress: called with a dict after each stage.
        reduce: for tokens sharded across processes, an in-place all-reduce sum; every token
            sum goes through it, so each process holds the problem of all tokens.
        ranks: with ``reduce``, the processes' share of the weight solves: each up, gate and
            down step is solved by one of them and broadcast (``distributed.ranks()``); without
            it every process solves every step.
        token_weights: ``[N]`` non-negative weight of each token's terms (on X's device; None:
            all 1). A weight of 2 solves the problem in which the token appears twice.
        ridge: every weight step also pays ``λ‖W − W_dense‖²`` with ``λ = ridge`` times the
            mean squared norm of the step's input rows (X for up and gate, the dense
            activation for down): a pull towards the dense weights that fades as tokens grow
            (0: the plain objective).

    Returns :class:`FFNSolveResult` with float32 weights on ``up``'s device.

    Raises ``ValueError`` for shapes, settings or an activation name that do not fit and
    ``NumericalError`` for non-finite inputs or a solve that produced NaN/Inf.
    """
    log = SolveLog(progress)  # started now: the seconds include the checks
    log.info["weight_solver"] = weight_solver
    weights = {"up": up, "down": down, "gate": gate}
    biases = {"up": up_bias, "down": down_bias, "gate": gate_bias}
    _check_shapes(X, Y, weights, biases)
    _check_settings(X.shape[0], epochs, chunk_size, (alpha, beta, gamma))
    _check_weight_solver(weight_solver, admm_iterations)
    _check_token_weights(token_weights, X.shape[0])
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    work = {
        "dampening": dampening,
        "blocksize": blocksize,
        "reduce": reduce,
        "ranks": ranks,
        "weight_solver": weight_solver,
        "admm_iterations": admm_iterations,
        "token_weights": token_weights,
        "ridge": ridge,
    }
    where = torch.device(device) if device is not None else X.device
    act = resolve_activation(activation)
    problem = _build_problem(X, Y, weights, biases, target, act, where, chunk_size, work)
    state, output_error = _run_stages(problem, log, epochs, (alpha, beta, gamma))
    return _result(problem, state, log, output_error, out_device=up.device)


def _build_problem(
    X: Tensor,
    Y: Tensor | RowDifference,
    weights: dict[str, Tensor | None],
    biases: dict[str, Tensor | None],
    target: SparsityTarget,
    act: Activation,
    device: torch.device,
    chunk_size: int,
    work: dict,
) -> FFNProblem:
    """The problem with the weights as float32 on the work ``device``, after checking that
    every input is finite."""
    for name, t in {
        "X": X,
        "Y": Y,
        **weights,
        **{f"{k}_bias": b for k, b in biases.items()},
    }.items():
        check_finite(name, t)

    def on_device(parts: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        return {
            k: None if t is None else t.detach().to(device, torch.float32) for k, t in parts.items()
        }

    dense, bias = on_device(weights), on_device(biases)
    N = X.shape[0]
    return FFNProblem(
        X=X,
        Y=Y,
        dense_up=dense["up"],
        dense_down=dense["down"],
        dense_gate=dense["gate"],
        up_bias=bias["up"],
        down_bias=bias["down"],
        gate_bias=bias["gate"],
        act=act,
        targets=_targets(target, weights),
        device=device,
        chunks=[(i, min(i + chunk_size, N)) for i in range(0, N, chunk_size)],
        hidden_blocks=gram_blocks(dense["up"].shape[0]),
        **work,
    )


def _targets(
    target: SparsityTarget | Mapping[str, SparsityTarget], weights: dict[str, Tensor | None]
) -> dict[str, SparsityTarget]:
    """One target per matrix the FFN has."""
    names = [name for name, weight in weights.items() if weight is not None]
    if isinstance(target, SparsityTarget):
        return dict.fromkeys(names, target)
    missing = [name for name in names if name not in target]
    if missing:
        raise ValueError(f"no sparsity target for {', '.join(missing)}")
    return {name: target[name] for name in names}


def _check_shapes(
    X: Tensor,
    Y: Tensor | RowDifference,
    weights: dict[str, Tensor | None],
    biases: dict[str, Tensor | None],
) -> None:
    if X.dim() != 2 or Y.shape != X.shape:
        raise ValueError(f"X and Y must both be [N, d]; got {tuple(X.shape)}, {tuple(Y.shape)}")
    d = X.shape[1]
    up, down, gate = weights["up"], weights["down"], weights["gate"]
    f = up.shape[0]
    gated = gate is not None
    if up.shape != (f, d) or down.shape != (d, f) or (gated and gate.shape != (f, d)):
        raise ValueError(
            f"weights do not match d={d}: up {tuple(up.shape)}, down {tuple(down.shape)}"
            + (f", gate {tuple(gate.shape)}" if gated else "")
        )
    for name, size in (("up", f), ("gate", f), ("down", d)):
        b = biases[name]
        if b is not None and b.shape != (size,):
            raise ValueError(f"{name}_bias must have shape [{size}], got {tuple(b.shape)}")
    if biases["gate"] is not None and not gated:
        raise ValueError("gate_bias given without gate")


def _check_settings(tokens: int, epochs: int, chunk_size: int, requested: Requested) -> None:
    if epochs < 0 or chunk_size < 1 or tokens < 1:
        raise ValueError("epochs must be >= 0, chunk_size >= 1 and X non-empty")
    for name, v in zip(("alpha", "beta", "gamma"), requested, strict=True):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v}")


def _check_token_weights(weights: Tensor | None, tokens: int) -> None:
    if weights is None:
        return
    if weights.shape != (tokens,) or not bool(torch.isfinite(weights).all() & (weights >= 0).all()):
        raise ValueError(f"token_weights must be [{tokens}], finite and >= 0")


def _check_weight_solver(weight_solver: str, admm_iterations: int) -> None:
    if weight_solver not in WEIGHT_SOLVERS or admm_iterations < 1:
        raise ValueError(
            f"weight_solver must be one of {', '.join(WEIGHT_SOLVERS)} and admm_iterations "
            f">= 1; got {weight_solver!r}, {admm_iterations}"
        )


def _run_stages(
    problem: FFNProblem, log: SolveLog, epochs: int, requested: Requested
) -> tuple[FFNState, float]:
    """Init pass, initial pruning, the epochs and the final down fit, each timed and reported.

    Returns the final state and the relative output error of its weights.
    """
    started = time.perf_counter()
    dense = dense_pass(problem, epochs)
    penalties = Penalties.resolve(*requested, dense.scales, problem.gated)
    log.timed("init_pass", started)
    log.report("init")

    started = time.perf_counter()
    state = initial_pruning(problem, dense, penalties, log)
    del dense  # its f × f Gram of the dense activation is not needed again
    log.timed("init_solve", started)
    log.report("epoch", epoch=0, total=log.history[-1]["total"])

    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        run_epoch(problem, state, log, epoch, last=epoch == epochs)
        log.timed(f"epoch_{epoch}", started)
        log.report("epoch", epoch=epoch, total=log.history[-1]["total"])

    started = time.perf_counter()
    output_error = final_down_fit(problem, state, log, epochs + 1)
    log.timed("final", started)
    log.timed("total", log.started)
    log.info["output_error_denominator"] = "sum of squares of Y"
    log.report("final", output_error=output_error)
    return state, output_error


def _result(
    problem: FFNProblem,
    state: FFNState,
    log: SolveLog,
    output_error: float,
    out_device: torch.device,
) -> FFNSolveResult:
    """The final weights on ``out_device`` with the record, after checking their sparsity."""
    _check_sparsity("up", state.up, problem.targets["up"])
    _check_sparsity("down", state.down, problem.targets["down"])
    if problem.gated:
        _check_sparsity("gate", state.gate, problem.targets["gate"])
    penalties = state.penalties
    return FFNSolveResult(
        up=state.up.to(out_device),
        down=state.down.to(out_device),
        gate=state.gate.to(out_device) if problem.gated else None,
        history=log.history,
        output_error=output_error,
        alpha_up=penalties.alpha_up,
        alpha_gate=penalties.alpha_gate,
        beta=penalties.beta,
        gamma=penalties.gamma,
        info=log.info,
        input_gram=(state.input_gram / state.tokens).to(out_device),
        tokens=state.tokens,
    )


def _check_sparsity(name: str, W: Tensor, target: SparsityTarget) -> None:
    if target.is_nm:
        ok = is_valid_nm(W, target.n, target.m)
    else:
        ok = int((W == 0).sum()) >= int(prune_counts([W.numel()], target.sparsity)[0])
    if not ok:
        raise RuntimeError(f"{name} misses the sparsity target {target} (solver bug)")
