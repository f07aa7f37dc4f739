"""SparseLLM for one feed-forward block: up, gate and down pruned jointly through auxiliaries.

Tokens are rows: ``X``, ``Y`` are ``[N, d]``; the auxiliaries ``z`` (up pre-activation), ``s``
(gate pre-activation, gated FFNs only) and ``p`` (input of the down projection) are ``[N, f]``.
With ``m = X W1ᵀ + b1``, ``n = X Wgᵀ + bg``, ``T = Y − b2`` and ``σ(s, z) = act(z)`` (plain FFN)
or ``act(s) ⊙ z`` (gated FFN; :func:`sparsellm.models.feed_forward.ffn_hidden`) the solver
minimises

    α_z‖z − m‖² + α_s‖s − n‖² + γ‖p − σ(s, z)‖² + β‖p W2ᵀ − T‖²

over sparse W1, Wg, W2 and free z, s, p by block-coordinate descent. Biases stay fixed.

Every step from the initial pruning to the end of the last epoch is an exact minimiser or
safeguarded, so ``history[k]["total"]`` never increases (up to float rounding). Where each
part lives:

* :mod:`.solve`: :func:`sparsellm_ffn`, the entry point: checks, builds, runs the stages.
* :mod:`.stages`: the schedule (init pass, initial pruning, epochs, final down fit).
* :mod:`.state`: the problem, the penalties and their automatic scaling, the iterate, the log.
* :mod:`.steps`: each weight step solved here or by one rank; the up/gate and down problems.
* :mod:`.weights`: the weight step (anchored LS, OBS, masked CG, the safeguard).
* :mod:`.auxiliaries`: the p, z and s steps.
* :mod:`.activations`: activations with their first and second derivatives.
"""

from __future__ import annotations

from sparsellm.solvers.sparsellm.activations import ActivationLike
from sparsellm.solvers.sparsellm.solve import sparsellm_ffn
from sparsellm.solvers.sparsellm.state import (
    FFNSolveResult,
    ProgressFn,
    ReduceFn,
    RowDifference,
    blend,
)

__all__ = [
    "ActivationLike",
    "FFNSolveResult",
    "ProgressFn",
    "ReduceFn",
    "RowDifference",
    "blend",
    "sparsellm_ffn",
]
