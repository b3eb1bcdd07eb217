"""Runs a batch: builds the networks once, then load → preprocess → network → postprocess → write
for every image, reporting a failing image and carrying on with the others.

This is the only module that knows the order of the steps; each step lives in its own module. It
also owns what makes a batch safe to run unattended (docs/reliability.md): outputs are checked for
writability and locked before an image is read, the memory it needs is estimated from its header
(over the budget, the network runs in overlapping tiles: tiling.py), and all of its files (and its row
of a shared CSV) are staged and renamed into place together, so a failure or an interrupt leaves no
partial output and no other image is lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from . import colours, geometry, memory, progress, tiling
from . import labels as L
from . import qc as qc_heads
from . import volumes as V
from .flags import SynthSegFlags
from .io import InputError, StagedOutputs, check_writable, load_image, peek_image, save_image, stale_temps
from .locking import LockedError, LockSet
from .outputs import Plan
from .postprocess import postprocess
from .preprocess import preprocess
from .weights import MODEL_FILES, WeightsError, assign, file_sha256, find_weights, is_test_weights, read_weights

SIGMA_POSTERIORS = 0.5  # upstream smooths the segmentation posteriors with this Gaussian


@dataclass
class Options(SynthSegFlags):
    """Upstream's flags plus ours; ``threads`` None means all cores."""

    keepgeom: bool = False
    addctab: bool = False
    models: str | None = None
    bn: str = "auto"
    precision: str = "fp32"
    profile: bool = False
    debug: bool = False
    resume: bool = False  # skip scans whose provenance record says current; record each finished scan
    snapshot: str | None = None  # folder for QC snapshots and the cohort page
    max_memory: float | None = None  # bytes the run may use (--max-memory); None: the memory available


@dataclass
class Timings:
    """Seconds per stage, and the process's peak memory when each stage last ended (--profile)."""

    stages: dict[str, float] = field(default_factory=dict)
    peak_gb: dict[str, float] = field(default_factory=dict)
    network_flop: int = 0

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        self.peak_gb[stage] = peak_rss_gb()


def peak_rss_gb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into an exception so that temporaries and locks are cleaned up as for
    Ctrl-C (a KeyboardInterrupt subclass, so the per-image ``except Exception`` does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def printable(text: str) -> str:
    """``text`` on one line: control characters (a newline in a file name) and undecodable bytes escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def log(tag: str, msg: str) -> None:
    """One log line: [INFO], [RUN ], [SKIP], [DONE], [WARN] or [ERR] (errors and warnings on stderr)."""
    stream = sys.stderr if tag in ("ERR", "WARN") else sys.stdout
    line = f"[{'RUN ' if tag == 'RUN' else tag}] {printable(msg)}"
    with progress.writing(stream):  # above a batch's progress bar, not through it
        try:
            print(line, file=stream, flush=True)
        except UnicodeEncodeError:  # a non-UTF-8 terminal and a non-ASCII file name
            enc = stream.encoding or "ascii"
            print(line.encode(enc, "backslashreplace").decode(enc), file=stream, flush=True)


class Predictor:
    """Holds the built and loaded network so a batch pays for model construction once."""

    def __init__(self, opts: Options, timings: Timings):
        import tensorflow as tf  # imported here so --help stays fast

        if not opts.debug:  # e.g. "triggered tf.function retracing" in a batch: noise between the log lines
            tf.get_logger().setLevel("ERROR")

        from . import network
        from .devices import is_metal_gpu

        self.opts = opts
        self.labels = L.LabelSet.build(opts.v1)
        t0 = time.perf_counter()
        self.bn = opts.bn if opts.bn != "auto" else ("unfused" if is_metal_gpu() else "fused")
        key = "robust" if opts.robust else ("seg1" if opts.v1 else "seg2")
        self.weight_paths = {key: find_weights(MODEL_FILES[key], opts.models)}
        self.flip = None if (opts.fast or opts.robust) else self.labels.flip
        with _batchnorm_form(self.bn), _precision_policy(opts.precision):
            if opts.robust:
                self.model = network.robust_model(len(self.labels.labels), len(L.denoiser_groups()))
            else:
                self.model = network.unet_model(len(self.labels.labels))
        self.blur = None if opts.robust else network.ChannelBlur(SIGMA_POSTERIORS)
        path = self.weight_paths[key]
        assign(self.model, read_weights(path), path)
        # The plain U-Nets run in stages (same bits, a fraction of the memory); robust stays one graph.
        with _precision_policy(opts.precision):
            self.run_seg = self.model if opts.robust else network.StagedUNet(self.model)
        self.channels = network.ArgmaxLabels(np.arange(len(self.labels.labels)))
        self.parc_model = self.qc_model = None
        self._flop_cache: dict[tuple[int, ...], int] = {}
        if opts.parc:
            with _precision_policy(opts.precision):
                parc = network.parc_model(len(L.parcellation_labels()))
            self.parc_model = self._load("parc", parc)
            with _precision_policy(opts.precision):
                self.run_parc = network.StagedUNet(self.parc_model, prefix="unet_parc")
            self.parc_blur = network.ChannelBlur(SIGMA_POSTERIORS)
        if opts.qc:
            self.qc_model = self._load("qc", network.qc_model(len(np.unique(self.labels.qc_groups))))
        for weights in self.weight_paths.values():
            if is_test_weights(weights):
                log("WARN", f"{weights}: seeded random test weights (synthseg_native.testweights), not the official "
                            "ones: outputs are anatomically meaningless")
        timings.add("load_weights", time.perf_counter() - t0)

    def _load(self, key: str, model):
        from .weights import MODEL_FILES as files

        path = find_weights(files[key], self.opts.models)
        self.weight_paths[key] = path
        assign(model, read_weights(path), path)
        return model

    def network_flop(self, shape: tuple[int, ...]) -> int:
        """Convolution FLOPs the segmentation (both passes) and parcellation networks spend on one padded input.

        The QC network and the posterior blur are not counted (a small fraction; see flops.py).
        """
        from .flops import conv_flops

        key = tuple(shape)
        if key not in self._flop_cache:
            total = conv_flops(self.model, key) * (1 if self.flip is None else 2)
            if self.parc_model is not None:
                total += conv_flops(self.parc_model, key[:-1] + (3,))
            self._flop_cache[key] = total
        return self._flop_cache[key]

    def weights_digest(self) -> dict[str, str]:
        return {os.path.basename(p): file_sha256(p) for p in self.weight_paths.values()}

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Segmentation posteriors on the padded grid, (1, X, Y, Z, labels) float32, then the
        parcellation posteriors and QC scores when requested.

        Which tensors upstream returns depends on the heads, because its final Keras model picks
        outputs by layer name: with --parc or --qc and no flip (--fast), the segmentation comes from
        the softmax layer, i.e. *before* the Gaussian blur (the parcellation still sees the blurred
        one); with --parc and --qc together, the parcellation is returned unblurred. Reproduced here.
        """
        returned, blurred = self._segment(image)
        post_parc = self._parcellate(image, blurred)
        qc_scores = None if self.qc_model is None else self._qc(self._qc_channels(returned, blurred))
        return returned, post_parc, qc_scores

    def predict_tiled(self, image: np.ndarray, tiles: tiling.Tiling
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """:meth:`predict` tile by tile (``--max-memory``): segmentation, flip average, blur and parcellation
        on each tile, stitched by centre cropping (tiling.py); the QC network once, on the stitched hard
        decision, because it scores the whole segmentation."""

        def one(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
            returned, blurred = self._segment(tile)
            channels = None if self.qc_model is None else self._qc_channels(returned, blurred)
            return returned, self._parcellate(tile, blurred), channels

        returned, post_parc, channels = tiling.stitch(image, tiles, one)
        assert returned is not None
        qc_scores = None if channels is None else self._qc(channels)
        return returned, post_parc, qc_scores

    def _segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The posteriors returned as the segmentation's, and the blurred ones the heads decide on
        (the same array except with --fast and a head)."""
        heads = self.parc_model is not None or self.qc_model is not None
        if self.blur is None:  # robust: no smoothing anywhere
            blurred = returned = self.run_seg.predict(image, verbose=0)
        elif self.flip is not None:  # both passes blurred as their slabs come out of the network
            from .network import assemble, blur_average_flipped, blurred_slabs

            blurred = assemble(blurred_slabs(self.run_seg.predict_slabs(image), self.blur), image.shape[1])
            flipped = self.run_seg.predict_slabs(np.ascontiguousarray(image[:, ::-1]))
            blurred = returned = blur_average_flipped(blurred, flipped, self.blur, self.flip)
        else:
            soft = self.run_seg.predict(image, verbose=0)
            returned = soft.copy() if heads else None
            blurred = self.blur(soft)
            returned = blurred if returned is None else returned
        return returned, blurred

    def _parcellate(self, image: np.ndarray, blurred: np.ndarray) -> np.ndarray | None:
        if self.parc_model is None:
            return None
        cortex = qc_heads.cortex_lut(self.labels)[self.channels(blurred)]
        post_parc = self.run_parc.predict(qc_heads.parc_input(image, cortex), verbose=0)
        if self.qc_model is None:
            post_parc = self.parc_blur(post_parc)
        return post_parc

    def _qc_channels(self, returned: np.ndarray, blurred: np.ndarray) -> np.ndarray:
        """The hard decision (1, X, Y, Z) the QC network scores."""
        return self.channels(returned if self.parc_model is not None else blurred)

    def _qc(self, channels: np.ndarray) -> np.ndarray:
        return self.qc_model.predict(qc_heads.qc_input(channels[0], self.labels), verbose=0)


class _precision_policy:
    """Context that builds Keras layers under a reduced-precision policy (--precision bf16/fp16).

    Weights stay float32 (the same files load); convolutions run in the reduced type and the softmax in
    float32. fp32 leaves the global policy untouched, so the default graph is exactly upstream's.
    """

    def __init__(self, precision: str):
        from .devices import PRECISIONS

        self.policy = PRECISIONS[precision]
        self.saved = None

    def __enter__(self):
        if self.policy != "float32":
            import tensorflow as tf

            self.saved = tf.keras.mixed_precision.global_policy()
            tf.keras.mixed_precision.set_global_policy(self.policy)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import tensorflow as tf

            tf.keras.mixed_precision.set_global_policy(self.saved)
        return False


class _batchnorm_form:
    """Context that builds Keras BatchNorm layers in the requested (fused/unfused) form."""

    def __init__(self, form: str):
        self.form = form
        self.ctx = None

    def __enter__(self):
        if self.form == "unfused":
            from .patches import unfused_batchnorm
            self.ctx = unfused_batchnorm()
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def run(opts: Options, plan: Plan, predictor: Predictor | None = None) -> int:
    """Segment the images of ``plan`` (with --resume: those not current); returns the exit status."""
    from .cohort import Batch, stage_deltas

    timings = Timings()
    for note in plan.notes:
        log("INFO", note)
    batch = Batch(opts, plan, log)
    todo = batch.pending()  # before the model load: a finished batch loads nothing
    if not todo:
        batch.close()
        return 0
    try:
        predictor = predictor or Predictor(opts, timings)
    except WeightsError as exc:
        log("ERR", str(exc))
        batch.close()
        return 1
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
        except (OSError, LockedError) as exc:
            log("ERR", str(exc))
            batch.close()
            return 1
        for out in plan.shared_outputs():
            for tmp in stale_temps(out):
                tmp.unlink(missing_ok=True)
        failed: list[str] = []
        n = len(plan.images)
        k = todo[0]
        batch.start(len(todo))
        try:
            for k in todo:
                path = plan.images[k]
                t_start, before = time.perf_counter(), dict(timings.stages)
                log("RUN", f"{k + 1}/{n} {path}")
                try:
                    volumes, qc_scores = _one(opts, plan, k, predictor, timings, vol_table, qc_table)
                except Exception as exc:  # one bad scan must not stop a batch; Ctrl-C still does
                    failed.append(path)
                    msg = _describe(exc, path)
                    log("ERR", msg)
                    if opts.debug:
                        traceback.print_exc()
                    batch.failed(k, msg)
                    continue
                seconds = time.perf_counter() - t_start
                stages = stage_deltas(before, timings.stages)
                detail = "".join(f", {stage} {sec:.1f} s" for stage, sec in stages.items())
                log("DONE", f"{path} -> {plan.seg[k]} ({seconds:.1f} s{detail})")
                batch.done(k, seconds, stages, volumes, qc_scores)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            if batch.progress:
                batch.progress.close()
            log("ERR", f"interrupted ({signal.Signals(signum).name}) while segmenting {plan.images[k]}: no "
                       f"partial output left; {batch.counts['segmented']} of {len(todo)} image(s) had finished")
            if opts.debug:
                traceback.print_exc()
            return 128 + signum
        batch.close()
    if opts.profile:
        for stage, sec in timings.stages.items():
            log("INFO", f"profile {stage}: {sec:.3f} s (peak RSS so far {timings.peak_gb[stage]:.2f} GB)")
        if timings.network_flop and timings.stages.get("network"):
            gflop = timings.network_flop / 1e9
            log("INFO", f"profile network throughput: {gflop:.1f} GFLOP (convolutions) in "
                        f"{timings.stages['network']:.3f} s = {gflop / timings.stages['network']:.1f} GFLOP/s")
    if failed:
        if n > 1:  # a single image's failure is already its one [ERR] line
            log("ERR", f"{len(failed)} of {n} image(s) failed: {', '.join(failed)}")
        return 1
    return 0


def _describe(exc: Exception, path: str) -> str:
    """The [ERR] text for a failed image: the input, then the cause (and the way out of a memory shortage)."""
    known = isinstance(exc, (InputError, OSError, ValueError, LockedError, memory.MemoryShortage))
    detail = str(exc) if known else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "ResourceExhaustedError":
        cause = (str(exc).splitlines() or [type(exc).__name__])[0]
        detail = (f"out of memory ({cause}); use --crop (e.g. --crop 160) to segment a smaller centred patch, "
                  "or --max-memory below what the machine has (e.g. --max-memory 8G) for smaller tiles")
    return detail if detail.startswith(path) else f"{path}: {detail}"


def tiling_note(path: str, decision: memory.Decision, tiles: tiling.Tiling) -> str:
    """The one [WARN] line of a tiled image: why, how, and that it costs exactness (so it is a warning)."""
    est = decision.estimate
    assert decision.tiled_need is not None
    if decision.forced:
        why = f"${memory.ENV_TILES} asks for tiles (untiled estimate {memory.format_size(est.need)})"
    else:
        assert decision.budget is not None
        why = (f"estimated {memory.format_size(est.need)} for network grid {'x'.join(map(str, est.grid))} exceeds "
               f"the memory budget of {memory.format_size(decision.budget)} ({decision.where})")
    return (f"{path}: {why}: segmenting in {tiles.n_tiles} tiles of {'x'.join(map(str, tiles.tile_shape))} "
            f"({'x'.join(map(str, tiles.counts))}) overlapping by >= {tiles.overlap} voxels, estimated "
            f"{memory.format_size(decision.tiled_need)}; results can differ from upstream near tile seams")


def _one(opts: Options, plan: Plan, k: int, predictor: Predictor, timings: Timings,
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


def _segment(opts: Options, plan: Plan, k: int, predictor: Predictor, timings: Timings,
             vol_table: V.CsvTable | None, qc_table: V.CsvTable | None, stage: StagedOutputs
             ) -> tuple[list[tuple[V.CsvTable, list[str]]], np.ndarray, np.ndarray | None]:
    """Load → preprocess → network → postprocess, with every output staged; returns the shared-CSV rows
    that become part of the tables once the stage is committed, the volumes and the QC scores."""
    path = plan.images[k]
    label_set = predictor.labels
    t0 = time.perf_counter()
    decision = memory.decide(path, peek_image(path), opts.crop, opts.fast, opts.robust, opts.parc, bool(opts.qc),
                             opts.max_memory)
    img = load_image(path)
    prep = preprocess(img, path, crop=opts.crop, ct=opts.ct, min_pad=opts.crop)
    if plan.resample[k] is not None:
        if prep.resampled is not None:
            save_image(prep.resampled, prep.affine, prep.header, plan.resample[k], stage=stage)
        else:
            log("INFO", f"{path}: already at 1 mm, no resampled image written")
    t1 = time.perf_counter()
    timings.add("preprocess", t1 - t0)
    tiles = None
    if decision.tiling is not None:
        grid = prep.image.shape[1:4]  # the header's prediction of it is tested to be the same; if not, re-plan
        tiles = decision.tiling if decision.tiling.grid == grid else tiling.layout(grid, decision.tiling.counts)
        if tiles is None:
            raise ValueError(f"{path}: network grid {'x'.join(map(str, grid))} cannot be cut into "
                             f"{'x'.join(map(str, decision.tiling.counts))} tiles")
        log("WARN", tiling_note(path, decision, tiles))
        post_seg, post_parc, qc_scores = predictor.predict_tiled(prep.image, tiles)
    else:
        post_seg, post_parc, qc_scores = predictor.predict(prep.image)
    t2 = time.perf_counter()
    timings.add("network", t2 - t1)
    if opts.profile:
        if tiles is None:
            timings.network_flop += predictor.network_flop(prep.image.shape[1:])
        else:
            timings.network_flop += tiles.n_tiles * predictor.network_flop(tiles.tile_shape + prep.image.shape[4:])
        log("INFO", f"profile {path}: network input {'x'.join(map(str, prep.image.shape[1:4]))}, "
                    f"{t2 - t1:.3f} s")
        t2 = time.perf_counter()  # tracing the FLOP count is not network time
    labels_parc = L.parcellation_labels() if post_parc is not None else None
    result = postprocess(post_seg, post_parc, prep.shape, prep.pad_idx, prep.crop_idx, label_set.labels,
                         labels_parc, prep.affine, prep.resolution, opts.fast or opts.robust,
                         label_set.topology, opts.v1, threads=opts.threads or os.cpu_count() or 1)
    del post_seg, post_parc
    t3 = time.perf_counter()
    timings.add("postprocess", t3 - t2)
    seg, posteriors, affine = result.segmentation, result.posteriors, prep.affine
    if opts.keepgeom and prep.resampled is not None:
        seg = geometry.resample_like(seg, affine, img.data.shape, img.affine, order=0)
        if plan.post[k] is not None:
            posteriors = geometry.resample_like(posteriors, affine, img.data.shape, img.affine, order=1)
        affine = img.affine
    save_image(seg, affine, prep.header, plan.seg[k], dtype="int32", stage=stage)
    if opts.addctab:
        colours.attach(plan.seg[k], seg, parc=opts.parc, stage=stage)
    if plan.post[k] is not None:
        save_image(posteriors, affine, prep.header, plan.post[k], dtype="float32", stage=stage)
    rows: list[tuple[V.CsvTable, list[str]]] = []
    if plan.vol[k] is not None:
        row = V.volume_row(path, result.volumes)
        table = vol_table or V.CsvTable(plan.vol[k], V.volume_columns(label_set, opts.parc), shared=False)
        table.stage(row, stage)
        rows.append((table, row))
    if plan.qc[k] is not None and qc_scores is not None:
        row = V.qc_row(path, qc_scores)
        table = qc_table or V.CsvTable(plan.qc[k], V.qc_columns(label_set), shared=False)
        table.stage(row, stage)
        rows.append((table, row))
    timings.add("write", time.perf_counter() - t3)
    return rows, result.volumes, qc_scores
