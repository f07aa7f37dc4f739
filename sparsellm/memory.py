"""Memory sizes: parsing what users type, and what this machine has free."""

from __future__ import annotations

import os
import re

import torch

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int | None:
    """Bytes in ``text`` ("20GiB", "24GB", "512MiB", "1e9" is not accepted), ``None`` if it is
    not a size. ``KiB``/``MiB``/``GiB`` are powers of 1024, ``KB``/``MB``/``GB`` of 1000."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        return None
    number, prefix, binary = match.groups()
    prefix = prefix.lower()
    scale = 1024 ** "_kmgt".index(prefix) if binary and prefix else _UNITS[prefix]
    value = int(float(number) * scale)
    return value if value > 0 else None


def host_available() -> int:
    """Bytes of host memory available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_free(device: torch.device) -> int | None:
    """Bytes free on ``device``; ``None`` for the CPU, whose memory is the host's (no
    separate budget: chunks there follow the settings)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None
