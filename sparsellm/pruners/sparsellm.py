"""``sparsellm``: attention layer by layer (ADMM, or SparseGPT), then the feed-forward layers
jointly (SparseLLM), each of their weight steps supported by ADMM (or one OBS sweep).

Per block:

0. on the first calibration batch, the dense block's layout is checked (:mod:`sparsellm.layout`):
   which wiring reproduces its FFN, and whether its output is ``r + FFN output``;
1. dense pass: Gram matrices of the attention layers and the dense block outputs ``B₀``;
2. the attention layers (and everything outside the FFN) are pruned by ``layer_solver``;
3. pass with the attention pruned: the FFN input ``X`` is recorded, and the block output.
   *Residual path* (checked ``B = r + F``): the FFN's layers output zeros in this pass, so
   the block output is ``r`` (and the pass costs the attention alone); the FFN is asked for
   ``Y = B* − r``, so it absorbs the attention's error and the block output is matched to
   ``B* = B₀ + λ (Bₘ − B₀)``: ``B₀`` is the dense block's output on the pruned inputs
   (SparseLLM's original target, λ = ``correction`` = 0), ``Bₘ`` the dense *model's* output
   of this block (``BlockJob.reference``: the engine runs each dense block on a second
   stream of activations that never saw pruning). ``Bₘ − B₀`` is what the blocks before lost,
   as this block passes it on; with λ > 0 the block makes up that share of it (default 0.5).
   The pruned outputs are ``r + FFN(X)`` without another forward.
   *General path* (a norm or scale after the FFN, a post-norm block, ...): the FFN's own dense
   output on ``X`` is the target and the engine runs the pruned block for its outputs;
4. ``sparsellm_ffn`` prunes up (gate) and down jointly through the auxiliary variables; on
   the residual path each token's terms weigh ``1 / ‖B*_t‖²`` (``token_weights``), its error
   relative to its norm, as the next norm reads it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from sparsellm.distributed import all_reduce_sum_, ranks, world
from sparsellm.engine import BlockJob, BlockPruner, block_shape
from sparsellm.guard import output_error
from sparsellm.layout import Layout, check_layout, first_windows
from sparsellm.masks import SparsityTarget
from sparsellm.models import FeedForward, linear_weight
from sparsellm.pruners.admm import ADMMOptions
from sparsellm.pruners.ffn_data import FFNData, Goal, capture_ffn, pruned_outputs, token_weights
from sparsellm.pruners.layerwise import collect_statistics, solve_layers, write_solution
from sparsellm.pruners.registry import Method
from sparsellm.pruners.sparsegpt import SparseGPTOptions
from sparsellm.report import BlockResult
from sparsellm.settings import setting
from sparsellm.solvers import LayerStatistics, Statistic, sparsegpt
from sparsellm.solvers.admm import admm
from sparsellm.solvers.sparsellm import FFNSolveResult, sparsellm_ffn

CHUNK_TOKENS = 2048  # tokens per chunk of the solver's passes (no device budget: the CPU)
LAYOUT_WINDOWS = 4  # calibration windows the layout check runs the dense block on
# The options the joint FFN solve takes (the others configure the layers outside the FFN).
_FFN_OPTIONS = ("epochs", "alpha", "beta", "gamma", "dampening", "blocksize", "ridge")


@dataclass
class SparseLLMOptions(ADMMOptions, SparseGPTOptions):
    """Settings of the joint FFN solve; SparseGPT's and ADMM's (for the other layers, and the
    solve's own OBS sweeps and damping) come first."""

    layer_solver: str = setting(
        "admm",
        "solver of the layers outside the FFN (attention): admm or sparsegpt",
        choices=("admm", "sparsegpt"),
    )

    ffn_solver: str = setting(
        "admm",
        "how each weight step of the joint FFN solve finds its support: admm or sparsegpt "
        "(one OBS sweep: faster, less accurate)",
        choices=("admm", "sparsegpt"),
    )
    correction: float = setting(
        0.5,
        "share of the earlier blocks' error each block's FFN is asked to undo: its target "
        "moves from the dense block's output on the pruned inputs (0, SparseLLM's original) "
        "towards the dense model's own output (1)",
        "fraction_number",
    )
    epochs: int = setting(1, "alternation epochs of the joint FFN solve", "non_negative_int")
    token_weights: str = setting(
        "relative",
        "how the FFN's fit counts each token's error: relative (to the norm of the token's "
        "block output, as the next norm reads it) or uniform (a plain sum, SparseLLM's original)",
        choices=("relative", "uniform"),
    )
    ridge: float = setting(
        0.0,
        "pull of the FFN's weight fits towards the dense weights: λ = ridge x the mean squared "
        "norm of each layer's input rows, i.e. ridge x in_features / tokens of its Gram's mean "
        "diagonal (0: none, SparseLLM's original objective)",
        "non_negative_number",
    )
    alpha: float | None = setting(
        None, "penalty α of the joint FFN solve (default: automatic)", "positive_number"
    )
    beta: float | None = setting(
        None, "penalty β of the joint FFN solve (default: automatic)", "positive_number"
    )
    gamma: float | None = setting(
        None, "penalty γ of the joint FFN solve (default: automatic)", "positive_number"
    )

    @property
    def follows_dense_model(self) -> bool:
        """The engine keeps the dense model's activations for this run (``correction`` > 0)."""
        return self.correction > 0


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if bias is not None else None


def _layout(job: BlockJob) -> Layout:
    """The checked layout, restricted to what ``--skip`` leaves prunable."""
    candidates = job.adapter.feed_forward_candidates(job.block)
    batch = next(job.inputs.batches())
    try:  # a few windows are evidence enough, at a fraction of a whole batch's memory
        layout = check_layout(job.block, candidates, first_windows(batch, LAYOUT_WINDOWS))
    except (RuntimeError, ValueError, IndexError):  # a block that cannot run on the cut batch
        layout = check_layout(job.block, candidates, batch)
    if layout.ffn is not None and not all(n in job.layers for n in layout.ffn.names):
        return Layout(None, False, "part of the FFN is skipped (left dense)")
    return layout


def _split_weights(
    job: BlockJob, ffn: FeedForward, originals: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor | None]:
    """The solver's matrices: up, gate (a fused gate-up layer solved as two) and down."""
    up, up_bias = originals[ffn.up], _bias(job.layers[ffn.up])
    gate = originals[ffn.gate] if ffn.gate else None
    gate_bias = _bias(job.layers[ffn.gate]) if ffn.gate else None
    if ffn.fused_gate_up:
        gate, up = ffn.split_fused(up)
        if up_bias is not None:
            gate_bias, up_bias = ffn.split_fused(up_bias)
    down, down_bias = originals[ffn.down], _bias(job.layers[ffn.down])
    return dict(
        up=up, up_bias=up_bias, gate=gate, gate_bias=gate_bias, down=down, down_bias=down_bias
    )


def _solve_ffn(
    job: BlockJob,
    ffn: FeedForward,
    data: FFNData,
    options: SparseLLMOptions,
    token_weights: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], FFNSolveResult]:
    """The joint FFN solve of ``FFN(X) ≈ target`` (each token's terms weighted by
    ``token_weights``): the original weights by layer name and the new ones."""
    originals = {
        name: linear_weight(job.layers[name]).detach().to(torch.float32, copy=True)
        for name in ffn.names
    }
    reduce = all_reduce_sum_ if world()[1] > 1 else None
    device = job.options.device
    shape = block_shape(job.adapter, job.block, data.X.shape[1])
    chunk = job.options.budget.solver_tokens(shape, CHUNK_TOKENS, device.type)
    weight_solver = options.ffn_solver
    if weight_solver == "admm" and not job.options.budget.fits_ffn_admm(shape):
        weight_solver = "sparsegpt"  # the f x f eigenbasis does not fit: OBS sweeps (reported)
    with torch.no_grad():  # learned activations (xIELU) carry parameters that need no grad
        result = sparsellm_ffn(
            data.X,
            data.target,
            target=_ffn_targets(job, ffn),
            activation=ffn.activation,
            chunk_size=chunk,
            device=device,
            reduce=reduce,
            ranks=ranks(),
            weight_solver=weight_solver,
            admm_iterations=options.admm_iterations,
            token_weights=token_weights,
            **_split_weights(job, ffn, originals),
            **{name: getattr(options, name) for name in _FFN_OPTIONS},
        )
    new = {ffn.up: result.up, ffn.down: result.down}
    if ffn.gate:
        new[ffn.gate] = result.gate
    if ffn.fused_gate_up:
        new[ffn.up] = ffn.join_fused(result.gate, result.up)
    # No broadcast here: each weight step was solved on one rank and broadcast from there
    # (``ranks``), so every rank already holds the same final weights, bit for bit.
    return originals, new, result


def _ffn_targets(job: BlockJob, ffn: FeedForward) -> dict[str, SparsityTarget]:
    """Each FFN matrix's target by the solver's names (a fused gate-up layer's halves both
    take the layer's)."""
    targets = {"up": job.target_of(ffn.up), "down": job.target_of(ffn.down)}
    if ffn.gate or ffn.fused_gate_up:
        targets["gate"] = job.target_of(ffn.gate or ffn.up)
    return targets


def _figures(layout: Layout, result: FFNSolveResult) -> dict:
    return {
        "residual_test_deviation": layout.deviation,
        "ffn_output_error": result.output_error,
        "penalties": {
            "alpha_up": result.alpha_up,
            "alpha_gate": result.alpha_gate,
            "beta": result.beta,
            "gamma": result.gamma,
        },
        "epochs": result.history,
        "solver": result.info,
    }


def _local_solver(options: SparseLLMOptions) -> functools.partial:
    """The per-layer solve of the layers outside the FFN, with the run's options."""
    if options.layer_solver == "admm":
        return functools.partial(
            admm,
            iterations=options.admm_iterations,
            cg_iterations=options.cg_iterations,
            dampening=options.dampening,
        )
    return functools.partial(sparsegpt, blocksize=options.blocksize, dampening=options.dampening)


def sparsellm_pruner(options: SparseLLMOptions) -> BlockPruner:
    """Block pruner for ``method="sparsellm"`` with the given options."""
    local_solve = _local_solver(options)

    def prune_block(job: BlockJob) -> BlockResult:
        layout = _layout(job)
        ffn = layout.ffn
        local = {n: m for n, m in job.layers.items() if ffn is None or n not in ffn.names}
        stats, dense_out = collect_statistics(job, local, Statistic.HESSIAN, keep_outputs=True)
        rows = solve_layers(job, local, stats, local_solve)
        if ffn is None:
            return BlockResult(
                layers=rows, path="layerwise", reason=layout.reason, dense_outputs=dense_out
            )

        correction = options.correction if job.reference is not None else 0.0
        goal = Goal(dense_out, job.reference, correction)  # the block output to match
        data = capture_ffn(job, ffn, goal, layout.residual)
        relative = options.token_weights == "relative" and layout.residual
        originals, new, result = _solve_ffn(
            job, ffn, data, options, token_weights(goal, job.options.device) if relative else None
        )
        data.target = None  # not needed again (general path: a float32 [N, d])
        input_stats = LayerStatistics(tokens=result.tokens, hessian=result.input_gram)
        rows += [
            write_solution(job, n, originals[n], new[n], None if n == ffn.down else input_stats)
            for n in ffn.names
        ]
        outputs = pruned_outputs(job, ffn, data) if layout.residual else None
        del data
        figures = _figures(layout, result)
        figures["correction"] = correction if layout.residual else 0.0
        figures["token_weights"] = "relative" if relative else "uniform"
        if outputs is not None and job.reference is not None:
            figures["model_output_error"] = output_error(outputs, job.reference)
        return BlockResult(
            layers=rows,
            path="residual" if layout.residual else "ffn-output",
            reason=layout.reason,
            figures=figures,
            outputs=outputs,
            dense_outputs=dense_out,
        )

    return prune_block


SUMMARY = "global: attention by ADMM, the FFN jointly through auxiliary variables"
METHOD = Method("sparsellm", SUMMARY, True, SparseLLMOptions, sparsellm_pruner)
