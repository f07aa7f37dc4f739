"""One SparseLLM FFN solve of one block, timed by stage: profile a block in a minute instead
of a whole prune.

Usage: python bench/profile_block.py [--block 15] [--sparsity 0.7 | --pattern 2:4]
       [--model PATH.gguf|DIR] [--shared ../shared] [--calibration WINDOWS.pt] [--cprofile 15]
       [--holdout 16 [--fit 32]]
       [--set ridge=1 --set epochs=2 ...]

The block's FFN input, dense FFN output and block output are captured from the *dense* model
on the benchmark's calibration windows (``calib.pt``, or ``--calibration``'s), then
``sparsellm_ffn`` runs with the pruner's defaults (ADMM supports, one epoch, each token weighted
``1 / ‖B_t‖²``). Printed: seconds per stage of the solve, each ADMM loop's shape, iterations
and seconds, the output error, and with ``--cprofile N`` the N functions with the most time of
their own. The FFN's wiring is the adapter's claim, not checked here (the pruner checks it).

``--holdout W`` fits on all but the last W calibration windows and also prints the error on
those W (same token weights): how much of the fit is overfitting to the calibration tokens,
the question a regulariser has to answer; ``--fit W`` fits on the first W windows only (how
the held-out error falls as the calibration grows). ``--set KEY=VALUE`` passes a keyword of
``sparsellm_ffn`` (``ridge``, ``epochs``, ``dampening``, ``admm_iterations``, ...).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import cProfile
import functools
import pstats
import time
from pathlib import Path

import torch
from run_one import bundled_gguf

import sparsellm.solvers.admm as admm_module
from sparsellm.loading import load_model_and_tokenizer
from sparsellm.masks import SparsityTarget
from sparsellm.models import get_adapter, linear_weight
from sparsellm.models.feed_forward import ffn_hidden
from sparsellm.pruners.ffn_data import Goal, token_weights
from sparsellm.solvers.sparsellm import sparsellm_ffn
from sparsellm.solvers.sparsellm.state import affine


def capture(model: torch.nn.Module, index: int, windows: torch.Tensor) -> dict:
    """Block ``index``'s FFN input X, FFN output Y and block output B, as [tokens, d] rows."""
    adapter = get_adapter(model)
    block = adapter.blocks()[index]
    ffn = adapter.feed_forward(block)
    if ffn is None:
        raise SystemExit(f"block {index} has no feed-forward the adapter recognises")
    rows: dict[str, list[torch.Tensor]] = {"X": [], "Y": [], "B": []}

    def keep(name: str, tensor: torch.Tensor) -> None:
        rows[name].append(tensor.detach().reshape(-1, tensor.shape[-1]).float())

    class Stop(Exception):
        pass

    def stop(module, inputs, output):
        keep("B", output[0] if isinstance(output, tuple) else output)
        raise Stop

    hooks = [
        block.get_submodule(ffn.up).register_forward_hook(lambda m, i, o: keep("X", i[0])),
        block.get_submodule(ffn.down).register_forward_hook(lambda m, i, o: keep("Y", o)),
        block.register_forward_hook(stop),
    ]
    with torch.no_grad():
        for batch in windows.split(8):
            with contextlib.suppress(Stop):
                model(batch)
    for hook in hooks:
        hook.remove()
    data = {name: torch.cat(parts) for name, parts in rows.items()}

    def parameters(name: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if name is None:
            return None, None
        module = block.get_submodule(name)
        weight, bias = linear_weight(module).detach().float(), getattr(module, "bias", None)
        return weight, None if bias is None else bias.detach().float()

    (up, up_bias), (gate, gate_bias) = parameters(ffn.up), parameters(ffn.gate)
    if ffn.fused_gate_up:
        gate, up = ffn.split_fused(up)
        if up_bias is not None:
            gate_bias, up_bias = ffn.split_fused(up_bias)
    down, down_bias = parameters(ffn.down)
    data.update(up=up, up_bias=up_bias, gate=gate, gate_bias=gate_bias, down=down)
    data.update(down_bias=down_bias, activation=ffn.activation)
    return data


def time_admm_loops() -> list[tuple[tuple[int, int], int, float]]:
    """Wrap ADMM's loop: (shape, iterations, seconds) of each call, appended as they run."""
    calls = []
    inner = admm_module.sparse_least_squares

    @functools.wraps(inner)
    def timed(cross, start, *args, **kwargs):
        began = time.perf_counter()
        solution = inner(cross, start, *args, **kwargs)
        calls.append((tuple(start.shape), solution.iterations, time.perf_counter() - began))
        return solution

    admm_module.sparse_least_squares = timed
    return calls


def heldout_error(data: dict, result, rows: slice, weights: torch.Tensor) -> float:
    """The solved FFN's token-weighted relative output error on tokens ``rows``."""
    X, Y, w = data["X"][rows], data["Y"][rows], weights[rows]
    gate = None if result.gate is None else affine(X, result.gate, data["gate_bias"])
    hidden = ffn_hidden(data["activation"], gate, affine(X, result.up, data["up_bias"]))
    error = affine(hidden, result.down, data["down_bias"]) - Y
    return float((error.square().sum(1) * w).sum() / (Y.square().sum(1) * w).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", type=int, default=15)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--pattern", help="N:M instead of --sparsity, e.g. 2:4")
    parser.add_argument("--model", help="GGUF file or model directory (default: the bundled one)")
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--calibration", help="token windows (.pt; default: SHARED/bench/calib.pt)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N")
    parser.add_argument("--holdout", type=int, default=0, metavar="W", help="windows held out")
    parser.add_argument("--fit", type=int, metavar="W", help="windows fitted (default: the rest)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    try:
        options = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in args.set)}
    except (ValueError, SyntaxError):
        parser.error(f"--set takes KEY=VALUE with a Python literal value, got {args.set}")

    target = SparsityTarget.parse(None if args.pattern else args.sparsity, args.pattern)
    windows = torch.load(args.calibration or Path(args.shared) / "bench" / "calib.pt")
    if not 0 <= args.holdout < windows.shape[0]:
        parser.error(f"--holdout must be in [0, {windows.shape[0]}), got {args.holdout}")
    fitted = windows.shape[0] - args.holdout
    if args.fit is not None and not 1 <= args.fit <= fitted:
        parser.error(f"--fit must be in [1, {fitted}] (windows not held out), got {args.fit}")
    model, _ = load_model_and_tokenizer(args.model or bundled_gguf(), "float32")
    data = capture(model, args.block, windows)
    del model
    weights = token_weights(Goal([data["B"]], None, 0.0))  # the pruner's rule; B* = B here
    fit = slice(0, (args.fit or fitted) * windows.shape[1])
    held_out = slice(fitted * windows.shape[1], None)  # the last --holdout windows
    loops = time_admm_loops()
    solve = functools.partial(
        sparsellm_ffn,
        data["X"][fit],
        data["Y"][fit],
        data["up"],
        data["up_bias"],
        data["down"],
        data["down_bias"],
        target,
        gate=data["gate"],
        gate_bias=data["gate_bias"],
        activation=data["activation"],
        weight_solver="admm",
        token_weights=weights[fit],
        **options,
    )
    profile = cProfile.Profile() if args.cprofile else None
    began = time.perf_counter()
    result = profile.runcall(solve) if profile is not None else solve()
    seconds = time.perf_counter() - began
    stages = ", ".join(f"{k} {v:.2f}" for k, v in result.info["seconds"].items())
    print(f"block {args.block}, {target}, {fit.stop} tokens {options}: {seconds:.2f} s ({stages})")
    for shape, iterations, spent in loops:
        print(f"  ADMM loop {shape[0]}x{shape[1]}: {iterations} iterations, {spent:.2f} s")
    print(f"  FFN output error (relative, token-weighted): {result.output_error:.5f}")
    if args.holdout:
        held = heldout_error(data, result, held_out, weights)
        print(f"  on the {args.holdout} held-out windows: {held:.5f}")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.cprofile)


if __name__ == "__main__":
    main()
