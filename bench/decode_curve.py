"""Decode speed-up of the CPU sparse layers against sparsity, next to its bandwidth bound.

    python bench/decode_curve.py [--model PATH.gguf|DIR] [--sparsities 0.5,0.6,0.7,0.8,0.9,2:4]
        [--new-tokens 128] [--repeats 3] [--json]

The model (default: the bundled SmolLM2 GGUF) is loaded once; for each sparsity a copy is
pruned by magnitude (the kernels' speed depends on the zeros, not on which weights they are)
and measured exactly as ``sparsellm bench-infer`` does (:func:`sparsellm.sparse.bench.bench_infer`:
the pruned model run densely by PyTorch against its ``to_sparse_inference`` copy, greedy decode
of batch 1, best of ``--repeats``, tokens compared). One row per sparsity; the ``busy`` column
is the CPU share other processes took (re-run unless it is about 0).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from sparsellm import prune_model
from sparsellm.loading import load_model_and_tokenizer
from sparsellm.sparse.bench import Models, bench_infer
from sparsellm.sparse.convert import to_sparse_inference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a .gguf file or a model directory (default: bundled)")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,0.9,2:4")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        from run_one import bundled_gguf

        args.model = bundled_gguf()
    dense, tokenizer = load_model_and_tokenizer(args.model, "float32")
    rows = []
    if not args.json:
        print("sparsity  dense tok/s  sparse tok/s  speed-up  bound  same tokens  busy")
    for spec in args.sparsities.split(","):
        pruned = copy.deepcopy(dense)
        target = {"pattern": spec} if ":" in spec else {"sparsity": float(spec)}
        prune_model(pruned, tokenizer, method="magnitude", progress=False, **target)
        sparse = copy.deepcopy(pruned)
        to_sparse_inference(sparse)
        models = Models(pruned.eval(), sparse.eval(), None)
        result = bench_infer(models, args.new_tokens, args.prompt_tokens, args.repeats, None)
        rows.append({"sparsity": spec, **result})
        if not args.json:
            d = result["decode_tokens_per_s"]
            print(
                f"{spec:>8}  {d['dense']:11.2f}  {d['sparse']:12.2f}  "
                f"{result['decode_speedup']:7.2f}x  {result['bandwidth_bound']:4.2f}x  "
                f"{'yes' if result['identical_tokens'] else 'no':>11}  {result['busy']:.0%}",
                flush=True,
            )
        del pruned, sparse, models
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
