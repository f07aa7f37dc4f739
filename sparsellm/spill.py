"""Activations kept in a file rather than in host memory, for out-of-core runs (``--offload
disk``), whose point is that host memory is short."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


class SpilledBatches:
    """A list of tensors (one per calibration batch) stored back to back in a temporary file:
    appended once, read back one at a time as often as needed.

    The file has no name (it goes when closed, or when the process dies), and its pages belong
    to the page cache, not to the process: holding the batches costs no resident memory,
    reading one costs one copy. Setting an entry to ``None`` (a consumer dropping a batch it
    is done with) is accepted and frees nothing.
    """

    def __init__(self, directory: str | Path | None = None, pin: bool = False):
        # Open for the object's life (closed by close(), or with the object): not a `with`.
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115
        self._entries: list[tuple[int, torch.Size, torch.dtype]] = []
        self._end = 0
        self._pin = pin  # read back into pinned pages (CUDA copies from them run async)

    def append(self, tensor: torch.Tensor) -> None:
        host = tensor.detach().to("cpu").contiguous()
        self._file.seek(self._end)
        self._file.write(memoryview(_bytes(host)))
        self._entries.append((self._end, host.shape, host.dtype))
        self._end += host.numel() * host.element_size()

    @property
    def shapes(self) -> list[torch.Size]:
        """Each batch's shape, without reading it."""
        return [shape for _, shape, _ in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> torch.Tensor:
        offset, shape, dtype = self._entries[index]
        out = torch.empty(shape, dtype=dtype, pin_memory=self._pin)
        self._file.seek(offset)
        expected = out.numel() * out.element_size()
        if self._file.readinto(memoryview(_bytes(out))) != expected:
            raise OSError(f"spilled activations: batch {index} came back short")
        return out

    def __setitem__(self, index: int, value: None) -> None:
        if value is not None:
            raise TypeError("spilled batches are written once, by append()")
        self._entries[index]  # noqa: B018 -- an index error for an entry that does not exist

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self)):
            yield self[index]

    def close(self) -> None:
        self._file.close()


def _bytes(tensor: torch.Tensor):
    """The storage of a contiguous host ``tensor`` as a numpy uint8 array (no copy; any
    dtype, bfloat16 included, which numpy itself lacks)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()
