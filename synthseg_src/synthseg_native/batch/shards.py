"""Shards: N workers given the same arguments split a cohort exactly, without talking to each other.

``--shard i/N`` keeps every N-th scan, starting with the i-th (1-based, like ``split -n l/i/N``), of the
full, sorted list. Tables that all scans share (``--vol``/``--qc`` for a folder or BIDS input) get one
file per shard, ``<name>.shard-i-of-N.csv``, which ``synthseg-native cohort finish``
merges. :func:`make_plan` is where a run's options become its list of files.
"""

from __future__ import annotations

import re
from dataclasses import replace

from ..config import Options, parse_shard
from .bids import is_dataset, plan_bids
from .plan import Plan, plan_outputs

_SHARD_CSV = re.compile(r"\.shard-(\d+)-of-(\d+)\.csv$")


def make_plan(opts: Options, shard: bool = True) -> Plan:
    """Which files the run reads and writes: BIDS naming for a BIDS dataset, else upstream's rules;
    then the part of it that ``--shard`` selects."""
    if is_dataset(opts.i):
        plan = plan_bids(opts.i, opts.o or "", opts.post, opts.resample, opts.vol, _path(opts.qc),
                         tuple(opts.bids_suffix))
    else:
        plan = plan_outputs(opts.i or "", opts.o or "", opts.post, opts.resample, opts.vol, _path(opts.qc))
    if shard and opts.shard:
        plan = shard_plan(plan, *parse_shard(opts.shard))
    return plan


def _path(value: str | bool | None) -> str | None:
    """``qc`` as a path: the API's ``Segmenter(qc=True)`` only asks for the network, not for a table."""
    return value if isinstance(value, str) else None


def shard_indices(count: int, i: int, n: int) -> list[int]:
    """Positions of shard i of n in a list of ``count`` scans: round robin, so shards differ by at most one
    scan and neighbours in a sorted list (often one subject's sessions) run in parallel."""
    return list(range(i - 1, count, n))


def shard_csv(path: str, i: int, n: int) -> str:
    stem = path[:-4] if path.endswith(".csv") else path
    return f"{stem}.shard-{i}-of-{n}.csv"


def unshard_csv(path: str) -> str:
    return _SHARD_CSV.sub(".csv", path)


def shard_plan(plan: Plan, i: int, n: int) -> Plan:
    """The part of ``plan`` that shard i of n segments (scan names stay those of the full plan)."""
    idx = shard_indices(len(plan.images), i, n)

    def pick(values: list) -> list:
        return [values[k] for k in idx]

    vol, qc = pick(plan.vol), pick(plan.qc)
    notes = list(plan.notes) + [f"shard {i}/{n}: {len(idx)} of {len(plan.images)} scan(s)"]
    if plan.shared_csv and n > 1:
        vol = [p and shard_csv(p, i, n) for p in vol]
        qc = [p and shard_csv(p, i, n) for p in qc]
        if any(vol) or any(qc):
            notes.append(f"shard tables: {', '.join(sorted({p for p in vol[:1] + qc[:1] if p}))} "
                         "(synthseg-native cohort finish merges them)")
    return replace(plan, images=pick(plan.images), seg=pick(plan.seg), post=pick(plan.post),
                   resample=pick(plan.resample), vol=vol, qc=qc, names=pick(plan.names), notes=notes,
                   shard=(i, n))
