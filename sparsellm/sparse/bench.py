"""``sparsellm bench-infer``: does the pruned model pay off on this CPU?

In one process, with the same threads: greedy decode (batch 1, ``new_tokens`` after a short
prompt, KV cache on) and prefill (``prompt_tokens`` in one forward) of the dense model and of
its sparse form (:func:`to_sparse_inference` on a copy, or a compressed checkpoint loaded
straight into :class:`SparseLinear` layers), each the best of ``repeats``, the runs
interleaved; the bytes of weights a token reads and the speed-up they bound; and whether the
greedy tokens agree.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsellm.sparse.convert import SparseSwap, to_sparse_inference, weight_bytes_per_token
from sparsellm.sparse.linear import SparseLinear, kernel_unavailable

DECODE_PROMPT = 16  # tokens of the short prompt before the decoded ones
WARMUP_TOKENS = 4  # a first short run compiles the kernels (numba caches them on disk)


@dataclass
class Models:
    """The dense model, its sparse form, and what the swap did (``None``: loaded sparse)."""

    dense: nn.Module
    sparse: nn.Module
    swap: SparseSwap | None


def load_models(spec: str, dtype: str, min_sparsity: float, trust_remote_code: bool) -> Models:
    """Dense and sparse models of ``spec``: a compressed checkpoint is loaded twice (dense,
    and straight into sparse layers); anything else is loaded once and copied."""
    from sparsellm.loading import load_model_and_tokenizer

    compressed = _compressed_loader(spec)
    if compressed is not None:
        dense = compressed(spec, dtype=dtype, trust_remote_code=trust_remote_code)
        sparse = compressed(spec, dtype=dtype, sparse=True, trust_remote_code=trust_remote_code)
        return Models(dense.eval(), sparse.eval(), None)
    dense, _ = load_model_and_tokenizer(spec, dtype, trust_remote_code=trust_remote_code)
    sparse = copy.deepcopy(dense)
    swap = to_sparse_inference(sparse, min_sparsity)
    return Models(dense.eval(), sparse.eval(), swap)


def _compressed_loader(spec: str) -> Any:
    """``sparsellm.load_model`` when ``spec`` is a compressed checkpoint it can read."""
    try:
        from sparsellm.compressed import is_compressed, load_model
    except ImportError:
        return None
    from pathlib import Path

    return load_model if Path(spec).is_dir() and is_compressed(Path(spec)) else None


def prompt_ids(model: nn.Module, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` token ids [1, count], fixed by ``seed``, away from the special low ids."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    low = min(vocab - 1, 16)
    return torch.randint(low, vocab, (1, count), generator=g)


def _cache_keyword(model: nn.Module) -> str:
    """The forward's KV-cache keyword: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens after ``prompt`` with the KV cache, and the seconds they took (the
    prompt's forward included: it yields the first token)."""
    keyword = _cache_keyword(model)
    start = time.perf_counter()
    out = model(prompt, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    for _ in range(new_tokens - 1):
        out = model(token, use_cache=True, **{keyword: out[keyword]})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return tokens, time.perf_counter() - start


@torch.inference_mode()
def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    """Seconds of one forward over ``ids`` (the prompt of a generation)."""
    start = time.perf_counter()
    model(ids, use_cache=True)
    return time.perf_counter() - start


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat (``None`` off Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)


class OthersShare:
    """Context: the share of the machine's CPU time other processes took meanwhile (a timing
    is only worth quoting when it is about 0); ``share`` stays ``None`` off Linux."""

    def __enter__(self) -> OthersShare:
        self.share: float | None = None
        self._start, self._own = _cpu_jiffies(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc: object) -> None:
        end = _cpu_jiffies()
        if self._start is None or end is None:
            return
        own = (sum(os.times()[:2]) - self._own) * os.sysconf("SC_CLK_TCK")
        busy, total = end[0] - self._start[0], end[1] - self._start[1]
        self.share = max(0.0, busy - own) / max(total, 1)


def _best_rates(runs: dict[str, Any], tokens: int, repeats: int) -> dict[str, float]:
    """Best tokens/s of each run (a callable returning seconds), interleaved round by round."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    return {name: tokens / seconds for name, seconds in best.items()}


def bench_infer(
    models: Models, new_tokens: int, prompt_tokens: int, repeats: int, threads: int | None
) -> dict:
    """Decode and prefill tokens/s of both models, bytes per token, identical tokens, and
    the share of the CPU other processes took during the timings (``busy``)."""
    if threads is not None:
        torch.set_num_threads(threads)
    dense, sparse = models.dense, models.sparse
    short = prompt_ids(dense, DECODE_PROMPT)
    long = prompt_ids(dense, prompt_tokens, seed=1)
    for model in (dense, sparse):  # compile (numba caches on disk) and touch everything once
        greedy(model, short, min(WARMUP_TOKENS, new_tokens))
        prefill_seconds(model, long)
    reference, _ = greedy(dense, short, new_tokens)
    produced, _ = greedy(sparse, short, new_tokens)
    with OthersShare() as others:
        decode = _best_rates(
            {
                "dense": lambda: greedy(dense, short, new_tokens)[1],
                "sparse": lambda: greedy(sparse, short, new_tokens)[1],
            },
            new_tokens,
            repeats,
        )
        prefill = _best_rates(
            {
                "dense": lambda: prefill_seconds(dense, long),
                "sparse": lambda: prefill_seconds(sparse, long),
            },
            prompt_tokens,
            repeats,
        )
    result = _result(models, decode, prefill, reference, produced)
    result.update(
        new_tokens=new_tokens,
        decode_prompt_tokens=DECODE_PROMPT,
        prompt_tokens=prompt_tokens,
        repeats=repeats,
        busy=others.share,
    )
    return result


def _result(models: Models, decode: dict, prefill: dict, reference: list, produced: list) -> dict:
    dense_bytes = weight_bytes_per_token(models.dense)
    sparse_bytes = weight_bytes_per_token(models.sparse)
    differ = next(
        (i for i, (a, b) in enumerate(zip(reference, produced, strict=True)) if a != b), None
    )
    layers = sum(isinstance(m, SparseLinear) for m in models.sparse.modules())
    return {
        "threads": torch.get_num_threads(),
        "kernel": kernel_unavailable() or "numba",
        "sparse_layers": layers,
        "decode_tokens_per_s": decode,
        "decode_speedup": decode["sparse"] / decode["dense"],
        "prefill_tokens_per_s": prefill,
        "prefill_speedup": prefill["sparse"] / prefill["dense"],
        "bytes_per_token": {"dense": dense_bytes, "sparse": sparse_bytes},
        "bandwidth_bound": dense_bytes / sparse_bytes,
        "dense_bandwidth_gb_s": dense_bytes * decode["dense"] / 1e9,
        "sparse_bandwidth_gb_s": sparse_bytes * decode["sparse"] / 1e9,
        "identical_tokens": differ is None,
        "first_difference": differ,
    }


def format_result(result: dict, model: str) -> str:
    """The human-readable report of :func:`bench_infer`."""
    d, p = result["decode_tokens_per_s"], result["prefill_tokens_per_s"]
    b = {k: v / 1e6 for k, v in result["bytes_per_token"].items()}
    first = result["first_difference"]
    same = "yes" if first is None else f"no (first difference at token {first})"
    best = f"best of {result['repeats']}"
    return "\n".join(
        [
            f"{model}: {result['sparse_layers']} sparse layers, {result['threads']} threads, "
            f"kernel: {result['kernel']}",
            f"decode (batch 1, {result['new_tokens']} tokens after a "
            f"{result['decode_prompt_tokens']}-token prompt, {best}): dense {d['dense']:.2f} "
            f"tok/s, sparse {d['sparse']:.2f} tok/s, speed-up {result['decode_speedup']:.2f}x",
            f"prefill ({result['prompt_tokens']} tokens, {best}): dense {p['dense']:.1f} tok/s, "
            f"sparse {p['sparse']:.1f} tok/s, speed-up {result['prefill_speedup']:.2f}x",
            f"weights read per token: dense {b['dense']:.1f} MB, sparse {b['sparse']:.1f} MB: "
            f"bandwidth bound {result['bandwidth_bound']:.2f}x (decode reads "
            f"{result['dense_bandwidth_gb_s']:.1f} GB/s dense, "
            f"{result['sparse_bandwidth_gb_s']:.1f} GB/s sparse)",
            f"greedy tokens identical over {result['new_tokens']} tokens: {same}",
            *_busy_line(result["busy"]),
        ]
    )


def _busy_line(share: float | None) -> list[str]:
    if share is None:
        return []
    verdict = "quiet" if share < 0.05 else "busy: the timings are not reliable, run it again"
    return [f"other processes took {share:.0%} of the CPU during the timings ({verdict})"]


def run(config: Any) -> int:
    """``sparsellm bench-infer`` from its checked settings."""
    from sparsellm.preflight import check_length, load_config

    # Before the load: past the positions OPT/GPT-2 fail in their table and others allocate
    # attention for a context they were never trained on (100k tokens: a 40 GB request).
    length = config.prompt_tokens + config.new_tokens
    model_config = load_config(config.model, config.trust_remote_code)
    check_length("prompt_tokens + new_tokens", length, model_config)
    models = load_models(config.model, config.dtype, config.min_sparsity, config.trust_remote_code)
    result = bench_infer(
        models, config.new_tokens, config.prompt_tokens, config.repeats, config.threads
    )
    if models.swap is not None:
        result["swap"] = models.swap.summary()
    print(json.dumps(result) if config.json else format_result(result, config.model))
    return 0
