"""Protocol sotu-smollm2 (see ../shared/BENCHMARK.md): every run in its own process, one after
the other, then a markdown table for the README.

    python bench/bench.py [--shared ../shared] [--runs sparsegpt:0.5,sparsellm:2:4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Most informative rows first, so an interrupted run still answers the main questions.
DEFAULT_RUNS = (
    "dense",
    "sparsegpt:0.5",
    "sparsegpt:0.7",
    "sparsegpt:2:4",
    "sparsellm:0.7",
    "sparsellm:0.5",
    "sparsellm:2:4",
    "magnitude:0.5",
    "magnitude:0.7",
    "magnitude:2:4",
    "wanda:0.5",
    "wanda:0.7",
    "wanda:2:4",
    "sparsegpt:0.8",
    "sparsellm:0.8",
)


def run(shared: str, spec: str) -> dict:
    method, _, target = spec.partition(":")
    target = target or None
    cmd = [sys.executable, str(HERE / "run_one.py"), "--shared", shared, "--method", method]
    if target is not None:
        cmd += ["--pattern", target] if ":" in target else ["--sparsity", target]
    print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"benchmark run failed: {method} {target}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def table(rows: list[dict]) -> str:
    lines = [
        "| method | target | perplexity | measured sparsity | prune s | process s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        prune = f"{r['prune_seconds']:.0f}" if r["prune_seconds"] is not None else "—"
        target = r["target"] if isinstance(r["target"], str) else f"{float(r['target']):.0%}"
        lines.append(
            f"| {r['method']} | {target} | {r['perplexity']:.2f} | {r['sparsity']:.2%} | "
            f"{prune} | {r['process_seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="METHOD[:TARGET],...")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.jsonl"))
    args = parser.parse_args()
    if not (Path(args.shared) / "bench" / "calib.pt").is_file():
        raise SystemExit(f"{args.shared}/bench/calib.pt not found (pass --shared)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    rows = []
    for spec in args.runs.split(","):
        rows.append(run(args.shared, spec))
        with out.open("a") as handle:  # keep every finished row, even if a later one fails
            handle.write(json.dumps(rows[-1]) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
