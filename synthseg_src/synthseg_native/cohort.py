"""Cohorts: shards, resume, progress and QC bookkeeping around the runner's batch loop.

A study is hundreds to thousands of scans. The runner already builds the networks once per batch;
this module decides *which* scans a batch segments and what it leaves behind besides the outputs:

- ``--shard i/N`` keeps every N-th scan, starting with the i-th (1-based, like ``split -n l/i/N``),
  of the full, sorted list, so N workers given the same arguments split the work exactly, without
  talking to each other. Tables that all scans share (``--vol``/``--qc`` for a folder or BIDS
  input) get one file per shard, ``<name>.shard-i-of-N.csv``; ``finish`` merges them.
- ``--resume`` writes a provenance record per scan (:mod:`provenance`, as the pipeline stage does)
  and skips scans whose record proves the outputs current. A shared table must still hold the
  scan's row: rows of skipped scans are carried over into the rewritten table. When every scan is
  current the model is not even loaded.
- ``--snapshot DIR`` hands each scan to :mod:`snapshots` (PNG + a small JSON) and rebuilds the
  cohort page ``DIR/index.html`` at the end.

The Snakemake workflow runs these before and after its shards::

    python -m synthseg_native.cohort count -- ENGINE_ARGS...             # checks the arguments, prints the scan count
    python -m synthseg_native.cohort finish --shards N -- ENGINE_ARGS... # merges the shard tables, rebuilds the page
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace

import numpy as np

from . import labels as L
from . import provenance as P
from . import volumes as V
from .outputs import Plan, UsageError
from .progress import Progress, fmt_seconds
from .weights import WeightsError

Log = Callable[[str, str], None]
_SHARD_CSV = re.compile(r"\.shard-(\d+)-of-(\d+)\.csv$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` → (2, 4); i runs from 1 to N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise UsageError(f"--shard takes i/N, e.g. 1/4 (got {text!r})")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise UsageError(f"--shard {text}: need 1 <= i <= N")
    return i, n


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
                         "(python -m synthseg_native.cohort finish merges them)")
    return replace(plan, images=pick(plan.images), seg=pick(plan.seg), post=pick(plan.post),
                   resample=pick(plan.resample), vol=vol, qc=qc, names=pick(plan.names), notes=notes,
                   shard=(i, n))


def read_rows(path: str | None, header: list[str]) -> dict[str, list[str]]:
    """Rows of a shared table by subject, if ``path`` exists with this very header (else none)."""
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    if not rows or rows[0] != ["subject", *header]:
        return {}
    return {r[0]: r for r in rows[1:] if len(r) == len(header) + 1}


class OrderedTable(V.CsvTable):
    """A shared table whose rows stay in the plan's order, seeded with the rows of skipped scans."""

    def __init__(self, path: str, header: list[str], order: list[str], seed: list[list[str]]):
        super().__init__(path, header, shared=True)
        self.position = {name: k for k, name in reversed(list(enumerate(order)))}
        self.rows = list(seed)

    def _with(self, row: list[str]) -> list[list[str]]:
        rows = [r for r in self.rows if r[0] != row[0]] + [row]
        return sorted(rows, key=lambda r: self.position.get(r[0], len(self.position)))

    def add(self, row: list[str]) -> None:
        self.rows = self._with(row)
        self.flush()

    def stage(self, row: list[str], stage) -> None:
        from .io import write_text

        write_text(self.path, V.render(self.header, self._with(row), self.shared), stage=stage)

    def committed(self, row: list[str]) -> None:
        self.rows = self._with(row)


def engine_args(opts, plan: Plan, k: int) -> argparse.Namespace:
    """Scan k as the single-image run the pipeline stage would record (same parser, same flags)."""
    from .cli import build_parser

    ns = build_parser().parse_args(["--i", plan.images[k], "--o", plan.seg[k]])
    for f in fields(opts):
        if hasattr(ns, f.name) and f.name not in ("i", "o"):
            setattr(ns, f.name, getattr(opts, f.name))
    ns.post, ns.resample, ns.vol, ns.qc = plan.post[k], plan.resample[k], plan.vol[k], plan.qc[k]
    ns.engine = "native"
    return ns


class Batch:
    """What a batch does around each scan: resume checks, provenance, snapshots, progress, summary."""

    def __init__(self, opts, plan: Plan, log: Log):
        self.opts, self.plan, self.log = opts, plan, log
        label_set = L.LabelSet.build(opts.v1)
        self.headers = {"vol": V.volume_columns(label_set, opts.parc), "qc": V.qc_columns(label_set)}
        self.shared: list[str] = []
        if plan.shared_csv and plan.images:
            self.shared = [p for p in (plan.vol[0], plan.qc[0]) if p]
        self.cached: list[int] = []
        self.counts = {"segmented": 0, "current": 0, "failed": 0}
        self.busy = 0.0
        self.t0 = time.perf_counter()
        self.progress: Progress | None = None
        self._weights: dict[str, str] | None = None
        self._rows: dict[str, dict[str, list[str]]] = {}

    # -- resume -------------------------------------------------------------------------------------
    def _header(self, path: str) -> list[str]:
        return self.headers["vol"] if path == self.plan.vol[0] else self.headers["qc"]

    def _existing(self, path: str) -> dict[str, list[str]]:
        """Rows already on disk for a shared table: its own file, then the merged table a sharded run
        will be merged into (so a later run with another shard count still finds them)."""
        if path not in self._rows:
            rows = read_rows(unshard_csv(path), self._header(path)) if unshard_csv(path) != path else {}
            rows.update(read_rows(path, self._header(path)))
            self._rows[path] = rows
        return self._rows[path]

    def pending(self) -> list[int]:
        """Indices of the scans to segment; with --resume, current ones get a [SKIP] line instead."""
        n = len(self.plan.images)
        if not self.opts.resume or not n:
            return list(range(n))
        try:
            self._weights = P.weight_digests(engine_args(self.opts, self.plan, 0))
        except WeightsError:
            return list(range(n))  # the model load reports the missing weights
        todo, redo = [], 0
        for k, path in enumerate(self.plan.images):
            args = engine_args(self.opts, self.plan, k)
            try:
                reason = P.stale_reason(args, shared=self.shared, weights=self._weights)
            except OSError as exc:  # unreadable input: let the run report it
                reason = str(exc)
            subject = V.subject_name(path)
            if reason is None:
                missing = [t for t in self.shared if subject not in self._existing(t)]
                reason = f"its row is missing from {missing[0]}" if missing else None
            if reason is None:
                self.log("SKIP", f"{k + 1}/{n} {path}: outputs current ({os.path.basename(str(P.sidecar_path(args)))})")
                self.cached.append(k)
                self.counts["current"] += 1
                self._snapshot_cached(k)
                continue
            P.sidecar_path(args).unlink(missing_ok=True)  # untrusted until this run records it again
            if not reason.startswith("no provenance record"):
                redo += 1
                self.log("INFO", f"{path}: running again because {reason}")
            todo.append(k)
        self.log("INFO", f"resume: {len(self.cached)} of {n} scan(s) current, {len(todo)} to segment"
                         + (f" ({redo} again)" if redo else ""))
        return todo

    def table(self, path: str, header: list[str]) -> V.CsvTable:
        """The shared table the runner adds rows to; with --resume it keeps the skipped scans' rows."""
        if not self.opts.resume:
            return V.CsvTable(path, header, shared=True)
        subjects = [V.subject_name(p) for p in self.plan.images]
        rows = self._existing(path)
        seed = [rows[subjects[k]] for k in self.cached if subjects[k] in rows]
        return OrderedTable(path, header, subjects, seed)

    # -- per scan -----------------------------------------------------------------------------------
    def start(self, count: int) -> None:
        self.t0 = time.perf_counter()
        self.progress = Progress(count, self.log)

    def done(self, k: int, seconds: float, stages: dict[str, float], volumes: np.ndarray | None,
             qc_scores: np.ndarray | None) -> None:
        self.counts["segmented"] += 1
        self.busy += seconds
        if self.opts.resume:
            try:
                P.write(engine_args(self.opts, self.plan, k), shared=self.shared, weights=self._weights)
            except (P.ProvenanceError, OSError, WeightsError) as exc:
                self.log("WARN", f"{self.plan.images[k]}: no provenance record, a resumed batch will redo it ({exc})")
        if self.opts.snapshot:
            vols = None if volumes is None else dict(zip(self.headers["vol"], map(float, volumes)))
            qc = None
            if qc_scores is not None:
                qc = dict(zip(self.headers["qc"], map(float, V.qc_row("", qc_scores)[1:])))
            self._snapshot(k, "done", seconds=seconds, stages=stages, volumes=vols, qc=qc)
        if self.progress:
            self.progress.update(True)

    def failed(self, k: int, message: str) -> None:
        self.counts["failed"] += 1
        if self.opts.snapshot:
            self._snapshot(k, "failed", error=message)
        if self.progress:
            self.progress.update(False)

    def _snapshot(self, k: int, status: str, **info) -> None:
        from . import snapshots

        try:
            snapshots.record(self.opts.snapshot, self.plan.names[k], self.plan.images[k], self.plan.seg[k],
                             status, **info)
        except Exception as exc:  # a picture must never fail a segmentation
            self.log("WARN", f"{self.plan.images[k]}: no QC snapshot ({type(exc).__name__}: {exc})")

    def _snapshot_cached(self, k: int) -> None:
        """A skipped scan keeps its snapshot; one that has none (e.g. --snapshot added later) gets it now."""
        from . import snapshots

        if not self.opts.snapshot or snapshots.has_record(self.opts.snapshot, self.plan.names[k]):
            return
        volumes = None
        if self.plan.vol[k] is not None and self.plan.shared_csv:
            row = self._existing(self.plan.vol[k]).get(V.subject_name(self.plan.images[k]))
            volumes = dict(zip(self.headers["vol"], map(float, row[1:]))) if row else None
        self._snapshot(k, "current", volumes=volumes)

    def close(self) -> None:
        if self.progress:
            self.progress.close()
        c = self.counts
        if sum(c.values()) > 1 or c["current"]:
            mean = f", {self.busy / c['segmented']:.1f} s per segmented scan" if c["segmented"] else ""
            self.log("INFO", f"batch: {c['segmented']} segmented, {c['current']} current (skipped), "
                             f"{c['failed']} failed in {fmt_seconds(time.perf_counter() - self.t0)}{mean}")
        if self.opts.snapshot and self.plan.images:
            from . import snapshots

            try:
                self.log("INFO", f"cohort page: {snapshots.write_index(self.opts.snapshot)}")
            except OSError as exc:
                self.log("WARN", f"no cohort page ({exc})")


def stage_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Seconds per stage of one scan, from the batch's running totals (``Timings``) before and after it."""
    return {stage: round(after[stage] - before.get(stage, 0.0), 3) for stage in after
            if stage != "load_weights" and after[stage] > before.get(stage, 0.0)}


def merge_tables(plan: Plan, header: list[str], target: str, n: int, log: Log) -> int:
    """Merge the shard tables of ``target`` into it, in the plan's order; returns the rows written.

    Rows already in ``target`` (an earlier merge) are kept unless a shard has a newer one, so merging
    twice, or after shard files were removed, loses nothing. Merged shard files are removed.
    """
    rows = read_rows(target, header)
    parts = [shard_csv(target, i, n) for i in range(1, n + 1)]
    for part in parts:
        if os.path.isfile(part):
            new = read_rows(part, header)
            if not new:
                log("WARN", f"{part}: not a table of these flags; not merged")
                continue
            rows.update(new)
    subjects = [V.subject_name(p) for p in plan.images]
    missing = [s for s in subjects if s not in rows]
    for s in missing:
        log("WARN", f"{target}: no row for {s}")
    table = V.CsvTable(target, header, shared=True)
    table.rows = [rows[s] for s in dict.fromkeys(subjects) if s in rows]
    table.flush()
    for part in parts:
        if os.path.isfile(part):
            os.remove(part)
    return len(table.rows)


def finish(args: argparse.Namespace, n: int, log: Log) -> int:
    """After all shards: one volume/QC table in the full plan's order, and the cohort page."""
    from .cli import make_plan

    plan = make_plan(args, shard=False)
    label_set = L.LabelSet.build(args.v1)
    if plan.shared_csv:
        for path, header in ((plan.vol[0], V.volume_columns(label_set, args.parc)),
                             (plan.qc[0], V.qc_columns(label_set))):
            if path:
                log("INFO", f"{path}: {merge_tables(plan, header, path, n, log)} of {len(plan.images)} row(s)")
    if args.snapshot:
        from . import snapshots

        log("INFO", f"cohort page: {snapshots.write_index(os.path.abspath(args.snapshot))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import build_parser
    from .runner import log

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        print("usage: python -m synthseg_native.cohort {count | finish --shards N} -- ENGINE_ARGS...",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m synthseg_native.cohort")
    p.add_argument("command", choices=["count", "finish"])
    p.add_argument("--shards", type=int, default=1, help="how many shards the engine args were run with")
    opts = p.parse_args(argv[:cut])
    args = build_parser().parse_args(argv[cut + 1:])
    try:
        if opts.shards < 1:
            raise UsageError("--shards must be >= 1")
        if opts.command == "count":
            from .cli import _check, make_plan

            _check(args)
            print(len(make_plan(args, shard=False).images))
            return 0
        return finish(args, opts.shards, log)
    except UsageError as exc:
        log("ERR", str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
