"""The family table: every causal LM transformers ships, each method at 50% on a tiny model.

Runs the same sweep as ``tests/test_families.py`` (tiny random models, norm weights from
N(0, 1), byte-level calibration text) and prints Markdown: families grouped by the path
SparseLLM takes (``residual``: joint FFN solve, the FFN absorbing the attention's error;
``ffn-output``: joint FFN solve on the general path; ``layerwise``: no two-layer FFN that
reproduces the block, so SparseGPT), the refused and the skipped ones, then one row per family
with SparseLLM's logits error relative to SparseGPT's.

    python bench/families.py > docs/FAMILIES.md      # make families
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import FIXTURES, byte_tokenizer  # noqa: E402
from families import causal_lm_types, sweep_family  # noqa: E402

from sparsellm.data import calibration_windows  # noqa: E402

GROUPS = {
    "residual": "joint FFN solve, residual target (the FFN absorbs the attention's error)",
    "ffn-output": "joint FFN solve, general path (a norm or scale after the FFN or the sum)",
    "layerwise": "SparseGPT in every layer (no two-layer FFN reproduces the block: MoE, ...)",
    "unsupported": "refused with exit 2 (unsupported layout)",
    "skipped": "not built offline from a shrunken default config (reason in the table)",
}


def group(outcome: dict) -> str:
    if "skip" in outcome:
        return "skipped"
    if any("unsupported" in outcome[m] for m in ("sparsegpt", "sparsellm")):
        return "unsupported"
    return (
        outcome["sparsellm"]["paths"][-1]
        if len(outcome["sparsellm"]["paths"]) == 1
        else ("ffn-output")
    )


def row(model_type: str, outcome: dict) -> str:
    if "skip" in outcome:
        return f"| `{model_type}` | | skipped | {outcome['skip']} |"
    kind = group(outcome)
    if kind == "unsupported":
        reason = next(
            outcome[m]["unsupported"]
            for m in ("sparsegpt", "sparsellm")
            if "unsupported" in outcome[m]
        )
        return f"| `{model_type}` | {outcome['class']} | unsupported | {reason} |"
    ratio = outcome["sparsellm"]["logits_error"] / outcome["sparsegpt"]["logits_error"]
    paths = ", ".join(outcome["sparsellm"]["paths"])
    return f"| `{model_type}` | {outcome['class']} | {paths} | {ratio:.2f} |"


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    ids = calibration_windows(
        str(FIXTURES / "calibration.txt"), byte_tokenizer(), nsamples=8, seqlen=32, seed=0
    )
    started = time.perf_counter()
    types = sys.argv[1:] or causal_lm_types()
    outcomes = {t: sweep_family(t, ids) for t in types}
    import transformers

    print(f"# Families (transformers {transformers.__version__}, `make families`)\n")
    for kind, meaning in GROUPS.items():
        names = [t for t, o in outcomes.items() if group(o) == kind]
        print(f"- **{kind}** ({len(names)}): {meaning}: {', '.join(f'`{n}`' for n in names)}")
    print("\n| model type | class | SparseLLM path | logits error vs SparseGPT (or why not) |")
    print("|---|---|---|---|")
    for model_type, outcome in outcomes.items():
        print(row(model_type, outcome))
    print(f"\n(sweep took {time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
