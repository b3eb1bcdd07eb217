"""Runs a batch: the networks are built once, then every image of the plan is segmented and written,
a failing image is reported and the others carry on.

What makes a batch safe to run unattended lives here (docs/reliability.md): outputs are checked for
writability and locked before an image is read, the memory it needs is estimated from its header
(over the budget, the network runs in overlapping tiles), and all of its files (and its row of a
shared CSV) are staged and renamed into place together, so a failure or an interrupt leaves no
partial output and no other image is lost. The steps of one image are the engine's
(:func:`synthseg_native.engine.segment.segment_image`); the bookkeeping around them (resume,
provenance, snapshots, progress) is :class:`synthseg_native.batch.cohort.Batch`'s.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from ..config import Options
from ..engine import predictor as engine
from ..engine.preprocess import Prepared
from ..engine.segment import memory_plan, segment_image
from ..errors import InputError, LockedError, MemoryShortage, WeightsError
from ..io import colours
from ..io.atomic import StagedOutputs, check_writable, stale_temps
from ..io.images import load_image, peek_image, save_image
from ..io.locking import LockSet
from ..log import DONE, RUN
from . import tables as V
from .cohort import Batch, stage_deltas
from .plan import Plan

logger = logging.getLogger(__name__)


@dataclass
class ScanReport:
    """What became of one scan of a batch."""

    input: str
    outputs: list[str]                       # the files it wrote (or would have)
    status: str                              # "done", "current" (skipped by --resume), "failed", "pending"
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    volumes: dict[str, float] | None = None  # the volume CSV's columns (mm³), when this run computed them
    qc: dict[str, float] | None = None       # the QC CSV's columns, when this run computed them
    error: str | None = None                 # the [ERR] line's text
    exception: BaseException | None = field(default=None, repr=False)


@dataclass
class BatchReport:
    """The outcome of :func:`run`: one :class:`ScanReport` per scan of the plan, and the exit status."""

    scans: list[ScanReport]
    exit_code: int = 0
    timings: engine.Timings = field(default_factory=engine.Timings)

    @property
    def failed(self) -> list[ScanReport]:
        return [s for s in self.scans if s.status == "failed"]


def run(opts: Options, plan: Plan, predictor: engine.Predictor | None = None) -> BatchReport:
    """Segment the images of ``plan`` (with --resume: those not current).

    A failing scan is reported ([ERR] line, :attr:`ScanReport.error`) and the others carry on. What stops the
    whole batch is raised: no weights (:class:`WeightsError`), a shared table that is locked or cannot be
    written (:class:`LockedError`, :class:`OSError`), and Ctrl-C/SIGTERM (``KeyboardInterrupt``, after its
    [ERR] line and the clean-up)."""
    timings = engine.Timings()
    report = BatchReport([ScanReport(p, plan.image_outputs(k), "pending") for k, p in enumerate(plan.images)],
                         timings=timings)
    for note in plan.notes:
        logger.info(note)
    batch = Batch(opts, plan)
    todo = batch.pending()  # before the model load: a finished batch loads nothing
    for k in batch.cached:
        report.scans[k].status = "current"
    if not todo:
        batch.close()
        return report
    try:
        predictor = predictor or engine.load(opts, timings)
    except WeightsError:
        batch.close()
        raise
    label_set = predictor.labels
    vol_table = qc_table = None
    if plan.shared_csv and plan.vol[0] is not None:
        vol_table = batch.table(plan.vol[0], V.volume_columns(label_set, opts.parc))
    if plan.shared_csv and plan.qc[0] is not None:
        qc_table = batch.table(plan.qc[0], V.qc_columns(label_set))

    # A shared CSV collects every image's row: it is checked and locked for the whole batch, so that a second
    # batch writing the same table fails at once instead of overwriting rows.
    with contextlib.ExitStack() as locks:
        try:
            for out in plan.shared_outputs():
                check_writable(out)
            locks.enter_context(LockSet(plan.shared_outputs()))
        except (OSError, LockedError):
            batch.close()
            raise
        for out in plan.shared_outputs():
            for tmp in stale_temps(out):
                tmp.unlink(missing_ok=True)
        n = len(plan.images)
        k = todo[0]
        batch.start(len(todo))
        try:
            for k in todo:
                path, scan = plan.images[k], report.scans[k]
                t_start, before = time.perf_counter(), dict(timings.stages)
                logger.log(RUN, f"{k + 1}/{n} {path}")
                try:
                    volumes, qc_scores = _one(opts, plan, k, predictor, timings, vol_table, qc_table)
                except Exception as exc:  # one bad scan must not stop a batch; Ctrl-C still does
                    msg = describe(exc, path)
                    logger.error(msg)
                    if opts.debug:
                        traceback.print_exc()
                    batch.failed(k, msg)
                    scan.status, scan.error, scan.exception = "failed", msg, exc
                    continue
                seconds = time.perf_counter() - t_start
                stages = stage_deltas(before, timings.stages)
                detail = "".join(f", {stage} {sec:.1f} s" for stage, sec in stages.items())
                logger.log(DONE, f"{path} -> {plan.seg[k]} ({seconds:.1f} s{detail})")
                batch.done(k, seconds, stages, volumes, qc_scores)
                scan.status, scan.seconds, scan.stages = "done", seconds, stages
                scan.volumes = V.as_dict(batch.headers["vol"], V.volume_row(path, volumes))
                if qc_scores is not None:
                    scan.qc = V.as_dict(batch.headers["qc"], V.qc_row("", qc_scores))
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            if batch.progress:
                batch.progress.close()
            logger.error(f"interrupted ({signal.Signals(signum).name}) while segmenting {plan.images[k]}: no "
                         f"partial output left; {batch.counts['segmented']} of {len(todo)} image(s) had finished")
            if opts.debug:
                traceback.print_exc()
            exc.reported = True  # type: ignore[attr-defined]  # the command line adds no second line
            raise
        batch.close()
    if opts.profile:
        _profile_summary(timings)
    failed = [s.input for s in report.failed]
    if failed:
        if n > 1:  # a single image's failure is already its one [ERR] line
            logger.error(f"{len(failed)} of {n} image(s) failed: {', '.join(failed)}")
        report.exit_code = 1
    return report


def _profile_summary(timings: engine.Timings) -> None:
    for stage, sec in timings.stages.items():
        logger.info(f"profile {stage}: {sec:.3f} s (peak RSS so far {timings.peak_gb[stage]:.2f} GB)")
    if timings.network_flop and timings.stages.get("network"):
        gflop = timings.network_flop / 1e9
        logger.info(f"profile network throughput: {gflop:.1f} GFLOP (convolutions) in "
                    f"{timings.stages['network']:.3f} s = {gflop / timings.stages['network']:.1f} GFLOP/s")


def describe(exc: BaseException, path: str) -> str:
    """The [ERR] text for a failed image: the input, then the cause (and the way out of a memory shortage)."""
    known = isinstance(exc, (InputError, OSError, ValueError, LockedError, MemoryShortage))
    detail = str(exc) if known else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "ResourceExhaustedError":
        cause = (str(exc).splitlines() or [type(exc).__name__])[0]
        detail = (f"out of memory ({cause}); use --crop (e.g. --crop 160) to segment a smaller centred patch, "
                  "or --max-memory below what the machine has (e.g. --max-memory 8G) for smaller tiles")
    return detail if detail.startswith(path) else f"{path}: {detail}"


def _one(opts: Options, plan: Plan, k: int, predictor: engine.Predictor, timings: engine.Timings,
         vol_table: V.CsvTable | None, qc_table: V.CsvTable | None) -> tuple[np.ndarray, np.ndarray | None]:
    """One image, from checks to committed outputs: nothing of it reaches its final names unless all of it
    was written. Returns its volumes and QC scores (for the cohort page)."""
    outputs = plan.image_outputs(k)
    for out in outputs:
        check_writable(out)  # before minutes of work, not after
    with LockSet(outputs), StagedOutputs() as stage:
        for out in outputs + ([str(colours.sidecar_path(plan.seg[k]))] if opts.addctab else []):
            for tmp in stale_temps(out):  # left by a killed run; safe to remove under the lock
                tmp.unlink(missing_ok=True)
        rows, volumes, qc_scores = _segment(opts, plan, k, predictor, timings, vol_table, qc_table, stage)
        stage.commit()
    for table, row in rows:
        table.committed(row)
    return volumes, qc_scores


def _segment(opts: Options, plan: Plan, k: int, predictor: engine.Predictor, timings: engine.Timings,
             vol_table: V.CsvTable | None, qc_table: V.CsvTable | None, stage: StagedOutputs
             ) -> tuple[list[tuple[V.CsvTable, list[str]]], np.ndarray, np.ndarray | None]:
    """The engine on image ``k`` with every output staged; returns the shared-CSV rows that become part of the
    tables once the stage is committed, the volumes and the QC scores."""
    path = plan.images[k]
    decision = memory_plan(path, peek_image(path), opts, predictor)
    img = load_image(path)

    def write_resampled(prep: Prepared) -> None:
        if plan.resample[k] is None:
            return
        if prep.resampled is not None:
            save_image(prep.resampled, prep.affine, prep.header, plan.resample[k], stage=stage)
        else:
            logger.info(f"{path}: already at 1 mm, no resampled image written")

    result = segment_image(predictor, opts, img, path, decision, timings, posteriors=plan.post[k] is not None,
                           prepared=write_resampled)
    t0 = time.perf_counter()
    save_image(result.labels, result.affine, result.header, plan.seg[k], dtype="int32", stage=stage)
    if opts.addctab:
        colours.attach(plan.seg[k], result.labels, parc=opts.parc, stage=stage)
    if plan.post[k] is not None:
        save_image(result.posteriors, result.affine, result.header, plan.post[k], dtype="float32", stage=stage)
    rows: list[tuple[V.CsvTable, list[str]]] = []
    label_set = predictor.labels
    if plan.vol[k] is not None:
        row = V.volume_row(path, result.volumes)
        table = vol_table or V.CsvTable(plan.vol[k], V.volume_columns(label_set, opts.parc), shared=False)
        table.stage(row, stage)
        rows.append((table, row))
    if plan.qc[k] is not None and result.qc_scores is not None:
        row = V.qc_row(path, result.qc_scores)
        table = qc_table or V.CsvTable(plan.qc[k], V.qc_columns(label_set), shared=False)
        table.stage(row, stage)
        rows.append((table, row))
    timings.add("write", time.perf_counter() - t0)
    return rows, result.volumes, result.qc_scores
