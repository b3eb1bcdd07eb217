"""Memory sizes as users write them (``--max-memory 8G``) and as every message prints them."""

from __future__ import annotations

import math

from ..errors import SizeError

GB = 1e9
_UNITS = {"": None, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2.0 ** 10, "mib": 2.0 ** 20, "gib": 2.0 ** 30, "tib": 2.0 ** 40}


def parse_size(text: str) -> float | None:
    """``auto`` (None: the memory available) or a size with a unit, in bytes.

    Decimal units (``8G`` = ``8GB`` = 8e9 bytes, ``8000M``, ``12.5G``) as in every message of the toolkit;
    ``GiB`` and friends are binary. A bare number is refused: 8 bytes and 8 GB are both plausible typos.
    """
    value = str(text).strip().lower()
    if value == "auto":
        return None
    number = value.rstrip("kmgtib")
    unit = value[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = math.nan
    if unit not in _UNITS or not math.isfinite(amount) or amount <= 0 or _UNITS[unit] is None:
        raise SizeError(f"invalid size {text!r}: give a positive number with a unit, e.g. 8G, 8GB, 8000M, 12.5G "
                        "or 8GiB, or auto (the memory available)")
    return amount * _UNITS[unit]  # type: ignore[operator]


def format_size(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB"
