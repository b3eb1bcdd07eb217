"""Runs a batch: the networks are built once, then every image of the plan is segmented and written,
a failing image is reported and the others carry on.

What makes a batch safe to run unattended lives here (docs/reliability.md): outputs are checked for
writability and locked before an image is read, the memory it needs is estimated from its header
(over the budget, the network runs in overlapping tiles), and all of its files (and its row of a
shared CSV) are staged and renamed into place together, so a failure or an interrupt leaves no
partial output and no other image is lost. The steps of one image are the engine's
(:mod:`synthseg_native.engine.segment`: prepare, run_network, finish), which :mod:`.pipeline` runs for
three scans at once (the next one read, the previous one written while the network runs); the
bookkeeping around them (resume, provenance, snapshots, progress) is
:class:`synthseg_native.batch.cohort.Batch`'s.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Options
from ..engine import memory, segment
from ..engine import predictor as engine
from ..engine.backend import Backend, out_of_memory
from ..engine.preprocess import Prepared
from ..engine.segment import NetworkOutput, memory_plan
from ..engine.spec import ModelSpec
from ..errors import Cancelled, InputError, LockedError, MemoryShortage, WeightsError
from ..io import colours
from ..io.atomic import StagedOutputs, check_writable, stale_temps
from ..io.freesurfer import LookupTable, save_like_surfa
from ..io.images import LoadedImage, as_nifti, load_image, peek_image, save_image
from ..io.locking import LockSet
from ..log import DONE, RUN
from . import pipeline
from . import tables as V
from .cohort import Batch
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


def run(opts: Options, plan: Plan, predictor: engine.Predictor | None = None, backend: Backend | None = None
        ) -> BatchReport:
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
    spec = ModelSpec.of(opts)
    try:
        predictor = predictor or engine.load(spec, timings, backend)
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
        steps = ScanSteps(opts, spec, plan, report, batch, predictor, timings, vol_table, qc_table)
        flow: pipeline.Run[Job] = pipeline.Run(steps, overlap=not opts.no_overlap)
        steps.checkpoint = flow.checkpoint
        batch.start(len(todo))
        try:
            flow.run(todo)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            if batch.progress:
                batch.progress.close()
            logger.error(f"interrupted ({signal.Signals(signum).name}) while segmenting "
                         f"{plan.images[steps.current]}: no partial output left; {batch.counts['segmented']} of "
                         f"{len(todo)} image(s) had finished")
            if opts.debug:
                traceback.print_exc()
            exc.reported = True  # type: ignore[attr-defined]  # the command line adds no second line
            raise
        batch.close()
    if opts.profile:
        _profile_summary(timings)
    n = len(plan.images)
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


def embedded_table(opts: Options) -> LookupTable | None:
    """``--addctab``'s colour table (None without it), said once in the log: FreeSurfer's whole table, or, where
    ``$FREESURFER_HOME`` has none, this toolkit's entries (a warning for ``mri_synthseg``, whose users expect
    FreeSurfer's)."""
    if not opts.addctab:
        return None
    table, what, freesurfers = colours.embedded_table(opts.parc)
    if not freesurfers and opts.conventions == "freesurfer":
        logger.warning(f"--addctab: FreeSurferColorLUT.txt not found under $FREESURFER_HOME: embedding {what}")
    else:
        logger.info(f"--addctab: embedding {what}")
    return table


def sidecars(seg_path: str, opts: Options) -> list[Path]:
    """The files written beside a segmentation: synthseg-native's ``_ctab.txt`` for NIfTI with ``--addctab``."""
    if colours.wants_sidecar(seg_path, opts.addctab, opts.conventions):
        return [colours.sidecar_path(seg_path)]
    return []


def write_segmentation(path: str, result: segment.Segmentation, source: Any, opts: Options,
                       lut: LookupTable | None, stage: StagedOutputs) -> None:
    """Stage the segmentation file as upstream writes it (nibabel, the input's header, int32), or, with
    ``--keepgeom``/``--addctab``, as FreeSurfer 8 rewrites it through surfa (the input's grid, FreeSurfer's header
    extension and colour table: ``io.freesurfer``); and the sidecar table of :func:`sidecars`."""
    if not (opts.keepgeom or opts.addctab):
        save_image(result.labels, result.affine, result.header, path, dtype="int32", stage=stage)
        return
    written = as_nifti(result.labels, result.affine, result.header, dtype="int32")
    save_like_surfa(path, written, source, opts.keepgeom, lut, stage)
    if sidecars(path, opts):
        colours.write_sidecar(path, result.labels, opts.parc, stage)


def describe(exc: BaseException, path: str) -> str:
    """The [ERR] text for a failed image: the input, then the cause (and the way out of a memory shortage: the
    backends turn their frameworks' out-of-memory into :class:`MemoryShortage`, numpy's is turned here)."""
    if isinstance(exc, MemoryError):
        exc = out_of_memory(str(exc) or "MemoryError")
    known = isinstance(exc, (InputError, OSError, ValueError, LockedError, MemoryShortage))
    detail = str(exc) if known else f"{type(exc).__name__}: {exc}"
    return detail if detail.startswith(path) else f"{path}: {detail}"


@dataclass(eq=False)
class Job:
    """One scan in flight: its files, locks and staged outputs, and what each step has produced so far."""

    k: int
    outputs: list[str]
    locks: LockSet
    stage: StagedOutputs
    timings: engine.Timings = field(default_factory=engine.Timings)  # this scan's own (scans overlap)
    decision: memory.Decision | None = None
    img: LoadedImage | None = None
    prep: Prepared | None = None
    net: NetworkOutput | None = None
    beside: float = 0.0  # bytes it holds while another scan's network runs (memory.beside_bytes)
    _guard: threading.RLock = field(default_factory=threading.RLock)
    _released: bool = False

    def acquire(self) -> None:
        """Its output locks; refused once the job was let go (an interrupted batch may abandon it meanwhile)."""
        with self._guard:
            if self._released:
                raise Cancelled("the scan was abandoned")
            self.locks.__enter__()

    def release(self) -> None:
        """Its output locks, once (the writer after the commit, or the main thread abandoning it)."""
        with self._guard:
            if not self._released:
                self._released = True
                self.locks.__exit__(None, None, None)


class ScanSteps:
    """The runner's side of :class:`pipeline.Steps`: one scan from checks to committed outputs. Nothing of a scan
    reaches its final names unless all of it was written; the bookkeeping of a finished or failed scan (log line,
    tables, provenance, snapshot, progress, report) happens in :meth:`finish` and :meth:`failed`, in order."""

    def __init__(self, opts: Options, spec: ModelSpec, plan: Plan, report: BatchReport, batch: Batch,
                 predictor: engine.Predictor, timings: engine.Timings, vol_table: V.CsvTable | None,
                 qc_table: V.CsvTable | None):
        self.opts, self.spec, self.plan, self.report, self.batch = opts, spec, plan, report, batch
        self.predictor = predictor
        self.timings, self.vol_table, self.qc_table = timings, vol_table, qc_table
        self.lut = embedded_table(opts)               # --addctab's colour table, read once
        self.current = 0                              # the scan whose network runs (or ran last)
        self.previous: Job | None = None              # the scan before it, maybe still being finished
        self.checkpoint: Callable[[], None] = lambda: None

    def started(self, k: int) -> None:
        self.current = k
        logger.log(RUN, f"{k + 1}/{len(self.plan.images)} {self.plan.images[k]}")

    def create(self, k: int) -> Job:
        """The checks that cost nothing, before minutes of work; it holds nothing yet (the pipeline records the job
        before :meth:`read` takes its locks, so an interrupt at any moment finds them)."""
        outputs = self.plan.image_outputs(k)
        for out in outputs:
            check_writable(out)
        return Job(k, outputs, LockSet(outputs), StagedOutputs())

    def read(self, job: Job) -> None:
        job.acquire()
        for out in job.outputs + [str(p) for p in sidecars(self.plan.seg[job.k], self.opts)]:
            for tmp in stale_temps(out):  # left by a killed run; safe to remove under the lock
                tmp.unlink(missing_ok=True)
        self.checkpoint()
        path = self.plan.images[job.k]
        info = peek_image(path)
        job.decision = memory_plan(path, info, self.spec, self.predictor)
        job.beside = memory.beside_bytes(info, self.spec)
        job.img = load_image(path)
        job.prep = segment.prepare(self.spec, job.img, path, job.timings)
        target = self.plan.resample[job.k]
        if target is not None:
            if job.prep.resampled is not None:
                save_image(job.prep.resampled, job.prep.affine, job.prep.header, target, stage=job.stage)
            else:
                logger.info(f"{path}: already at 1 mm, no resampled image written")

    def fits(self, job: Job) -> bool:
        """Its network beside the previous scan's finishing and the next scan's reading (taken to be its own
        size), within the budget the memory plan used."""
        decision = job.decision
        if decision is None or decision.budget is None or self.previous is None:
            return True
        need = decision.tiled_need if decision.tiling is not None else decision.estimate.need
        assert need is not None
        return need + self.previous.beside + job.beside <= decision.budget

    def network(self, job: Job) -> None:
        assert job.prep is not None and job.decision is not None
        job.net = segment.run_network(self.predictor, self.spec, job.prep, self.plan.images[job.k], job.decision,
                                      job.timings)
        job.prep.image = np.empty((0,), dtype=np.float32)  # the network input is spent: free it before the finish
        self.previous = job

    def finish(self, job: Job) -> None:
        rows, volumes, qc_scores = self._write(job)
        self.checkpoint()  # the last moment an interrupt may still drop this scan
        job.stage.commit()
        for table, row in rows:
            table.committed(row)
        job.release()
        self._done(job, volumes, qc_scores)

    def failed(self, k: int, exc: Exception) -> None:
        path, scan = self.plan.images[k], self.report.scans[k]
        msg = describe(exc, path)
        logger.error(msg)
        if self.opts.debug:
            traceback.print_exception(exc)
        self.batch.failed(k, msg)
        scan.status, scan.error, scan.exception = "failed", msg, exc

    def abandon(self, job: Job) -> None:
        job.stage.abort()
        job.release()
        job.img = job.prep = job.net = None

    def _write(self, job: Job) -> tuple[list[tuple[V.CsvTable, list[str]]], np.ndarray, np.ndarray | None]:
        """Post-process scan ``job.k`` and stage all of its outputs; returns the shared-CSV rows that become part
        of the tables once the stage is committed, the volumes and the QC scores."""
        opts, plan, k, stage = self.opts, self.plan, job.k, job.stage
        path = plan.images[k]
        assert job.img is not None and job.prep is not None and job.net is not None
        result = segment.finish(self.predictor, self.spec, job.img, job.prep, job.net, job.timings,
                                posteriors=plan.post[k] is not None)
        job.net = None
        self.checkpoint()
        t0 = time.perf_counter()
        write_segmentation(plan.seg[k], result, job.img.source, opts, self.lut, stage)
        if plan.post[k] is not None:
            self.checkpoint()
            save_image(result.posteriors, result.affine, result.header, plan.post[k], dtype="float32", stage=stage)
        rows: list[tuple[V.CsvTable, list[str]]] = []
        label_set = self.predictor.labels
        if plan.vol[k] is not None:
            row = V.volume_row(path, result.volumes)
            table = self.vol_table or V.CsvTable(plan.vol[k], V.volume_columns(label_set, opts.parc), shared=False)
            table.stage(row, stage)
            rows.append((table, row))
        if plan.qc[k] is not None and result.qc_scores is not None:
            row = V.qc_row(path, result.qc_scores)
            table = self.qc_table or V.CsvTable(plan.qc[k], V.qc_columns(label_set), shared=False)
            table.stage(row, stage)
            rows.append((table, row))
        job.timings.add("write", time.perf_counter() - t0)
        return rows, result.volumes, result.qc_scores

    def _done(self, job: Job, volumes: np.ndarray, qc_scores: np.ndarray | None) -> None:
        k, path, scan = job.k, self.plan.images[job.k], self.report.scans[job.k]
        # Its own work: the sum of its stages. Its wall time from the first check would also count the time it
        # waited in the pipeline for the scan before it, which scans that overlap make meaningless.
        stages = {stage: round(sec, 3) for stage, sec in job.timings.stages.items() if sec > 0}
        seconds = sum(job.timings.stages.values())
        self.timings.merge(job.timings)
        detail = "".join(f", {stage} {sec:.1f} s" for stage, sec in stages.items())
        logger.log(DONE, f"{path} -> {self.plan.seg[k]} ({seconds:.1f} s{detail})")
        self.batch.done(k, seconds, stages, volumes, qc_scores)
        scan.status, scan.seconds, scan.stages = "done", seconds, stages
        scan.volumes = V.as_dict(self.batch.headers["vol"], V.volume_row(path, volumes))
        if qc_scores is not None:
            scan.qc = V.as_dict(self.batch.headers["qc"], V.qc_row("", qc_scores))
