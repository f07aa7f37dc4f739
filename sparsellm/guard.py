"""The divergence guard: no block leaves the engine destroyed in silence.

After a block is pruned, its outputs are compared with the dense block's on the same inputs:
``‖B − B₀‖² / ‖B₀‖²``. A block is suspect when that error is above 1 (worse than outputting
zeros), not finite, or over ten times the previous block's; a block whose pruner failed
numerically is too. A suspect block is re-done from its dense weights with the fallback method
(SparseGPT, layer by layer) and the result with the lower error is kept, with the story in the
report. If the kept error is still above 1 the run stops with :class:`DivergenceError`.
Data-free methods (magnitude) have no outputs to compare and are not guarded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsellm.distributed import all_reduce_sum_
from sparsellm.engine import BlockJob, BlockPruner
from sparsellm.errors import NonFiniteError
from sparsellm.memory import to_host
from sparsellm.models import linear_weight, set_linear_weight
from sparsellm.report import BlockResult
from sparsellm.solvers import NumericalError

JUMP = 10.0  # a block error this many times the previous block's is suspect
FINITE_CHUNK = 1 << 24  # elements checked at once: a bounded temporary, not a block's worth


class DivergenceError(NumericalError):
    """A block's pruned output is worse than zeros even after the fallback."""


def output_error(outputs: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    """``‖B − B₀‖² / ‖B₀‖²`` over all batches and ranks, accumulated in float32."""
    sums = torch.zeros(2, dtype=torch.float64, device=dense[0].device)
    for out, ref in zip(outputs, dense, strict=True):
        _add_error(sums, out, ref)
    return _error_ratio(sums)


def _add_error(sums: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> None:
    ref32 = ref.float()
    sums[0] += (out.float() - ref32).square().sum().double()
    sums[1] += ref32.square().sum().double()


def _error_ratio(sums: torch.Tensor) -> float:
    all_reduce_sum_(sums)
    return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")


def _outputs_and_error(job: BlockJob, dense: list[torch.Tensor]) -> tuple[list, float]:
    """The block's outputs with its weights as they are now, and their :func:`output_error`
    against ``dense``, batch by batch: each dense batch is dropped from ``dense`` once
    compared, so the dense and the new outputs are never both held whole (one [N, d] less at
    the peak)."""
    sums = torch.zeros(2, dtype=torch.float64, device=job.options.device)
    outputs = job.output_batches()  # the next block's inputs

    def compare(out: torch.Tensor) -> None:
        batch = len(outputs)
        _add_error(sums, out, dense[batch].to(out.device))
        dense[batch] = None
        outputs.append(to_host(out))

    job.forward(compare)
    return outputs, _error_ratio(sums)


def _suspicion(error: float | None, previous: float | None) -> str | None:
    if error is None:
        return None
    if not math.isfinite(error) or error > 1:
        return f"block output error {error:.3g} > 1 (worse than outputting zeros)"
    if previous and error > JUMP * previous:
        return (
            f"block output error {error:.3g} is over {JUMP:g}x the previous block's {previous:.3g}"
        )
    return None


def _weights(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    # On the host: the device holds one block, not three copies of it.
    return {name: linear_weight(m).detach().to("cpu", copy=True) for name, m in layers.items()}


def _restore(layers: dict[str, nn.Module], weights: dict[str, torch.Tensor]) -> None:
    for name, weight in weights.items():
        set_linear_weight(layers[name], weight)


def _run(job: BlockJob, pruner: BlockPruner) -> BlockResult:
    """``pruner`` on ``job``, with the pruned outputs and their error where data allows."""
    result = pruner(job)
    for batch, dense in enumerate(result.dense_outputs or ()):
        name = job.adapter.block_name(job.index)
        _check_activations(dense, f"the dense outputs of {name}", batch)
    if job.inputs is not None and result.dense_outputs is not None:
        if result.outputs is None:
            result.outputs, result.output_error = _outputs_and_error(job, result.dense_outputs)
        else:
            result.output_error = output_error(result.outputs, result.dense_outputs)
        result.dense_outputs = None  # compared: no longer needed (some entries are gone)
    return result


def _nonfinite(tensor: torch.Tensor) -> int:
    """How many entries of ``tensor`` are NaN or Inf, checked in bounded chunks."""
    flat = tensor.detach().reshape(-1)
    return sum(
        int((~torch.isfinite(flat[i : i + FINITE_CHUNK])).sum())
        for i in range(0, flat.numel(), FINITE_CHUNK)
    )


def check_weights_finite(module: nn.Module, prefix: str = "") -> None:
    """Refuse NaN/Inf in ``module``'s resident weights (those on ``meta`` wait elsewhere),
    naming the first tensor that holds any."""
    for name, param in module.named_parameters():
        if param.is_floating_point() and not param.is_meta and (count := _nonfinite(param)):
            where = f"{prefix}.{name}" if prefix else name
            # float16 saturates at 65504: a float32 checkpoint cast to it can gain Infs.
            cast = " or exceeds float16's range (try --dtype bfloat16)"
            raise NonFiniteError(
                f"{where} holds {count} NaN/Inf values: the checkpoint is damaged "
                f"(re-download or re-export it){cast if param.dtype == torch.float16 else ''}"
            )


def check_finite(job: BlockJob) -> None:
    """Refuse a block whose weights or incoming activations hold NaN/Inf, naming where: a
    solver fed such numbers would fail far from the cause or write a broken model."""
    name = job.adapter.block_name(job.index)
    check_weights_finite(job.block, name)
    for batch, hidden in enumerate(job.inputs.hidden if job.inputs is not None else ()):
        _check_activations(hidden, f"the activations entering {name}", batch)


def _check_activations(hidden: torch.Tensor, what: str, batch: int) -> None:
    if count := _nonfinite(hidden):
        dtype = str(hidden.dtype).removeprefix("torch.")
        raise NonFiniteError(
            f"{what} hold {count} NaN/Inf values (calibration batch {batch}): the dense model "
            f"overflows on this text in {dtype}; try --dtype bfloat16 or float32"
        )


def prune_guarded(
    job: BlockJob, prune_block: BlockPruner, fallback: BlockPruner | None, previous: float | None
) -> BlockResult:
    """Prune ``job``'s block with ``prune_block``; re-do it with ``fallback`` if it diverges.
    NaN/Inf in the block's weights or inputs stop the run first (:func:`check_finite`)."""
    check_finite(job)
    if not job.layers:
        return BlockResult(path="dense", reason="every layer skipped")
    guarded = job.options.guard and job.inputs is not None
    dense = _weights(job.layers) if guarded and fallback is not None else None
    try:
        result = _run(job, prune_block)
        why = _suspicion(result.output_error, previous) if guarded else None
    except NumericalError as exc:
        if dense is None:
            raise
        result, why = None, f"numerical failure ({exc})"
    if why and dense is not None:
        result = _retry(job, result, fallback, dense, why)
    elif why:
        result.notes.append(f"{job.adapter.block_name(job.index)}: {why}; no fallback method")
    error = result.output_error
    if guarded and error is not None and not error <= 1:
        raise DivergenceError(
            f"{job.adapter.block_name(job.index)}: pruned block output error {error:.3g} is "
            "worse than outputting zeros; stopping (pass --no-guard to keep going)"
        )
    return result


def _retry(
    job: BlockJob,
    first: BlockResult | None,
    fallback: BlockPruner,
    dense: dict[str, torch.Tensor],
    why: str,
) -> BlockResult:
    """Re-do the block from ``dense`` weights with ``fallback``; keep the better result."""
    pruned = _weights(job.layers) if first is not None else None
    _restore(job.layers, dense)
    second = _run(job, fallback)
    first_error = first.output_error if first is not None else None
    second_error = second.output_error
    use_second = first is None or not (first_error <= second_error)
    if not use_second:
        _restore(job.layers, pruned)
    kept = second if use_second else first
    kept.fallback = {
        "why": why,
        "first_error": first_error,
        "fallback_error": second_error,
        "kept": "fallback" if use_second else "first",
    }
    kept.notes.append(
        f"{job.adapter.block_name(job.index)}: {why}; re-done with the fallback method "
        f"(error {second_error:.3g}), kept the {'fallback' if use_second else 'first'} result"
    )
    return kept
