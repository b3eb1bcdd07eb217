"""Batch progress: a tqdm bar with ETA on a terminal, plain ``[INFO] progress`` lines everywhere else.

A bar is only useful to a person watching; in a log file (Snakemake, SLURM, CI) its carriage returns
are noise, so off a terminal the same information comes as one line per finished scan. While a bar
is drawn, every log line passes above it instead of through it (``log.pause_with``).
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import AbstractContextManager
from typing import IO

from ..log import pause_with, stop_pausing

logger = logging.getLogger(__name__)


def fmt_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``: readable at a glance in a log."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _above_bar(stream: IO[str]) -> AbstractContextManager[None]:
    """Clear the bar while a log line is printed to ``stream`` and redraw it after."""
    from tqdm import tqdm

    return tqdm.external_write_mode(file=stream)


class Progress:
    """Counts finished scans of a batch and estimates the time left from the mean time per scan so far."""

    def __init__(self, total: int, stream: IO[str] | None = None, bar: bool | None = None):
        self.total = total
        self.done = self.failed = 0
        self.t0 = time.perf_counter()
        stream = stream or sys.stderr
        use_bar = (hasattr(stream, "isatty") and stream.isatty()) if bar is None else bar
        self.bar = None
        if use_bar and total > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="scan", file=stream, dynamic_ncols=True, desc="SynthSeg",
                            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed} elapsed, ETA {remaining}")
            pause_with(_above_bar)

    def eta(self) -> float | None:
        """Seconds left, or None before the first scan has finished."""
        finished = self.done + self.failed
        if not finished:
            return None
        return (time.perf_counter() - self.t0) / finished * (self.total - finished)

    def update(self, ok: bool) -> None:
        if ok:
            self.done += 1
        else:
            self.failed += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        finished, eta = self.done + self.failed, self.eta()
        logger.info(f"progress {finished}/{self.total} ({100 * finished // max(self.total, 1)} %), "
                    f"{fmt_seconds(time.perf_counter() - self.t0)} elapsed, ETA {fmt_seconds(eta or 0)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            stop_pausing(_above_bar)
            self.bar = None
