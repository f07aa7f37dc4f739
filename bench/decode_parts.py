"""Where a decoded token's time goes: the block Linears, the head, and everything else.

    python bench/decode_parts.py --model DIR [--tokens 64] [--repeats 6] [--threads 2]

Greedy decode (batch 1, as ``sparsellm bench-infer``) of four models built from ``DIR``: the
dense model, its sparse form (``to_sparse_inference``), the dense model with every Linear
inside the decoder blocks replaced by one that only returns zeros of its output shape, and
that model without its head too. Differences between the rows are the block Linears' and
the head's share of a token; the last row is what no kernel can touch (attention, norms,
rotary tables, the KV cache, the model's Python). Each row is the best of ``--repeats``
interleaved runs; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from sparsellm.sparse.bench import OthersShare, greedy, load_models, prompt_ids


class Zeros(nn.Module):
    """A Linear that costs nothing: zeros of its output shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def without_linears(model: nn.Module, head: bool) -> nn.Module:
    """A copy of ``model`` whose block Linears (and, with ``head``, the head) are free."""
    from sparsellm.models import get_adapter

    copied = copy.deepcopy(model)
    for module in list(get_adapter(copied).blocks().modules()):
        for child, value in list(module.named_children()):
            if isinstance(value, nn.Linear):
                setattr(module, child, Zeros(value.out_features))
    if head:
        copied.set_output_embeddings(Zeros(copied.get_output_embeddings().out_features))
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = load_models(args.model, "float32", 0.3, False)
    runs = {
        "dense": models.dense,
        "sparse": models.sparse,
        "block Linears free": without_linears(models.dense, head=False),
        "block Linears and head free": without_linears(models.dense, head=True),
    }
    prompt = prompt_ids(models.dense, 16)
    for model in runs.values():
        greedy(model, prompt, 4)
    best = dict.fromkeys(runs, float("inf"))
    with OthersShare() as others:
        for _ in range(args.repeats):
            for name, model in runs.items():
                best[name] = min(best[name], greedy(model, prompt, args.tokens)[1] / args.tokens)
    for name, seconds in best.items():
        print(f"{name:28s} {1000 * seconds:6.1f} ms/token")
    rest, no_blocks = best["block Linears and head free"], best["block Linears free"]
    print(
        f"head {1000 * (no_blocks - rest):.1f} ms; block Linears: dense "
        f"{1000 * (best['dense'] - no_blocks):.1f} ms, sparse "
        f"{1000 * (best['sparse'] - no_blocks):.1f} ms; everything else {1000 * rest:.1f} ms"
    )
    if others.share is not None:
        print(f"other processes took {others.share:.0%} of the CPU meanwhile")


if __name__ == "__main__":
    main()
