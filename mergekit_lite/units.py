"""Byte sizes as users write them ("5GB", "500M", "2k"): suffixes mean bytes, powers of 1000."""

from __future__ import annotations

import re

from .errors import UsageError

_SUFFIX = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
           "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Parse a byte size; k/M/G/T are decimal (like mergekit and the Hub), KiB/MiB/GiB binary."""
    if isinstance(text, int):
        if text <= 0:
            raise UsageError(f"size must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SUFFIX:
        raise UsageError(f"cannot read size {text!r} (examples: 5GB, 500M, 2000000)")
    value = int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return value


def format_size(n: int | float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
