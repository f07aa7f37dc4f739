"""Text sources and token windows for calibration and evaluation.

A *source* is one of:

- ``builtin`` / ``builtin-heldout``: public-domain text shipped with the package (no network);
- ``wikitext2``, ``c4``, ``ptb``: loaded through ``datasets`` (needs the network or a cache);
- a local ``.txt`` file, a directory of ``.txt`` files (sorted by name, joined by a blank line),
  or a ``.jsonl`` file with a ``text`` field;
- a ``.pt`` file holding an integer tensor ``[n, seqlen]`` of token ids, used as is.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from sparsellm.errors import UserError

BUILTIN = {"builtin": "calibration.txt", "builtin-heldout": "heldout.txt"}
NAMED_DATASETS = ("wikitext2", "c4", "ptb")


class DataError(UserError):
    """A text source that cannot be found, read, or is too short."""


def describe_sources() -> str:
    return (
        "builtin, builtin-heldout, wikitext2, c4, ptb, or a path to a .txt file, a directory of "
        ".txt files, a .jsonl file with a 'text' field, or a .pt tensor of token ids"
    )


def check_source(source: str) -> None:
    """Fail early (before any model is loaded) on a source that cannot exist."""
    if source in BUILTIN or source in NAMED_DATASETS:
        return
    path = Path(source)
    if not path.exists():
        raise DataError(f"text source {source!r} not found; expected {describe_sources()}")
    if path.is_file() and path.suffix not in (".txt", ".jsonl", ".pt"):
        raise DataError(f"text source {source!r} has unsupported type {path.suffix!r}")


def _load_named(name: str, split: str) -> str:
    """The joined text of a well-known dataset split (train for calibration, test for eval)."""
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            data = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(data["text"])
        if name == "ptb":
            data = load_dataset("ptb_text_only", "penn_treebank", split=split)
            return "\n\n".join(data["sentence"])
        files = {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "test": "en/c4-validation.00000-of-00008.json.gz",
        }
        data = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
        # A prefix of the shard is plenty: 20k documents is ~10M tokens.
        return "\n\n".join(data.select(range(min(len(data), 20000)))["text"])
    except Exception as exc:  # datasets raises many types when offline
        raise DataError(
            f"cannot load dataset {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "without network access pass a local .txt/.jsonl/.pt file instead"
        ) from None


def load_text(source: str, split: str = "train") -> str:
    """The raw text of ``source`` (see the module docstring for the forms it takes)."""
    check_source(source)
    if source in BUILTIN:
        return resources.files("sparsellm.resources").joinpath(BUILTIN[source]).read_text("utf-8")
    if source in NAMED_DATASETS:
        return _load_named(source, split)
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"directory {source!r} holds no .txt files")
        return "\n\n".join(f.read_text("utf-8") for f in files)
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    message = f"{source}:{number}: not a JSON object with a 'text' field"
                    raise DataError(message) from None
        return "\n\n".join(texts)
    return path.read_text("utf-8")


def load_token_tensor(source: str) -> torch.Tensor:
    """An integer ``[n, seqlen]`` tensor stored with ``torch.save``."""
    try:
        ids = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"cannot read token tensor {source!r}: {exc}") from None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise DataError(f"{source!r} must hold an integer tensor [n, seqlen]")
    return ids.long()


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of ``text`` as one long 1-D tensor, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random starts (may overlap)."""
    if ids.numel() < nsamples * seqlen or ids.numel() < seqlen + 2:
        raise DataError(
            f"calibration text has {ids.numel():,} tokens, fewer than nsamples × seqlen = "
            f"{nsamples} × {seqlen} = {nsamples * seqlen:,}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = [
        int(torch.randint(0, ids.numel() - seqlen - 1, (1,), generator=generator))
        for _ in range(nsamples)
    ]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def consecutive_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """The first non-overlapping windows of ``seqlen`` tokens (at most ``max_windows``)."""
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DataError(f"evaluation text has {ids.numel():,} tokens, fewer than seqlen {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


def calibration_windows(
    source: str | torch.Tensor, tokenizer, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """Calibration token windows ``[nsamples, seqlen]`` from ``source``.

    A tensor (or ``.pt`` file) of token ids is used as is.
    """
    if isinstance(source, torch.Tensor):
        return source.long()
    if str(source).endswith(".pt"):
        check_source(source)
        return load_token_tensor(source)
    text = load_text(source, split="train")
    return random_windows(tokenize(text, tokenizer), nsamples, seqlen, seed)


def evaluation_windows(
    source: str | torch.Tensor, tokenizer, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """Evaluation windows: the test split cut into consecutive windows of ``seqlen`` tokens."""
    if isinstance(source, torch.Tensor):
        return source.long()[:max_windows]
    if str(source).endswith(".pt"):
        check_source(source)
        return load_token_tensor(source)[:max_windows]
    text = load_text(source, split="test")
    return consecutive_windows(tokenize(text, tokenizer), seqlen, max_windows)
