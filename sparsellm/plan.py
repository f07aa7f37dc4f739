"""``sparsellm plan``: device memory, host memory and disk a prune needs, from a config alone.

The figures come from :mod:`sparsellm.memory`, the functions the engine sizes its chunks with
(``Budget.forward_windows``, ``Budget.solver_tokens``), applied to a :class:`BlockShape` read
from the config (no weights are loaded). Modes: the model in memory, the model offloaded to
disk (``--offload disk``: host holds the non-block tensors and one block), and K ranks under
torchrun (each rank holds 1/K of the activations; the model per rank unless offloaded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from sparsellm.memory import (
    BlockShape,
    Budget,
    block_bytes,
    device_phase_bytes,
    guard_copy_bytes,
    host_activation_bytes,
    parse_size,
)
from sparsellm.shapes import config_sizes

PLAN_DEVICE_MEMORY = "24GiB"  # the budget of a plan: there is no device to ask
GIB = 1024**3
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Workload:
    """What a prune would do: method, calibration size, chunking settings."""

    method: str
    nsamples: int
    seqlen: int
    epochs: int = 1
    batch_size: int = 32
    device_type: str = "cuda"
    ffn_solver: str = "admm"  # SparseLLM's weight-step supports (ADMM holds an f x f basis)
    correction: float = 0.5  # SparseLLM's block targets (> 0: the dense model's stream too)


def plan_dtype(config: object, name: str) -> torch.dtype:
    """The weights' dtype: ``name``, or for ``auto`` the config's (float32 if it names none)."""
    if name != "auto":
        return _DTYPES[name]
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = _DTYPES.get(stored)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def mode_figures(
    shape: BlockShape,
    other_params: int,
    layers: int,
    work: Workload,
    budget: Budget,
    ranks: int = 1,
    offload: bool = False,
) -> dict[str, int]:
    """Bytes of one mode: device peak (per process), host peak per process, disk."""
    from sparsellm.pruners.sparsellm import CHUNK_TOKENS

    tokens = -(-work.nsamples // ranks) * work.seqlen  # the largest rank's share
    windows = min(work.batch_size, -(-work.nsamples // ranks))
    phases = device_phase_bytes(
        shape,
        work.seqlen,
        tokens,
        work.method,
        budget,
        windows,
        CHUNK_TOKENS,
        work.device_type,
        work.ffn_solver,
    )
    device = block_bytes(shape) + max(phases["forward"], phases["solve"])
    # The least the engine can run in: one window per forward, the smallest solver chunk
    # (a one-byte budget makes the same functions pick their minimum).
    least = device_phase_bytes(
        shape,
        work.seqlen,
        tokens,
        work.method,
        Budget(1),
        windows,
        CHUNK_TOKENS,
        work.device_type,
        work.ffn_solver,
    )
    minimum = block_bytes(shape) + max(least["forward"], least["solve"])
    model = (layers * shape.params + other_params) * shape.dtype_bytes
    dense_model = work.correction > 0
    activations = host_activation_bytes(
        shape, tokens, work.method, work.epochs, offload, dense_model
    )
    pruning = activations + guard_copy_bytes(shape, work.method)
    if offload:
        # The tensors outside the blocks are read for the capture (next to the inputs it
        # records) and dropped; while blocks are pruned one of them is resident.
        capture = other_params * shape.dtype_bytes + tokens * shape.hidden * shape.dtype_bytes
        host = max(capture, block_bytes(shape) + pruning)
    else:
        host = model + pruning
    return {
        "device_peak": device,
        "device_minimum": minimum,
        "fits": budget.total is None or minimum <= budget.total,
        "host_peak": host,
        "host_total": host * ranks,
        "disk": model,  # the output checkpoint (offload reads the source in place)
        "activations": activations,
        "forward_windows": phases["windows"],
        "solver_chunk_tokens": phases["chunk"],
    }


def make_plan(config: object, work: Workload, dtype: str, device_memory: str, ranks: int) -> dict:
    """Every mode's figures for the model ``config`` describes, as a JSON-ready dict."""
    sizes = config_sizes(config)
    shape = BlockShape.of_config(config, plan_dtype(config, dtype))
    budget = Budget(parse_size(device_memory))
    modes = {
        "memory": (1, False),
        "disk": (1, True),
        f"{ranks} ranks": (ranks, False),
        f"{ranks} ranks, disk": (ranks, True),
    }
    figures = {
        name: mode_figures(shape, sizes.other_params, sizes.layers, work, budget, k, offload)
        for name, (k, offload) in modes.items()
    }
    return {
        "workload": vars(work) | {"dtype": str(plan_dtype(config, dtype)).split(".")[-1]},
        "device_memory": device_memory,
        "shape": vars(shape) | {"layers": sizes.layers, "other_params": sizes.other_params},
        "modes": figures,
    }


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def format_plan(plan: dict, model: str) -> str:
    """The table ``sparsellm plan`` prints."""
    work = plan["workload"]
    lines = [
        f"{model}: {work['method']}, {work['nsamples']} x {work['seqlen']} tokens, "
        f"{work['dtype']}; device budget {plan['device_memory']} (given, no device is asked)",
        f"{'mode':<16}{'device peak':>13}{'device min':>12}{'host/process':>14}"
        f"{'host, all':>12}{'disk':>11}",
    ]
    for name, f in plan["modes"].items():
        lines.append(
            f"{name:<16}{_gib(f['device_peak']):>13}{_gib(f['device_minimum']):>12}"
            f"{_gib(f['host_peak']):>14}{_gib(f['host_total']):>12}{_gib(f['disk']):>11}"
            + ("" if f["fits"] else "  (does not fit the budget)")
        )
    lines.append(
        "device peak: what the engine uses under the budget (chunks grow with it up to a cap); "
        "device min: the least it runs in"
    )
    return "\n".join(lines)


def dumps(plan: dict) -> str:
    """``plan`` as JSON."""
    return json.dumps(plan, indent=1)
