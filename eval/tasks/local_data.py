"""Datasets of the offline tasks: a jsonl file next to this one, read without the hub.

Task YAMLs name it as ``custom_dataset: !function local_data.load_jsonl`` with the file in
``dataset_kwargs``; lm-evaluation-harness calls it with the task's metadata and those kwargs.
Paths are relative to this directory, so the tasks work from any working directory, and
nothing here can reach the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(file: str, split: str = "test", **_metadata: object) -> datasets.DatasetDict:
    """``{split: the rows of file}``; ``file`` is absolute or relative to this directory."""
    path = Path(file) if Path(file).is_absolute() else HERE / file
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
