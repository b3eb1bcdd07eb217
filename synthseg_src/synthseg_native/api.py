"""The Python API: :func:`segment` for one call, :class:`Segmenter` to keep the networks loaded.

The command line is a thin shell over these two (``cli.py`` parses, then calls :func:`segment`), so
a script, a notebook and ``synthseg-native`` run the same code and write the same bytes. Options are
the command line's flags as keyword arguments (``parc=True``, ``vol="v.csv"``, ``max_memory="8G"``),
checked by the same code. Problems that stop a call raise typed exceptions
(:mod:`synthseg_native.errors`); in a batch, a failing scan is reported in the :class:`Result` and the
others carry on, as on the command line.

Example::

    import nibabel as nib
    from synthseg_native import Segmenter, segment

    result = segment("t1.nii.gz", "t1_seg.nii.gz", vol="volumes.csv", parc=True)   # files, like the CLI
    seg = Segmenter(parc=True, threads=8)                                        # networks loaded once
    out = seg.segment_image(nib.load("t1.nii.gz"))                               # in memory
    out.labels.get_fdata(); out.volumes["left hippocampus"]
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import nibabel as nib
import numpy as np

from .batch import runner
from .batch import tables as V
from .batch.bids import is_dataset, write_dataset_files
from .batch.plan import Plan
from .batch.shards import make_plan
from .config import GRID_STEP, Options, round_up
from .config.options import IO, MODEL, NATIVE_ONLY, RUN, crop_sizes
from .engine import predictor as engine
from .engine.backend import Backend
from .engine.segment import memory_plan, segment_image
from .engine.spec import ModelSpec
from .engine.weights import MODEL_FILES, locate
from .errors import OutputError, UsageError
from .io import colours
from .io.atomic import image_extension, write_text
from .io.freesurfer import LookupTable, SurfaVolume, nifti_image, save_like_surfa, surfa_volume, write_volume
from .io.images import as_nifti, from_nibabel, image_info, load_image, peek_image, save_nifti
from .reference.upstream import run_upstream

logger = logging.getLogger(__name__)
ImageInput = Union[str, os.PathLike, nib.spatialimages.SpatialImage]
ScanReport = runner.ScanReport


@dataclass
class ImageResult:
    """One image segmented in memory (:meth:`Segmenter.segment_image`).

    ``labels`` and ``posteriors`` are the very images the command line would write (int32 labels, float32
    posteriors, the input's header): on the 1 mm grid as upstream, or on the input's grid with ``keepgeom``.
    ``volumes`` and ``qc`` hold the CSV files' columns.
    """

    name: str
    labels: nib.Nifti1Image
    volumes: dict[str, float]
    posteriors: nib.Nifti1Image | None = None
    qc: dict[str, float] | None = None
    resampled: nib.Nifti1Image | None = None   # the input at 1 mm, when it had to be resampled
    timings: dict[str, float] = field(default_factory=dict)
    freesurfer: FreeSurferWrite | None = field(default=None, repr=False)  # --keepgeom/--addctab: how to write it


@dataclass
class FreeSurferWrite:
    """What FreeSurfer 8's writer needs to write a segmentation with ``--keepgeom``/``--addctab`` (``io.freesurfer``):
    the image its nibabel step saves (1 mm grid, the input's header), the input image, the table to embed, and the
    volume surfa writes to a NIfTI name (made once, for :attr:`ImageResult.labels` too). An .mgz name goes through
    nibabel's MGH conversion first, so that file is made when the name is known: :func:`save`."""

    written: nib.Nifti1Image
    source: nib.spatialimages.SpatialImage
    keepgeom: bool
    lut: LookupTable | None
    nifti: SurfaVolume


@dataclass
class Result:
    """What :func:`segment` or :meth:`Segmenter.run` did: a :class:`ScanReport` per scan (one for an in-memory
    input too), the exit status the command line would return, and for an in-memory input ``images == [its
    ImageResult]``."""

    scans: list[ScanReport]
    exit_code: int = 0
    images: list[ImageResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def failed(self) -> list[ScanReport]:
        return [s for s in self.scans if s.status == "failed"]

    def raise_for_failures(self) -> Result:
        """Raise the first failed scan's exception (``InputError``, ``MemoryShortage``, ...); else return self."""
        for scan in self.failed:
            if scan.exception is not None:
                raise scan.exception
        return self


def _split(where: str, keywords: dict[str, Any], allowed: set[str]) -> Options:
    """Options from keywords, refusing names outside ``allowed`` (e.g. file options for a Segmenter)."""
    opts = Options.from_keywords(where, **keywords)
    wrong = sorted(set(keywords) - allowed)
    if wrong:
        raise UsageError(f"{where}: {', '.join(wrong)} cannot be given here")
    return opts


MODEL_OPTIONS = set(Options.names(MODEL)) | set(Options.names(RUN)) | {"qc"}
IO_OPTIONS = set(Options.names(IO)) - {"i", "o"}
IMAGE_FILES = ("post", "resample", "vol", "qc")  # the files one in-memory image can be saved to


def segment(input: ImageInput, output: str | os.PathLike | None = None, **options: Any) -> Result:
    """Segment ``input`` like ``synthseg-native --i input --o output [--flags]``.

    ``input``: an image file, a folder of images, a ``.txt`` list, a BIDS dataset, or a nibabel image (then
    ``output`` may be None: the result is only in ``Result.images``). ``options``: the command line's flags
    as keywords (``vol="v.csv"``, ``parc=True``, ``crop=160``, ``threads=8``, ``engine="upstream"``, ...).
    Raises :class:`UsageError` for inconsistent options, :class:`WeightsError` when weights are missing.
    """
    if isinstance(input, nib.spatialimages.SpatialImage):
        files = {k: options.pop(k) for k in list(options) if k in IO_OPTIONS}
        batch_only = sorted(k for k in files if k not in IMAGE_FILES and files[k])
        if batch_only:
            raise UsageError(f"segment(): {', '.join(batch_only)} need files or folders as input, not an image")
        with Segmenter(**options, **({"qc": True} if files.get("qc") else {})) as seg:
            image = seg.segment_image(input, posteriors=bool(files.get("post")))
            written = {k: v for k, v in files.items() if k in IMAGE_FILES and v is not None}
            save(image, output, addctab=seg.options.addctab, parc=seg.options.parc,
                 conventions=seg.options.conventions, **written)
        made = {"post": image.posteriors, "resample": image.resampled, "qc": image.qc, "vol": image.volumes}
        outputs = [os.fspath(p) for p in (output, *(v for k, v in written.items() if made[k] is not None))
                   if p is not None]
        report = ScanReport(image.name, outputs, "done", seconds=sum(image.timings.values()),
                            stages=dict(image.timings), volumes=dict(image.volumes), qc=image.qc)
        return Result([report], 0, [image])
    opts = _split("segment()", {**options, "i": os.fspath(input), "o": None if output is None else os.fspath(output)},
                  set(Options.names()))
    opts, plan = _planned(opts)
    given, opts = opts, replace(opts, backend=engine.resolve_backend(opts))
    engine.prepare(opts.debug, opts.backend)
    if opts.engine == "upstream":
        rc = run_upstream(opts)
        return Result([ScanReport(p, plan.image_outputs(k), "done" if rc == 0 else "failed")
                       for k, p in enumerate(plan.images)], rc)
    backend = engine.start(ModelSpec.of(opts))
    opts = replace(opts, precision=backend.runtime.precision)
    _announce(opts, backend.runtime, len(plan.images), engine.backend_reason(given, opts.backend))
    return _run(opts, plan, None, backend)


def _planned(opts: Options) -> tuple[Options, Plan]:
    """Checked options and their plan of files (usage errors before anything is loaded)."""
    opts.check()
    given = None if opts.crop is None else crop_sizes(opts.crop)
    opts = opts.normalised()
    if opts.engine == "upstream" and is_dataset(opts.i):
        raise UsageError(NATIVE_ONLY)  # the BIDS half of Options.check: it needs the file system
    plan = make_plan(opts)
    if given is not None and any(c % GRID_STEP for c in given):
        logger.info(f"--crop {' '.join(map(str, given))} is rounded up to {' '.join(str(round_up(c)) for c in given)} "
                    f"(the network needs multiples of {GRID_STEP}), as upstream does")
    return opts, plan


def _version(opts: Options) -> str:
    """The model and, for reduced precision, the warning that comes with it (log line, BIDS metadata)."""
    return opts.version + (f", {opts.precision} (not identical to upstream)" if opts.precision != "fp32" else "")


def _announce(opts: Options, runtime: engine.Runtime, images: int | None, reason: str = "") -> None:
    """The run's first [INFO] line: model, engine and backend (and why, when ``--backend auto`` chose it), threads,
    device, and the weights folder in use (and why it was searched), so a run on other weights than meant shows."""
    count = "" if images is None else f"{images} image(s), "
    if opts.model:
        folder, why = Path(opts.model), "--model"
    else:
        folder, why = locate(MODEL_FILES[opts.segmentation_model], opts.models,
                             ModelSpec.of(opts).freesurfer_first)
    logger.info(f"{_version(opts)}, native engine ({runtime.backend} backend{', ' + reason if reason else ''}), "
                f"{count}{runtime.threads} thread(s), device {runtime.device}, weights {folder.parent} ({why})")


def _run(opts: Options, plan: Plan, predictor: engine.Predictor | None, backend: Backend | None = None) -> Result:
    if plan.bids_root is not None:
        try:
            write_dataset_files(plan, opts.o or "", opts.v1, opts.parc,
                                f"{_version(opts)}, native engine ({opts.backend} backend)")
        except OSError as exc:
            raise OutputError(exc.errno, f"{opts.o}: cannot write the derivative dataset's files ({exc})") from exc
    report = runner.run(opts, plan, predictor, backend)
    return Result(report.scans, report.exit_code)


class Segmenter:
    """SynthSeg's networks, built and loaded once, for many images (nnU-Net's predictor, in SynthSeg's terms).

    ``model_options`` are the command line's flags that decide the networks and how they run: ``parc``,
    ``robust``, ``fast``, ``v1``, ``ct``, ``crop``, ``keepgeom``, ``addctab``, ``threads``, ``cpu``, ``models``,
    ``bn``, ``precision``, ``max_memory``, ``profile``, ``debug``; and ``qc=True`` for the QC network.
    Loading takes seconds; each :meth:`segment_image` or :meth:`run` then only pays for the images.
    """

    def __init__(self, **model_options: Any):
        opts = _split("Segmenter()", model_options, MODEL_OPTIONS)
        if isinstance(opts.qc, str):
            raise UsageError("Segmenter(): qc=True asks for the QC network; the QC table is run(..., qc='qc.csv')")
        opts = opts.normalised()
        opts.check()
        if opts.engine != "native":
            raise UsageError("Segmenter(): the upstream engine is for comparisons; use segment(..., engine='upstream')")
        given, opts = opts, replace(opts, backend=engine.resolve_backend(opts))
        engine.prepare(opts.debug, opts.backend)
        backend = engine.start(ModelSpec.of(opts))
        self.runtime = backend.runtime
        self.options = replace(opts, precision=self.runtime.precision, qc=bool(opts.qc))
        self.spec = ModelSpec.of(self.options)
        _announce(self.options, self.runtime, None, engine.backend_reason(given, opts.backend))
        self.timings = engine.Timings()
        self.predictor = engine.load(self.spec, self.timings, backend)
        self.labels = self.predictor.labels
        self._columns = V.volume_columns(self.labels, self.options.parc)
        self._lut = runner.embedded_table(self.options)

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the networks (their memory returns when nothing else holds them)."""
        self.predictor = None  # type: ignore[assignment]

    def run(self, input: str | os.PathLike, output: str | os.PathLike, **io_options: Any) -> Result:
        """Segment files as the command line does (``vol``, ``qc``, ``post``, ``resample``, ``resume``, ``shard``,
        ``snapshot``, ``bids_suffix``), with the networks already loaded."""
        given = _split("Segmenter.run()", io_options, IO_OPTIONS)
        if given.qc and not self.options.qc:
            raise UsageError("Segmenter.run(qc=...): this Segmenter was built without the QC network; "
                             "create it with Segmenter(qc=True)")
        opts = replace(self.options, i=os.fspath(input), o=os.fspath(output),
                       **{k: getattr(given, k) for k in io_options})
        if not io_options.get("qc"):
            opts = replace(opts, qc=None)
        opts, plan = _planned(opts)
        return _run(opts, plan, self._loaded())

    def _loaded(self) -> engine.Predictor:
        if self.predictor is None:
            raise UsageError("this Segmenter was closed")
        return self.predictor

    def segment_image(self, image: nib.spatialimages.SpatialImage | str | os.PathLike, posteriors: bool = False,
                      name: str | None = None) -> ImageResult:
        """Segment one image in memory (a nibabel image, or a file name to load); nothing is written.

        Raises :class:`InputError` for an image that cannot be segmented, :class:`MemoryShortage` when it does
        not fit even in tiles. ``name`` is what messages and the CSV's subject column call it (default: the
        image's file name, else ``image``).
        """
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            label = name or path
            decision = memory_plan(label, peek_image(path), self.spec, self._loaded())
            loaded = load_image(path)
        else:
            label = name or (image.get_filename() or "image")
            decision = memory_plan(label, image_info(image, label), self.spec, self._loaded())
            loaded = from_nibabel(image, label)
        timings = engine.Timings()
        result = segment_image(self._loaded(), self.spec, loaded, label, decision, timings,
                               posteriors=posteriors)
        prep = result.prepared
        qc = None
        if result.qc_scores is not None:
            qc = V.as_dict(V.qc_columns(self.labels), V.qc_row("", result.qc_scores))
        labels = as_nifti(result.labels, result.affine, result.header, dtype="int32")
        fs = None
        if self.options.keepgeom or self.options.addctab:
            assert loaded.source is not None
            volume = surfa_volume(labels, f"{label}.nii.gz", loaded.source, self.options.keepgeom, self._lut)
            fs = FreeSurferWrite(labels, loaded.source, self.options.keepgeom, self._lut, volume)
            labels = nifti_image(volume)
        return ImageResult(
            name=label,
            labels=labels,
            freesurfer=fs,
            volumes=V.as_dict(self._columns, V.volume_row(label, result.volumes)),
            posteriors=None if result.posteriors is None else as_nifti(result.posteriors, result.affine,
                                                                       result.header, dtype="float32"),
            qc=qc,
            resampled=None if prep.resampled is None else as_nifti(prep.resampled, prep.affine, prep.header),
            timings=dict(timings.stages))


def save(image: ImageResult, output: str | os.PathLike | None = None, post: str | None = None,
         resample: str | None = None, vol: str | None = None, qc: str | None = None, addctab: bool = False,
         parc: bool = False, conventions: str = "upstream") -> None:
    """Write an :class:`ImageResult` as the command line writes one image's files (each atomically);
    ``addctab``/``parc``/``conventions`` as the Segmenter had them."""
    subject = V.subject_name(image.name)
    if output is not None:
        fs = image.freesurfer
        if fs is None:
            save_nifti(image.labels, output)
        else:
            if image_extension(output) in (".nii", ".nii.gz"):  # the volume made in run(): the same for both
                write_volume(output, fs.nifti)
            else:
                save_like_surfa(output, fs.written, fs.source, fs.keepgeom, fs.lut)
            if colours.wants_sidecar(output, addctab, conventions):
                colours.write_sidecar(output, np.asarray(fs.written.dataobj), parc=parc)
    if post is not None and image.posteriors is not None:
        save_nifti(image.posteriors, post)
    if resample is not None and image.resampled is not None:
        save_nifti(image.resampled, resample)
    if vol is not None:
        write_text(vol, V.render(list(image.volumes), [[subject] + [str(v) for v in image.volumes.values()]], True))
    if qc is not None and image.qc is not None:
        write_text(qc, V.render(list(image.qc), [[subject] + [f"{q:.4f}" for q in image.qc.values()]], True))


__all__ = ["ImageResult", "Result", "ScanReport", "Segmenter", "save", "segment"]
