"""Pass/fail criteria for ``make bench``, so CI or a deployment script can act on a benchmark, not only read it.

Every criterion compares each native engine of the run (``native``, ``native-torch``) with the upstream reference
timed **in the same run** (same machine, input, flags, threads, weights): ratios measured on different days of this
project's VMs differ by more than the effects under test. A criterion that cannot be evaluated (no reference in the
run, a missing RSS record or segmentation) is unmet, never silently held: a gate that cannot look must not pass.

Criteria (``make bench`` variables in brackets): ``--max-time-ratio`` [MAX_TIME_RATIO], mean wall time of the
native engine over the reference's; ``--max-rss-ratio`` [MAX_RSS_RATIO], peak RSS over the reference's;
``--min-agreement`` [MIN_AGREEMENT], percentage of voxels whose label equals the reference's (100: identical).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

REFERENCE = "reference"


@dataclass(frozen=True)
class Criteria:
    max_time_ratio: float | None = None
    max_rss_ratio: float | None = None
    min_agreement: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Criteria:
        return cls(args.max_time_ratio, args.max_rss_ratio, args.min_agreement)

    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def check(self) -> str | None:
        """Why these criteria are unusable (a usage error), or None."""
        for name, value in asdict(self).items():
            if value is not None and value <= 0:
                return f"{name.upper()} must be > 0, not {value:g}"
        if self.min_agreement is not None and self.min_agreement > 100:
            return f"MIN_AGREEMENT is a percentage (at most 100), not {self.min_agreement:g}"
        return None


@dataclass(frozen=True)
class Verdict:
    engine: str
    criterion: str  # the make variable
    limit: float
    value: float | None
    held: bool
    detail: str

    def line(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.4g}"
        op = ">=" if self.criterion == "MIN_AGREEMENT" else "<="
        state = "held" if self.held else "UNMET"
        return f"gate {state}: {self.engine} {self.criterion} {shown} (limit {op} {self.limit:g}; {self.detail})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gate (exit 1 when a criterion is unmet; each native engine against the reference "
                             "of the same run)")
    g.add_argument("--max-time-ratio", type=float, help="Highest native/reference mean wall-time ratio.")
    g.add_argument("--max-rss-ratio", type=float, help="Highest native/reference peak-RSS ratio.")
    g.add_argument("--min-agreement", type=float, help="Lowest percentage of voxels labelled as the reference.")


def agreement(seg: Path, ref: Path) -> float:
    """Percentage of voxels whose label in ``seg`` equals ``ref``'s (same grid: both are on the input's)."""
    a = np.asanyarray(nib.load(str(seg)).dataobj)
    b = np.asanyarray(nib.load(str(ref)).dataobj)
    if a.shape != b.shape:
        raise ValueError(f"{seg} has shape {a.shape}, {ref} has {b.shape}")
    return float(np.count_nonzero(a == b)) * 100.0 / a.size


def evaluate(criteria: Criteria, rows: list[dict], segs: dict[str, Path], skipped: dict[str, str]) -> list[Verdict]:
    """One verdict per criterion and native engine; ``rows`` as bench.summarise makes them, ``segs`` each engine's
    last segmentation."""
    by_name = {r["engine"]: r for r in rows}
    natives = [r["engine"] for r in rows if r["engine"].startswith("native")]
    ref = by_name.get(REFERENCE)
    missing_ref = skipped.get(REFERENCE, "it did not run")
    out: list[Verdict] = []
    for name in natives:
        row = by_name[name]
        if criteria.max_time_ratio is not None:
            if ref is None:
                out.append(Verdict(name, "MAX_TIME_RATIO", criteria.max_time_ratio, None, False,
                                   f"no reference in this run: {missing_ref}"))
            else:
                ratio = row["mean_s"] / ref["mean_s"]
                out.append(Verdict(name, "MAX_TIME_RATIO", criteria.max_time_ratio, ratio,
                                   ratio <= criteria.max_time_ratio,
                                   f"{row['mean_s']:.2f} s vs reference {ref['mean_s']:.2f} s"))
        if criteria.max_rss_ratio is not None:
            if ref is None or not ref.get("peak_rss_kb") or not row.get("peak_rss_kb"):
                why = f"no reference in this run: {missing_ref}" if ref is None else "peak RSS not recorded"
                out.append(Verdict(name, "MAX_RSS_RATIO", criteria.max_rss_ratio, None, False, why))
            else:
                ratio = row["peak_rss_kb"] / ref["peak_rss_kb"]
                out.append(Verdict(name, "MAX_RSS_RATIO", criteria.max_rss_ratio, ratio,
                                   ratio <= criteria.max_rss_ratio,
                                   f"{row['peak_rss_kb'] / 2**20:.2f} GiB vs reference "
                                   f"{ref['peak_rss_kb'] / 2**20:.2f} GiB"))
        if criteria.min_agreement is not None:
            out.append(_agreement_verdict(name, criteria.min_agreement, segs, ref is not None, missing_ref))
    return out


def _agreement_verdict(name: str, limit: float, segs: dict[str, Path], have_ref: bool, missing_ref: str) -> Verdict:
    if not have_ref:
        return Verdict(name, "MIN_AGREEMENT", limit, None, False, f"no reference in this run: {missing_ref}")
    seg, ref = segs.get(name), segs.get(REFERENCE)
    if seg is None or ref is None or not seg.is_file() or not ref.is_file():
        return Verdict(name, "MIN_AGREEMENT", limit, None, False, "a segmentation of the last run is missing")
    try:
        pct = agreement(seg, ref)
    except (OSError, ValueError) as exc:
        return Verdict(name, "MIN_AGREEMENT", limit, None, False, f"cannot compare: {exc}")
    return Verdict(name, "MIN_AGREEMENT", limit, pct, pct >= limit, "voxels labelled as the reference, %")


def markdown(verdicts: list[Verdict]) -> str:
    if not verdicts:
        return ""
    lines = ["", "## Gate", "", "| engine | criterion | value | limit | result | detail |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        op = "≥" if v.criterion == "MIN_AGREEMENT" else "≤"
        shown = "n/a" if v.value is None else f"{v.value:.4g}"
        lines.append(f"| {v.engine} | {v.criterion} | {shown} | {op} {v.limit:g} | "
                     f"{'held' if v.held else '**unmet**'} | {v.detail} |")
    held = sum(v.held for v in verdicts)
    lines += ["", f"{held} of {len(verdicts)} criteria held."]
    return "\n".join(lines) + "\n"
