"""Sparse fine-tuning on protocol sotu-smollm2: train on the calibration years (1900–1989),
score on the ready evaluation windows (1990+). One JSON line per run.

    python bench/finetune_bench.py --mode keep-mask --steps 120     # SparseGPT 70% → fine-tune
    python bench/finetune_bench.py --mode schedule --steps 120      # dense → 50% while training
    python bench/finetune_bench.py --mode dense --steps 120         # control: no sparsity at all

The dense control separates what the text itself teaches (the training years are the same
source as the evaluation years) from what fine-tuning recovers of the pruning loss.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from run_one import bundled_gguf, decoder_sparsity  # noqa: E402  (same folder)

from sparsellm import prune_model
from sparsellm.data import consecutive_windows, tokenize
from sparsellm.evaluation import windows_perplexity
from sparsellm.finetune import finetune
from sparsellm.loading import load_model_and_tokenizer
from sparsellm.optim import sparsifiable_parameters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("keep-mask", "schedule", "dense"), required=True)
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--sparsity", type=float)
    parser.add_argument(
        "--skip-before",
        action="store_true",
        help="do not re-measure the starting perplexity (the same as the bench.py row)",
    )
    args = parser.parse_args()
    shared = Path(args.shared)

    model, tokenizer = load_model_and_tokenizer(bundled_gguf(), "float32")
    evaluation = torch.load(shared / "bench" / "eval.pt")
    files = sorted((shared / "data" / "sotu").glob("*.txt"))
    text = "\n\n".join(f.read_text("utf-8") for f in files if 1900 <= int(f.name[:4]) <= 1989)
    train = consecutive_windows(tokenize(text, tokenizer), 512, None)

    result: dict = {
        "mode": args.mode,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "train_windows": int(train.shape[0]),
    }
    if args.mode == "keep-mask":
        sparsity = args.sparsity or 0.7
        started = time.perf_counter()
        prune_model(
            model,
            method="sparsegpt",
            sparsity=sparsity,
            calibration=torch.load(shared / "bench" / "calib.pt"),
            progress=False,
        )
        result["prune_seconds"] = time.perf_counter() - started
        if not args.skip_before:
            result["perplexity_pruned"] = windows_perplexity(model, evaluation, progress=False)
        result["sparsity_pruned"] = decoder_sparsity(model)
        zeros_before = {n: p.detach() == 0 for n, p in sparsifiable_parameters(model)}
        report = finetune(
            model, train, steps=args.steps, lr=args.lr, batch_size=args.batch_size, progress=False
        )
        result["zero_positions_changed"] = sum(
            int(((p.detach() == 0) != zeros_before[n]).sum())
            for n, p in sparsifiable_parameters(model)
        )
    elif args.mode == "dense":
        sparsity = 0.0
        if not args.skip_before:
            result["perplexity_dense"] = windows_perplexity(model, evaluation, progress=False)
        # keep_mask over a dense model: only the checkpoint's own exact zeros are held.
        report = finetune(
            model, train, steps=args.steps, lr=args.lr, batch_size=args.batch_size, progress=False
        )
    else:
        sparsity = args.sparsity or 0.5
        if not args.skip_before:
            result["perplexity_dense"] = windows_perplexity(model, evaluation, progress=False)
        report = finetune(
            model,
            train,
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            target_sparsity=sparsity,
            progress=False,
        )
    result.update(
        target_sparsity=sparsity,
        finetune_seconds=report.seconds,
        seconds_per_step=report.seconds / report.steps,
        mixed_precision=report.mixed_precision,
        tokens_seen=report.tokens_seen,
        perplexity_finetuned=windows_perplexity(model, evaluation, progress=False),
        sparsity=decoder_sparsity(model),
        train_loss_first=report.train_loss_first,
        train_loss_last=report.train_loss_last,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
