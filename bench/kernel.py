"""Sparse kernel vs dense torch on one Linear layer (protocol sotu-smollm2-decode, kernel figure).

    python bench/kernel.py [--rows 11008 --cols 4096] [--threads 2] [--repeats 20]
        [--sparsity 0.5,0.6,0.7,0.8,0.9,2:4] [--dtypes float32,bfloat16] [--tokens 1]
        [--index auto] [--path auto] [--json]

For each sparsity (random unstructured masks; ``2:4`` keeps the 2 largest of every 4) and
dtype: the time of ``SparseLinear`` and of ``torch.nn.functional.linear`` on the same weights,
interleaved, best of ``--repeats``, and their ratio. ``--tokens 1,8,32,512`` measures batches;
``--path kernel`` / ``tiles`` forces the batched kernel / the tile path (their crossover is
``sparsellm.sparse.linear.TOKEN_LIMITS``). The machine must be quiet: the share of CPU time
other processes took during each measurement is printed (``busy``); re-run unless it is ~0.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from sparsellm.sparse import SparseLinear, kernel_unavailable
from sparsellm.sparse.bench import OthersShare


def others_share(run: Callable[[], None]) -> float | None:
    """Run ``run``; the share of the machine's CPU time other processes took meanwhile."""
    with OthersShare() as others:
        run()
    return others.share


def weight(rows: int, cols: int, sparsity: str, seed: int = 0) -> torch.Tensor:
    """A float32 normal weight with the sparsity (a fraction, or ``2:4``)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if sparsity == "2:4":
        groups = w.view(rows, -1, 4)
        keep = groups.abs().topk(2, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
        return (groups * mask).view(rows, cols)
    return w * (torch.rand(rows, cols, generator=g) >= float(sparsity))


def best_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each callable, the callables interleaved round by round."""
    for run in runs.values():
        run()  # compile, first touch
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def measure(args: argparse.Namespace, sparsity: str, dtype: torch.dtype, tokens: int) -> dict:
    """One row: dense and sparse milliseconds and their ratio."""
    w = weight(args.rows, args.cols, sparsity).to(dtype)
    pattern = "2:4" if sparsity == "2:4" else "unstructured"
    sparse = SparseLinear.from_dense(w, index=args.index, pattern=pattern)
    sparse.kernel_tokens = {"auto": None, "kernel": tokens, "tiles": 0}[args.path]
    x = torch.randn(tokens, args.cols).to(dtype)
    with torch.inference_mode():
        runs = {
            "dense": lambda: torch.nn.functional.linear(x, w),
            "sparse": lambda: sparse(x),
        }
        result: dict[str, float] = {}
        busy = others_share(lambda: result.update(best_times(runs, args.repeats)))
    dense_bytes = w.numel() * w.element_size()
    return {
        "sparsity": sparsity,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "index": sparse.index,
        "dense_ms": result["dense"] * 1e3,
        "sparse_ms": result["sparse"] * 1e3,
        "ratio": result["sparse"] / result["dense"],
        "bytes_ratio": sparse.nbytes / dense_bytes,
        "busy": busy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=11008)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sparsity", default="0.5,0.6,0.7,0.8,0.9,2:4")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", default="1")
    parser.add_argument("--index", default="auto", choices=("auto", "bitmask", "u8", "u16"))
    parser.add_argument(
        "--path", default="auto", choices=("auto", "kernel", "tiles"), help="for several tokens"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = kernel_unavailable()
    if reason:
        raise SystemExit(f"the sparse kernel is unavailable: {reason}")
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    print(f"{args.rows} x {args.cols}, {args.threads} threads, best of {args.repeats}")
    print("sparsity  dtype     tokens index  dense ms  sparse ms  ratio  bytes  busy")
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for tokens in (int(t) for t in args.tokens.split(",")):
            for sparsity in args.sparsity.split(","):
                row = measure(args, sparsity, dtype, tokens)
                if args.json:
                    print(json.dumps(row), flush=True)
                    continue
                print(
                    f"{row['sparsity']:>8}  {row['dtype']:<8} {tokens:>6} {row['index']:<5} "
                    f"{row['dense_ms']:9.3f} {row['sparse_ms']:10.3f} {row['ratio']:6.3f} "
                    f"{row['bytes_ratio']:6.3f} {row['busy'] or 0:5.0%}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
