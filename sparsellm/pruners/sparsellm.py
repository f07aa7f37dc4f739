"""``sparsellm``: attention by SparseGPT, then the feed-forward layers jointly (SparseLLM).

Per block:

0. on the first calibration batch, the dense block's layout is checked (:mod:`sparsellm.layout`):
   which wiring reproduces its FFN, and whether its output is ``r + FFN output``;
1. dense pass: Gram matrices of the attention layers and the dense block outputs ``B₀``;
2. the attention layers (and everything outside the FFN) are pruned with SparseGPT;
3. pass with the attention pruned: the FFN input ``X``, its output ``F`` and the block output
   ``B`` are recorded. *Residual path* (checked ``B = r + F``): the FFN is asked for
   ``Y = B₀ − r = B₀ − B + F``, so it absorbs the attention's error and the block output is
   matched to the dense one; the pruned outputs are ``r + FFN(X)`` without another forward.
   *General path* (a norm or scale after the FFN, a post-norm block, ...): the FFN's own dense
   output on ``X`` is the target and the engine runs the pruned block for its outputs;
4. ``sparsellm_ffn`` prunes up (gate) and down jointly through the auxiliary variables.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from sparsellm.distributed import all_reduce_sum_, broadcast_, world
from sparsellm.engine import BlockJob, BlockPruner
from sparsellm.layout import Layout, check_layout
from sparsellm.models import FeedForward, linear_weight
from sparsellm.pruners.layerwise import collect_statistics, solve_layers, write_solution
from sparsellm.pruners.registry import Method
from sparsellm.pruners.sparsegpt import SparseGPTOptions
from sparsellm.report import BlockResult
from sparsellm.settings import setting
from sparsellm.solvers import LayerStatistics, Statistic, sparsegpt
from sparsellm.solvers.sparsellm import FFNSolveResult, sparsellm_ffn

CHUNK_TOKENS = 2048  # tokens per chunk of the solver's passes over the data


@dataclass
class SparseLLMOptions(SparseGPTOptions):
    """Settings of the joint FFN solve; SparseGPT's (for the other layers, and the solve's own
    OBS sweeps and damping) come first."""

    epochs: int = setting(1, "alternation epochs of the joint FFN solve", "non_negative_int")
    alpha: float | None = setting(
        None, "penalty α of the joint FFN solve (default: automatic)", "positive_number"
    )
    beta: float | None = setting(
        None, "penalty β of the joint FFN solve (default: automatic)", "positive_number"
    )
    gamma: float | None = setting(
        None, "penalty γ of the joint FFN solve (default: automatic)", "positive_number"
    )


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if bias is not None else None


def _flat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])


def _capture_ffn(job: BlockJob, ffn: FeedForward) -> tuple[torch.Tensor, ...]:
    """FFN inputs, FFN outputs and block outputs over the calibration batches, as [N, d]."""
    inputs, outputs = [], []
    up, down = job.layers[ffn.up], job.layers[ffn.down]
    handles = [
        up.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach())),
        # A copy: some blocks (Falcon) add into the FFN output in place afterwards.
        down.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone())),
    ]
    try:
        blocks = job.forward()
    finally:
        for handle in handles:
            handle.remove()
    return _flat(inputs), _flat(outputs), _flat(blocks)


def _layout(job: BlockJob) -> Layout:
    """The checked layout, restricted to what ``--skip`` leaves prunable."""
    candidates = job.adapter.feed_forward_candidates(job.block)
    layout = check_layout(job.block, candidates, next(job.inputs.batches()))
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
    X: torch.Tensor,
    Y: torch.Tensor,
    options: SparseLLMOptions,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], FFNSolveResult]:
    """The joint FFN solve of ``FFN(X) ≈ Y``: the original weights by layer name and the new
    ones."""
    originals = {
        name: linear_weight(job.layers[name]).detach().to(torch.float32, copy=True)
        for name in ffn.names
    }
    reduce = all_reduce_sum_ if world()[1] > 1 else None
    with torch.no_grad():  # learned activations (xIELU) carry parameters that need no grad
        result = sparsellm_ffn(
            X,
            Y,
            target=job.target,
            activation=ffn.activation,
            chunk_size=CHUNK_TOKENS,
            device=job.options.device,
            reduce=reduce,
            **_split_weights(job, ffn, originals),
            **dataclasses.asdict(options),
        )
    new = {ffn.up: result.up, ffn.down: result.down}
    if ffn.gate:
        new[ffn.gate] = result.gate
    if ffn.fused_gate_up:
        new[ffn.up] = ffn.join_fused(result.gate, result.up)
    # Every rank solved the same problem; rank 0's answer keeps them bit-identical.
    new = {name: broadcast_(weight.contiguous()) for name, weight in new.items()}
    return originals, new, result


def _input_statistics(X: torch.Tensor) -> LayerStatistics:
    x32 = X.to(torch.float32)
    gram = all_reduce_sum_(x32.T @ x32)
    tokens = int(all_reduce_sum_(torch.tensor([float(x32.shape[0])], device=gram.device)))
    return LayerStatistics(tokens=tokens, hessian=gram / tokens)


def _as_batches(rows: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``rows`` [N, d] cut back into tensors shaped and typed as the batches in ``like``."""
    sizes = [t.numel() // t.shape[-1] for t in like]
    return [part.view(t.shape).to(t.dtype) for part, t in zip(rows.split(sizes), like, strict=True)]


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


def sparsellm_pruner(options: SparseLLMOptions) -> BlockPruner:
    """Block pruner for ``method="sparsellm"`` with the given options."""
    local_solve = functools.partial(
        sparsegpt, blocksize=options.blocksize, dampening=options.dampening
    )

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

        X, ffn_out, block_out = _capture_ffn(job, ffn)
        residual = block_out.float().sub_(ffn_out) if layout.residual else None  # r = B − F
        # Residual path: Y = B₀ − r, so the FFN's error *is* the block's output error.
        target = _flat(dense_out).float().sub_(residual) if layout.residual else ffn_out
        del block_out
        originals, new, result = _solve_ffn(job, ffn, X, target, options)
        del target, ffn_out
        input_stats = _input_statistics(X)
        rows += [
            write_solution(job, n, originals[n], new[n], None if n == ffn.down else input_stats)
            for n in ffn.names
        ]
        outputs = None
        if layout.residual:
            outputs = _as_batches(residual.add_(ffn.forward(X, job.layers)), job.inputs.hidden)
        return BlockResult(
            layers=rows,
            path="residual" if layout.residual else "ffn-output",
            reason=layout.reason,
            figures=_figures(layout, result),
            outputs=outputs,
            dense_outputs=dense_out,
        )

    return prune_block


SUMMARY = "global: attention by SparseGPT, the FFN jointly through auxiliary variables"
METHOD = Method("sparsellm", SUMMARY, True, SparseLLMOptions, sparsellm_pruner)
