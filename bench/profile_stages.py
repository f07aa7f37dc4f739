"""Seconds per stage of a SparseLLM prune, from a py-spy raw profile.

Usage:
    py-spy record --rate 20 --format raw -o prof.txt -- \\
        python bench/run_one.py --method sparsellm --sparsity 0.7
    python bench/profile_stages.py prof.txt [--rate 20]

Each sample is charged to the first stage (in the order below) found on its stack; the
dense-model stream is the engine's block run outside the block pruner. (py-spy is a tool, not
a dependency: ``pip install py-spy``.)
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

# (label, a frame that marks the stage, frames that must not be on the stack)
STAGES = [
    ("capture pass (attention pruned)", "capture_ffn", ()),
    ("FFN solver's init pass", "dense_pass", ()),
    ("initial pruning (epoch 0)", "initial_pruning", ()),
    ("epoch pass + solves", "run_epoch", ()),
    ("final down fit", "final_down_fit", ()),
    ("dense pass (statistics, B0)", "collect_statistics", ()),
    ("attention solves", "solve_layers", ()),
    ("pruned FFN outputs", "pruned_outputs", ()),
    ("dense-model stream", "BlockInputs.run", ("prune_guarded",)),
]


def stage_seconds(path: str, rate: float) -> tuple[Counter, float]:
    """Seconds per stage label, and the seconds inside ``prune_blocks`` altogether."""
    seconds: Counter = Counter()
    pruning = 0.0
    with open(path) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = {re.sub(r" \(.*", "", frame) for frame in stack.split(";")}
            if "prune_blocks" not in frames:
                continue
            share = int(count) / rate
            pruning += share
            for label, marker, excluded in STAGES:
                if marker in frames and not frames.intersection(excluded):
                    seconds[label] += share
                    break
    return seconds, pruning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--rate", type=float, default=20.0, help="py-spy's --rate")
    args = parser.parse_args()
    seconds, pruning = stage_seconds(args.profile, args.rate)
    for label, _, _ in STAGES:
        print(f"{seconds[label]:8.1f}  {label}")
    print(f"{pruning - sum(seconds.values()):8.1f}  other")
    print(f"{pruning:8.1f}  prune_blocks in all")


if __name__ == "__main__":
    main()
