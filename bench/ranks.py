"""Solve time of 1 process against 2 gloo ranks sharing the solves (issue 12, item 3).

Usage: python bench/ranks.py [--methods sparsegpt sparsellm] [--nsamples 16 --seqlen 128]

A random-init LLaMA (hidden 512, 4 blocks, intermediate 1536) is pruned to 50% in three
set-ups: 1 process with 1 thread, 1 process with 2 threads, 2 gloo processes with 1 thread
each (calibration windows and solves shared). "solve" is the time spent in the layer solves
(``solve_layers``) and the joint FFN solves (``_solve_ffn``), the slowest rank's for 2 ranks;
"prune" the whole ``prune_model`` call. A timing script, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

SIZES = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4)
SIZES |= dict(num_attention_heads=8, num_key_value_heads=8, vocab_size=1024)


def _model() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**SIZES)).eval()


def _prune(method: str, nsamples: int, seqlen: int) -> dict[str, float]:
    """Prune the model once in this process; its solve and whole-prune seconds."""
    from run_one import time_solves

    from sparsellm import prune_model

    seconds = time_solves()
    ids = torch.randint(
        0, SIZES["vocab_size"], (nsamples, seqlen), generator=torch.Generator().manual_seed(1)
    )
    started = time.perf_counter()
    prune_model(
        _model(), method=method, sparsity=0.5, calibration=ids, batch_size=4, progress=False
    )
    return {"solve": seconds[0], "prune": time.perf_counter() - started}


def _one_process(threads: int, method: str, nsamples: int, seqlen: int, out: str) -> None:
    torch.set_num_threads(threads)
    with open(out, "w") as f:
        json.dump(_prune(method, nsamples, seqlen), f)


def _rank(rank: int, init: str, method: str, nsamples: int, seqlen: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        _one_process(1, method, nsamples, seqlen, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run(setup: str, method: str, nsamples: int, seqlen: int) -> dict[str, float]:
    """One set-up in fresh processes (no state carried between runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times")
        if setup == "2 ranks x 1 thread":
            args = (os.path.join(tmp, "init"), method, nsamples, seqlen, out)
            mp.spawn(_rank, args=args, nprocs=2, join=True)
            times = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
            return {k: max(t[k] for t in times) for k in ("solve", "prune")}
        threads = 2 if setup == "1 process x 2 threads" else 1
        context = mp.get_context("spawn")
        child = context.Process(target=_one_process, args=(threads, method, nsamples, seqlen, out))
        child.start()
        child.join()
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "sparsellm"])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args()
    setups = ("1 process x 1 thread", "1 process x 2 threads", "2 ranks x 1 thread")
    print(f"llama {SIZES}, {args.nsamples} x {args.seqlen} tokens, 50%, CPU")
    print(f"{'method':<10} {'set-up':<22} {'solve s':>8} {'prune s':>8}")
    for method in args.methods:
        for setup in setups:
            t = run(setup, method, args.nsamples, args.seqlen)
            print(f"{method:<10} {setup:<22} {t['solve']:>8.2f} {t['prune']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
