"""The README's family table: every causal LM transformers ships, each method at 50%.

Runs the same sweep as ``tests/test_families.py`` (tiny random models, norm weights from
N(0, 1), byte-level calibration text) and prints a Markdown table: which families prune,
which SparseLLM path each takes (``residual``: joint FFN solve with the residual target;
``ffn-output``: joint FFN solve on the general path; ``layerwise``: no two-layer FFN found, so
SparseGPT), and SparseLLM's logits error relative to SparseGPT's.

    python bench/families.py [MODEL_TYPE ...] > families.md
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from conftest import FIXTURES, byte_tokenizer  # noqa: E402
from families import causal_lm_types, sweep_family  # noqa: E402

from sparsellm.data import calibration_windows  # noqa: E402


def row(model_type: str, outcome: dict) -> str:
    if "skip" in outcome:
        return f"| `{model_type}` | — | skipped: {outcome['skip']} | | |"
    sparsellm, sparsegpt = outcome["sparsellm"], outcome["sparsegpt"]
    if "unsupported" in sparsegpt:
        return f"| `{model_type}` | {outcome['class']} | unsupported (exit 2) | | |"
    local = "all four methods" if "unsupported" not in sparsellm else "layer-wise methods"
    paths = ", ".join(sparsellm.get("paths", [])) or "—"
    ratio = sparsellm["logits_error"] / sparsegpt["logits_error"]
    return f"| `{model_type}` | {outcome['class']} | {local} | {paths} | {ratio:.2f} |"


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    ids = calibration_windows(
        str(FIXTURES / "calibration.txt"), byte_tokenizer(), nsamples=8, seqlen=32, seed=0
    )
    started = time.perf_counter()
    print(
        "| model type | class | prunes with | SparseLLM path | SparseLLM / SparseGPT logits error |"
    )
    print("|---|---|---|---|---|")
    for model_type in sys.argv[1:] or causal_lm_types():
        print(row(model_type, sweep_family(model_type, ids)), flush=True)
    print(f"\n(sweep took {time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
