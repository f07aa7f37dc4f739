"""Protocol sotu-smollm2 (see ../shared/BENCHMARK.md): every run in its own process, one after
the other, then a markdown table for the README.

    python bench/bench.py [--shared ../shared] [--methods sparsegpt,wanda] [--targets 0.5,2:4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_METHODS = ("magnitude", "wanda", "sparsegpt")
DEFAULT_TARGETS = ("0.5", "0.7", "2:4")


def run(shared: str, method: str, target: str | None) -> dict:
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
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.jsonl"))
    args = parser.parse_args()
    if not (Path(args.shared) / "bench" / "calib.pt").is_file():
        raise SystemExit(f"{args.shared}/bench/calib.pt not found (pass --shared)")

    rows = [] if args.no_dense else [run(args.shared, "dense", None)]
    for method in args.methods.split(","):
        for target in args.targets.split(","):
            rows.append(run(args.shared, method, target))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))


if __name__ == "__main__":
    main()
