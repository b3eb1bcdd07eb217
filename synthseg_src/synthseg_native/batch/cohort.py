"""Cohorts: resume, progress, QC bookkeeping and shard merging around the runner's batch loop.

A study is hundreds to thousands of scans. The runner already builds the networks once per batch;
this module decides *which* scans a batch segments and what it leaves behind besides the outputs:

- ``--shard i/N`` (:mod:`.shards`) splits the scan list; ``finish`` merges the shards' tables.
- ``--resume`` writes a provenance record per scan (:mod:`provenance`, as the pipeline stage does)
  and skips scans whose record proves the outputs current. A shared table must still hold the
  scan's row: rows of skipped scans are carried over into the rewritten table. When every scan is
  current the model is not even loaded.
- ``--snapshot DIR`` hands each scan to :mod:`snapshots` (PNG + a small JSON) and rebuilds the
  cohort page ``DIR/index.html`` at the end.

The Snakemake workflow runs these before and after its shards::

    synthseg-native cohort count -- ENGINE_ARGS...              # checks the arguments, counts scans
    synthseg-native cohort finish --shards N -- ENGINE_ARGS...  # merges the tables, rebuilds the page
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import replace

import numpy as np

from ..config import Options
from ..engine.predictor import label_set as run_labels
from ..engine.spec import ModelSpec
from ..errors import ProvenanceError, WeightsError
from ..io.atomic import StagedOutputs, write_text
from ..log import SKIP
from . import provenance as P
from . import snapshots
from . import tables as V
from .plan import Plan
from .progress import Progress, fmt_seconds
from .shards import make_plan, shard_csv, unshard_csv

logger = logging.getLogger(__spec__.name if __spec__ else __name__)  # under "python -m" too


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

    def stage(self, row: list[str], stage: StagedOutputs) -> None:
        write_text(self.path, V.render(self.header, self._with(row), self.shared), stage=stage)

    def committed(self, row: list[str]) -> None:
        self.rows = self._with(row)


def scan_options(opts: Options, plan: Plan, k: int) -> Options:
    """Scan k as the single-image run the pipeline stage would record (same options, its own files)."""
    return replace(opts, i=plan.images[k], o=plan.seg[k], post=plan.post[k], resample=plan.resample[k],
                   vol=plan.vol[k], qc=plan.qc[k], engine="native")


class Batch:
    """What a batch does around each scan: resume checks, provenance, snapshots, progress, summary."""

    def __init__(self, opts: Options, plan: Plan):
        self.opts, self.plan = opts, plan
        label_set = run_labels(ModelSpec.of(opts))
        self.headers = {"vol": V.volume_columns(label_set, opts.parc), "qc": V.qc_columns(label_set)}
        self.shared: list[str] = []
        if plan.shared_csv and plan.images:
            self.shared = [p for p in (plan.vol[0], plan.qc[0]) if p]
        self.cached: list[int] = []
        self.counts = {"segmented": 0, "current": 0, "failed": 0}
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
            self._weights = P.weight_digests(scan_options(self.opts, self.plan, 0))
        except WeightsError:
            return list(range(n))  # the model load reports the missing weights
        todo, redo = [], 0
        for k, path in enumerate(self.plan.images):
            args = scan_options(self.opts, self.plan, k)
            try:
                reason = P.stale_reason(args, shared=self.shared, weights=self._weights)
            except OSError as exc:  # unreadable input: let the run report it
                reason = str(exc)
            subject = V.subject_name(path)
            if reason is None:
                missing = [t for t in self.shared if subject not in self._existing(t)]
                reason = f"its row is missing from {missing[0]}" if missing else None
            if reason is None:
                logger.log(SKIP, f"{k + 1}/{n} {path}: outputs current ({os.path.basename(str(P.sidecar_path(args)))})")
                self.cached.append(k)
                self.counts["current"] += 1
                self._snapshot_cached(k)
                continue
            P.sidecar_path(args).unlink(missing_ok=True)  # untrusted until this run records it again
            if not reason.startswith("no provenance record"):
                redo += 1
                logger.info(f"{path}: running again because {reason}")
            todo.append(k)
        logger.info(f"resume: {len(self.cached)} of {n} scan(s) current, {len(todo)} to segment"
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
        self.progress = Progress(count)

    def done(self, k: int, seconds: float, stages: dict[str, float], volumes: np.ndarray | None,
             qc_scores: np.ndarray | None) -> None:
        self.counts["segmented"] += 1
        if self.opts.resume:
            try:
                P.write(scan_options(self.opts, self.plan, k), shared=self.shared, weights=self._weights)
            except (ProvenanceError, OSError, WeightsError) as exc:
                logger.warning(f"{self.plan.images[k]}: no provenance record, a resumed batch will redo it ({exc})")
        if self.opts.snapshot:
            vols = None if volumes is None else dict(zip(self.headers["vol"], map(float, volumes)))
            qc = None
            if qc_scores is not None:
                qc = V.as_dict(self.headers["qc"], V.qc_row("", qc_scores))
            self._snapshot(k, "done", seconds=seconds, stages=stages, volumes=vols, qc=qc)
        if self.progress:
            self.progress.update(True)

    def failed(self, k: int, message: str) -> None:
        self.counts["failed"] += 1
        if self.opts.snapshot:
            self._snapshot(k, "failed", error=message)
        if self.progress:
            self.progress.update(False)

    def _snapshot(self, k: int, status: str, **info: object) -> None:
        try:
            snapshots.record(self.opts.snapshot, self.plan.names[k], self.plan.images[k], self.plan.seg[k],
                             status, **info)
        except Exception as exc:  # a picture must never fail a segmentation
            logger.warning(f"{self.plan.images[k]}: no QC snapshot ({type(exc).__name__}: {exc})")

    def _snapshot_cached(self, k: int) -> None:
        """A skipped scan keeps its snapshot, marked current; one that has none (e.g. --snapshot added later) gets
        it now."""
        if not self.opts.snapshot:
            return
        try:
            if snapshots.mark_current(self.opts.snapshot, self.plan.names[k]):
                return
        except OSError as exc:
            logger.warning(f"{self.plan.images[k]}: QC record not updated ({exc})")
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
            # the batch's wall time per scan, not the sum of the scans' own times: scans overlap (batch.pipeline)
            wall = time.perf_counter() - self.t0
            mean = f", {wall / c['segmented']:.1f} s per segmented scan" if c["segmented"] else ""
            logger.info(f"batch: {c['segmented']} segmented, {c['current']} current (skipped), "
                        f"{c['failed']} failed in {fmt_seconds(wall)}{mean}")
        if self.opts.snapshot and self.plan.images:
            try:
                logger.info(f"cohort page: {snapshots.write_index(self.opts.snapshot)}")
            except OSError as exc:
                logger.warning(f"no cohort page ({exc})")


def merge_tables(plan: Plan, header: list[str], target: str, n: int) -> int:
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
                logger.warning(f"{part}: not a table of these flags; not merged")
                continue
            rows.update(new)
    subjects = [V.subject_name(p) for p in plan.images]
    missing = [s for s in subjects if s not in rows]
    for s in missing:
        logger.warning(f"{target}: no row for {s}")
    table = V.CsvTable(target, header, shared=True)
    table.rows = [rows[s] for s in dict.fromkeys(subjects) if s in rows]
    table.flush()
    for part in parts:
        if os.path.isfile(part):
            os.remove(part)
    return len(table.rows)


def finish(opts: Options, n: int) -> int:
    """After all shards: one volume/QC table in the full plan's order, and the cohort page."""
    plan = make_plan(opts, shard=False)
    label_set = run_labels(ModelSpec.of(opts))
    if plan.shared_csv:
        for path, header in ((plan.vol[0], V.volume_columns(label_set, opts.parc)),
                             (plan.qc[0], V.qc_columns(label_set))):
            if path:
                logger.info(f"{path}: {merge_tables(plan, header, path, n)} of {len(plan.images)} row(s)")
    if opts.snapshot:
        logger.info(f"cohort page: {snapshots.write_index(opts.snapshot)}")
    return 0
