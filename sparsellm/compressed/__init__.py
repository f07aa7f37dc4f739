"""Compressed checkpoints ("sparse-bitmask"): a pruned model stored at the size of its
non-zeros, restored bit for bit.

Each sparse Linear weight is stored as a bitmask plus its packed non-zeros (or, when every
group of M columns holds at most N non-zeros, as N values and their positions per group);
everything else is stored as it is. ``config.json`` records the format. See
``docs/ARCHITECTURE.md``, "Compressed checkpoints", for the exact layout.

- ``--save-format compressed`` (registered here): :func:`write_compressed`;
- ``sparsellm compress`` / ``decompress``: :func:`compress_directory`,
  :func:`decompress_directory`;
- :func:`load_model`: a dense or compressed directory as a model, optionally straight into
  :mod:`sparsellm.sparse` layers.
"""

from __future__ import annotations

from sparsellm.compressed.convert import (
    DEFAULT_SHARD_BYTES,
    Sizes,
    compress_directory,
    decompress_directory,
    write_compressed,
)
from sparsellm.compressed.files import CompressedCheckpointError, is_compressed
from sparsellm.compressed.load import load_model
from sparsellm.compressed.record import FORMAT, VERSION
from sparsellm.saving import FORMATS, register_format

if "compressed" not in FORMATS:  # saving.py imports this module to complete its list
    register_format("compressed", write_compressed)

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "FORMAT",
    "VERSION",
    "CompressedCheckpointError",
    "Sizes",
    "compress_directory",
    "decompress_directory",
    "is_compressed",
    "load_model",
    "write_compressed",
]
