"""Protocol sotu-smollm2's calibration windows, any number of them: how perplexity moves with
the calibration's size, on the same sampler.

Usage: python bench/calibration.py --windows 128 --out calib128.pt [--shared ../shared]
       python bench/run_one.py --method sparsellm --sparsity 0.5 --calibration calib128.pt

The text is BENCHMARK.md's (the SOTU addresses of 1900-1989, sorted by file name, joined with
blank lines, tokenised by the bundled model's tokenizer), the windows its seeded draw (seed 0,
512 tokens) continued: the first 64 are ``calib.pt`` token for token, which is checked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from run_one import bundled_gguf

from sparsellm.data import random_windows, read_utf8, tokenize
from sparsellm.loading import load_model_and_tokenizer

YEARS = {str(year) for year in range(1900, 1990)}  # file names start with the year
SEQLEN = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, required=True)
    parser.add_argument("--out", required=True, help="the .pt file to write")
    parser.add_argument("--shared", default="../shared")
    args = parser.parse_args()
    if args.windows < 1:
        parser.error(f"--windows must be >= 1, got {args.windows}")
    reference_path = Path(args.shared) / "bench" / "calib.pt"
    if not reference_path.is_file():
        parser.error(f"{reference_path} not found (pass --shared)")
    reference = torch.load(reference_path)
    files = sorted(Path(args.shared, "data", "sotu").glob("*.txt"))
    text = "\n\n".join(read_utf8(p) for p in files if p.name[:4] in YEARS)
    _, tokenizer = load_model_and_tokenizer(bundled_gguf(), "float32")
    windows = random_windows(tokenize(text, tokenizer), args.windows, SEQLEN, seed=0)
    shared = min(args.windows, reference.shape[0])
    if not torch.equal(windows[:shared], reference[:shared]):
        raise SystemExit(f"the first {shared} windows differ from calib.pt: not the protocol's")
    torch.save(windows, args.out)
    print(f"wrote {args.out}: {args.windows} windows of {SEQLEN} tokens")


if __name__ == "__main__":
    main()
