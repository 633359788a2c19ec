"""Memory budgets: parsing ``budget=`` and printing byte counts."""
from __future__ import annotations

import numbers
import re

# A safe share of the free memory when no budget is given: leaves room for the rest of the process,
# the allocator's fragmentation and the result buffer (counted separately on the host).
DEFAULT_SHARE = 0.5

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)
_SHARE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
FORMS = ('"20GB", "20 GB", "512MiB", "1.5GiB" (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary, any case), '
         'an int of bytes, "80%" of the free memory, or None for a safe default share of it')


def check_budget(budget) -> None:
    """Raises ValueError unless ``budget`` has one of the accepted forms (no free memory needed)."""
    parse_budget(budget, 1 << 40)


def parse_budget(budget, free_bytes: int) -> int:
    """Bytes allowed for ``budget`` on a device with ``free_bytes`` free. Raises ValueError otherwise."""
    if budget is None:
        return int(free_bytes * DEFAULT_SHARE)
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
        if budget > 0:
            return int(budget)
    elif isinstance(budget, str):
        m = _SHARE.match(budget)
        if m and 0 < float(m.group(1)) <= 100 and free_bytes * float(m.group(1)) / 100 >= 1:
            return int(free_bytes * float(m.group(1)) / 100)
        m = _SIZE.match(budget)
        if m and m.group(2).lower() in _UNITS and float(m.group(1)) * _UNITS[m.group(2).lower()] >= 1:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    got = repr(budget) if isinstance(budget, (str, int, float)) else type(budget).__name__
    raise ValueError(f"chunkjac: budget={got} is not a memory size; use {FORMS}.")


def format_bytes(n: float) -> str:
    """Decimal units, as budgets are usually written: 17.2 GB, 512 MB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
