"""The SparseLLM block pruner: attention by SparseGPT, then the feed-forward layers jointly.

Per block (three forward passes, one more than SparseGPT):

1. dense pass: Gram matrices of the attention layers and the dense block output ``B₀``;
2. the attention layers are pruned with SparseGPT;
3. pass with the attention pruned: the FFN input ``X`` and output ``F`` and the block output
   ``B`` are recorded. In a pre-norm block ``B = h + F`` (``h`` the residual stream after the
   pruned attention), so the FFN is asked for ``Y = B₀ − h = B₀ − B + F``: the FFN absorbs the
   attention's error through the residual and the *block* output is matched to the dense one.
   Where a norm follows the residual sum (OPT-350m's post-norm layout) that identity does not
   hold and the FFN's own output on ``X`` is the target instead;
4. ``sparsellm_ffn`` prunes up (gate) and down jointly through the auxiliary variables.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from sparsellm.distributed import all_reduce_sum_, broadcast_, world
from sparsellm.engine import (
    BlockJob,
    BlockPruner,
    block_output,
    collect_statistics,
    solve_layers,
    write_solution,
)
from sparsellm.models import FeedForward, linear_weight
from sparsellm.solvers import LayerStatistics, Statistic, get_solver
from sparsellm.solvers.sparsellm import sparsellm_ffn


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if bias is not None else None


def _capture_ffn(
    job: BlockJob, up: nn.Module, down: nn.Module, batches: int | None = None
) -> tuple[torch.Tensor | None, ...]:
    """FFN inputs, FFN outputs and block outputs over the calibration batches (the first
    ``batches`` of them if given), as [N, d]; ``None`` for what no hook saw."""
    inputs, outputs = [], []
    handles = [
        up.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach())),
        # A copy: some blocks (Falcon) add into the FFN output in place afterwards.
        down.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone())),
    ]
    try:
        with torch.no_grad():
            blocks = [
                block_output(job.block(h, *a, **k))
                for h, a, k in itertools.islice(job.inputs.batches(), batches)
            ]
    finally:
        for handle in handles:
            handle.remove()

    def flat(parts: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts]) if parts else None

    return flat(inputs), flat(outputs), flat(blocks)


@torch.no_grad()
def _wiring_reproduces_block(job: BlockJob, ffn: FeedForward, tolerance: float = 1e-3) -> bool:
    """Run the first calibration batch through the block and check that ``ffn`` computes what
    the block's FFN does (relative error below ``tolerance``)."""
    up, down = job.layers.get(ffn.up), job.layers.get(ffn.down)
    if up is None or down is None:
        return True  # --skip keeps the FFN out of the joint solve anyway
    x, y, _ = _capture_ffn(job, up, down, batches=1)
    failed = x is None or y is None
    if not failed:
        error = (ffn_forward(x, job.layers, ffn) - y.float()).norm() / y.float().norm()
        failed = not bool(error <= tolerance)
    # Ranks must agree on the path they take, or their collectives would not pair up.
    failures = torch.tensor([float(failed)], device=job.options.device)
    return float(all_reduce_sum_(failures)) == 0.0


def sparsellm_pruner(
    epochs: int = 1,
    alpha: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    chunk_size: int = 2048,
) -> BlockPruner:
    """Block pruner for ``method="sparsellm"`` with the given solver options."""
    sparsegpt = get_solver("sparsegpt")

    def prune_block(job: BlockJob) -> list[torch.Tensor] | None:
        ffn = job.adapter.feed_forward(job.block)
        if ffn is not None and ffn.inferred and not _wiring_reproduces_block(job, ffn):
            job.report.notes.append(
                f"{job.adapter.block_name(job.index)}: the inferred feed-forward wiring does not "
                "reproduce the block's FFN output; pruned with SparseGPT"
            )
            ffn = None
        if ffn is None:
            if job.index == 0:
                job.report.notes.append(
                    f"{job.adapter.family} blocks: feed-forward wiring unknown, so every layer "
                    "was pruned with SparseGPT (no joint FFN solve)"
                )
            ffn_names: list[str] = []
            joint = False
        else:
            ffn_names = [name for name in (ffn.up, ffn.gate, ffn.down) if name]
            joint = all(name in job.layers for name in ffn_names)
        local = {n: m for n, m in job.layers.items() if not (joint and n in ffn_names)}

        stats, dense_out = collect_statistics(job, local, Statistic.HESSIAN, keep_outputs=True)
        solve_layers(job, local, stats, sparsegpt)
        if not joint:
            return None

        up, down = job.layers[ffn.up], job.layers[ffn.down]
        gate = job.layers[ffn.gate] if ffn.gate else None
        gated = gate is not None or ffn.fused_gate_up
        X, ffn_out, block_out = _capture_ffn(job, up, down)
        dense = torch.cat([o.reshape(-1, o.shape[-1]) for o in dense_out])
        residual = job.adapter.ffn_sees_residual()
        target = dense - block_out + ffn_out if residual else ffn_out
        # With the residual target, the FFN's error *is* the block's output error.
        to_block_error = None
        if residual:
            ratio = torch.stack([target.square().sum(), dense.square().sum()]).double()
            all_reduce_sum_(ratio)
            to_block_error = float(ratio[0] / ratio[1])
        residual_stream = block_out - ffn_out if residual else None
        del dense, block_out, dense_out

        originals = {
            name: linear_weight(job.layers[name]).detach().to(torch.float32, copy=True)
            for name in ffn_names
        }
        up_weight, up_bias = originals[ffn.up], _bias(up)
        gate_weight = originals[ffn.gate] if gate is not None else None
        gate_bias = _bias(gate) if gate is not None else None
        if ffn.fused_gate_up:  # rows [gate; up] of one layer: solved as two matrices
            gate_weight, up_weight = up_weight.chunk(2)
            if up_bias is not None:
                gate_bias, up_bias = up_bias.chunk(2)
        result = sparsellm_ffn(
            X,
            target,
            up_weight,
            up_bias,
            originals[ffn.down],
            _bias(down),
            job.target,
            gate=gate_weight if gated else None,
            gate_bias=gate_bias if gated else None,
            activation=ffn.activation,
            epochs=epochs,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            chunk_size=chunk_size,
            device=job.options.device,
            dampening=job.options.dampening,
            blocksize=job.options.blocksize,
            reduce=all_reduce_sum_ if world()[1] > 1 else None,
        )
        x32 = X.to(torch.float32)
        gram = all_reduce_sum_(x32.T @ x32)
        tokens = int(all_reduce_sum_(torch.tensor([float(x32.shape[0])], device=gram.device)))
        input_stats = LayerStatistics(tokens=tokens, hessian=gram / tokens)
        new = {ffn.up: result.up, ffn.down: result.down}
        if gate is not None:
            new[ffn.gate] = result.gate
        if ffn.fused_gate_up:
            new[ffn.up] = torch.cat([result.gate, result.up])
        for name in ffn_names:
            # Every rank solved the same problem; rank 0's answer keeps them bit-identical.
            new[name] = broadcast_(new[name].contiguous())
        for name in ffn_names:
            write_solution(
                job, name, originals[name], new[name], input_stats if name != ffn.down else None
            )
        if to_block_error is not None:
            for record in result.history:
                record["block_output_error"] = record["output_error"] * to_block_error
        outputs = None
        if residual_stream is not None:
            # Pre-norm block: output = residual stream + FFN(X); only the FFN needs recomputing.
            out = residual_stream.add_(ffn_forward(X, job.layers, ffn))
            shapes = [h.shape for h in job.inputs.hidden]
            dtype = job.inputs.hidden[0].dtype
            outputs = [
                part.view(shape).to(dtype)
                for part, shape in zip(
                    out.split([s.numel() // s[-1] for s in shapes]), shapes, strict=True
                )
            ]
        job.report.blocks.append(
            {
                "block": job.index,
                "ffn_output_error": result.output_error,
                "block_output_error": (
                    result.output_error * to_block_error if to_block_error is not None else None
                ),
                "penalties": {
                    "alpha_up": result.alpha_up,
                    "alpha_gate": result.alpha_gate,
                    "beta": result.beta,
                    "gamma": result.gamma,
                },
                "epochs": result.history,
            }
        )

        return outputs

    return prune_block


@torch.no_grad()
def ffn_forward(
    X: torch.Tensor, layers: dict[str, nn.Module], ffn: FeedForward, chunk: int = 4096
) -> torch.Tensor:
    """The feed-forward output for rows ``X`` [N, d] with the layers' current weights (float32)."""

    def affine(x: torch.Tensor, name: str) -> torch.Tensor:
        module = layers[name]
        bias = _bias(module)
        return F.linear(
            x, linear_weight(module).float(), bias.float() if bias is not None else None
        )

    parts = []
    for start in range(0, X.shape[0], chunk):
        x = X[start : start + chunk].float()
        if ffn.fused_gate_up:
            gate, up = affine(x, ffn.up).chunk(2, dim=-1)
            hidden = ffn.activation(gate) * up
        elif ffn.gate:
            hidden = ffn.activation(affine(x, ffn.gate)) * affine(x, ffn.up)
        else:
            hidden = ffn.activation(affine(x, ffn.up))
        parts.append(affine(hidden, ffn.down))
    return torch.cat(parts)
