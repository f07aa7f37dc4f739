"""Text sources and token windows for calibration and evaluation.

A *source* is one of:

- ``builtin`` / ``builtin-heldout``: public-domain text shipped with the package (no network);
- ``wikitext2``, ``c4``, ``ptb``: loaded through ``datasets`` (needs the network or a cache);
- a local ``.txt`` file, a directory of ``.txt`` files (sorted by name, joined by a blank line),
  or a ``.jsonl`` file with a ``text`` field;
- a ``.pt`` file holding an integer tensor ``[n, seqlen]`` of token ids, used as is.

Everything read here is untrusted input: text must be UTF-8 (an error names the file and the
byte offset), a ``.pt`` file is read with ``weights_only=True`` (no pickled code runs) and
must hold non-negative integer ids of rank 2 (:func:`load_token_tensor`); whether the ids fit
a model's vocabulary is checked against its config (:func:`check_token_ids`).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from sparsellm.errors import UserError

TENSOR_SOURCE = "<tensor>"  # how token ids passed in memory are named in messages
BUILTIN = {"builtin": "calibration.txt", "builtin-heldout": "heldout.txt"}
NAMED_DATASETS = ("wikitext2", "c4", "ptb")


class DataError(UserError):
    """A text source that cannot be found, read, or is too short."""


_MESSAGE_LIMIT = 300  # characters of a library's own message kept in a one-line error


def one_line(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space), at most
    ``limit`` characters: the head and the tail are kept, since libraries put the summary
    first and the specific cause (the bad key, the offending global) last."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    head = limit * 2 // 3
    return f"{flat[:head]} ... {flat[-(limit - head - 5) :]}"


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
            f"cannot load dataset {name!r} ({one_line(f'{type(exc).__name__}: {exc}')}); "
            "without network access pass a local .txt/.jsonl/.pt file instead"
        ) from None


def read_utf8(path: Path) -> str:
    """The text of ``path``; a one-line ``DataError`` naming the file and the byte offset of
    the first byte that is not UTF-8 (a Latin-1 or UTF-16 file), or why it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{str(path)!r} is not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset "
            f"{exc.start:,} ({exc.reason}); convert it to UTF-8 first (e.g. iconv -t UTF-8)"
        ) from None


def _jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of every non-blank line of a ``.jsonl`` file."""
    texts = []
    for number, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            text = None
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: not a JSON object with a string 'text' field")
        texts.append(text)
    return texts


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
        return "\n\n".join(read_utf8(f) for f in files)
    if path.suffix == ".pt":
        raise DataError(
            f"{source!r} holds token ids, not text; this needs a .txt or .jsonl file, a "
            "directory of .txt files, or a named dataset"
        )
    if path.suffix == ".jsonl":
        return "\n\n".join(_jsonl_texts(path))
    return read_utf8(path)


_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def load_token_tensor(source: str) -> torch.Tensor:
    """An integer ``[n, seqlen]`` tensor of token ids stored with ``torch.save``.

    Read with ``weights_only=True``: a pickle that would run code is refused, not run. The
    tensor is checked by :func:`check_token_tensor`."""
    try:
        ids = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a pickle of code, ...: many types
        reason = one_line(f"{type(exc).__name__}: {exc}")
        raise DataError(f"cannot read token tensor {source!r}: {reason}") from None
    return check_token_tensor(ids, source)


def check_token_tensor(ids: object, source: str) -> torch.Tensor:
    """``ids`` (from ``source``) as a long tensor, or ``DataError`` unless it is a non-empty
    ``[n, seqlen]`` tensor of an integer dtype holding no negative ids."""
    if not isinstance(ids, torch.Tensor):
        raise DataError(
            f"{source!r} holds {type(ids).__name__}, not a tensor of token ids [n, seqlen]"
        )
    if ids.dtype not in _ID_DTYPES:
        raise DataError(
            f"{source!r} holds a {ids.dtype} tensor; token ids must be an integer tensor"
        )
    if ids.dim() != 2 or ids.numel() == 0:
        raise DataError(
            f"{source!r} holds a tensor of shape {list(ids.shape)}; token ids must be a "
            "non-empty [n, seqlen] tensor (one row per window)"
        )
    ids = ids.long()
    if int(ids.min()) < 0:
        raise DataError(f"{source!r} holds the negative token id {int(ids.min())}")
    return ids


def check_token_ids(ids: torch.Tensor, vocab_size: int, source: str) -> None:
    """``DataError`` when a token id of ``ids`` (from ``source``) is not below ``vocab_size``:
    the embedding lookup would fail with an index error (or read past the table on a GPU)."""
    largest = int(ids.max()) if ids.numel() else -1
    if largest >= vocab_size:
        where = (ids == largest).nonzero()[0].tolist()
        raise DataError(
            f"{source!r}: token id {largest} (window {where[0]}, position {where[1]}) is not "
            f"below the model's vocabulary size {vocab_size}; were the ids made with another "
            "tokenizer?"
        )


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
        return check_token_tensor(source, TENSOR_SOURCE)
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
        return check_token_tensor(source, TENSOR_SOURCE)[:max_windows]
    if str(source).endswith(".pt"):
        check_source(source)
        return load_token_tensor(source)[:max_windows]
    text = load_text(source, split="test")
    return consecutive_windows(tokenize(text, tokenizer), seqlen, max_windows)
