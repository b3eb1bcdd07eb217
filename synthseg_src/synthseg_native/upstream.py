"""The upstream reference engine: a user's own SynthSeg checkout, run in this process.

It exists to compare the native engine against the original code on the same machine and inputs,
so it changes as little as possible: upstream's files are imported, never edited or re-executed as
text, and ``predict()`` receives the arguments upstream's ``SynthSeg_predict.py`` would give it.
The only differences are the ones the comparison needs: the weights come from the directory the
native engine resolved (a checkout's ``models/`` is often empty), the NumPy aliases removed in
1.24 are restored for upstream's sake, and BatchNorm can be switched to the unfused form so
that upstream runs at all on tensorflow-metal.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import patches
from .flags import SynthSegFlags

PREDICT_FILE = "SynthSeg/predict_synthseg.py"
LABELS_DIR = "data/labels_classes_priors"
BN_FORMS = ("fused", "unfused")


class UpstreamError(Exception):
    """A problem to report in one line (no traceback): bad checkout, bad flags, upstream crash."""


@dataclass
class UpstreamRequest(SynthSegFlags):
    """Upstream's command-line flags, plus where the checkout and the weights are."""

    threads: int = 1  # upstream's own default
    synthseg_home: str | None = field(default_factory=lambda: os.environ.get("SYNTHSEG_HOME"))
    models_dir: str = ""
    bn: str = "fused"


def find_synthseg_home(explicit: str | None = None) -> Path:
    """The checkout to run, from ``explicit`` or ``$SYNTHSEG_HOME``, checked before TF is touched."""
    value = explicit or os.environ.get("SYNTHSEG_HOME")
    if not value:
        raise UpstreamError("SYNTHSEG_HOME is not set: point it (or --synthseg-home) at a clone of "
                            "https://github.com/BBillot/SynthSeg to use the upstream engine")
    home = Path(value).expanduser().resolve()
    if not home.is_dir():
        raise UpstreamError(f"{home} is not a SynthSeg checkout (missing: the directory itself)")
    missing = [PREDICT_FILE] if not (home / PREDICT_FILE).is_file() else []
    if not (home / LABELS_DIR).is_dir():
        missing.append(LABELS_DIR + "/")
    if missing:
        raise UpstreamError(f"{home} is not a SynthSeg checkout (missing {', '.join(missing)})")
    return home


def check_request(req: UpstreamRequest) -> None:
    """Refuse what upstream's script would refuse, before the slow TensorFlow start."""
    if req.robust and req.v1:
        raise UpstreamError("--v1 cannot be used with --robust: SynthSeg-robust only exists as 2.0")
    if req.bn not in BN_FORMS:
        raise UpstreamError(f"--bn must be one of {', '.join(BN_FORMS)}, not {req.bn!r}")
    if not req.models_dir:
        raise UpstreamError("no weights directory given for the upstream engine")


def version_name(req: UpstreamRequest) -> str:
    if req.robust:
        return "SynthSeg-robust 2.0"
    return ("SynthSeg 1.0" if req.v1 else "SynthSeg 2.0") + (" (fast)" if req.fast else "")


def segmentation_model_file(req: UpstreamRequest) -> str:
    if req.robust:
        return "synthseg_robust_2.0.h5"
    return "synthseg_1.0.h5" if req.v1 else "synthseg_2.0.h5"


def predict_kwargs(req: UpstreamRequest, home: Path) -> dict[str, Any]:
    """``predict()``'s arguments as upstream's script derives them from its flags.

    The robust model implies fast; v1 swaps the segmentation model and the versioned label tables
    (``*_2.0.npy`` → ``*.npy``) but keeps the 2.0 denoiser table and the parcellation and QC models,
    as upstream does.
    """
    models, labels = req.models_dir, os.path.join(str(home), LABELS_DIR)
    table = ".npy" if req.v1 else "_2.0.npy"
    return {
        "path_images": req.i,
        "path_segmentations": req.o,
        "path_model_segmentation": os.path.join(models, segmentation_model_file(req)),
        "labels_segmentation": os.path.join(labels, "synthseg_segmentation_labels" + table),
        "robust": req.robust,
        "fast": req.fast or req.robust,
        "v1": req.v1,
        "do_parcellation": req.parc,
        "n_neutral_labels": 18 if req.v1 else 19,
        "names_segmentation": os.path.join(labels, "synthseg_segmentation_names" + table),
        "labels_denoiser": os.path.join(labels, "synthseg_denoiser_labels_2.0.npy"),
        "path_posteriors": req.post,
        "path_resampled": req.resample,
        "path_volumes": req.vol,
        "path_model_parcellation": os.path.join(models, "synthseg_parc_2.0.h5"),
        "labels_parcellation": os.path.join(labels, "synthseg_parcellation_labels.npy"),
        "names_parcellation": os.path.join(labels, "synthseg_parcellation_names.npy"),
        "path_model_qc": os.path.join(models, "synthseg_qc_2.0.h5"),
        "labels_qc": os.path.join(labels, "synthseg_qc_labels" + table),
        "path_qc_scores": req.qc,
        "names_qc": os.path.join(labels, "synthseg_qc_names" + table),
        "cropping": req.crop,
        "topology_classes": os.path.join(labels, "synthseg_topological_classes" + table),
        "ct": req.ct,
    }


def _configure_tensorflow(threads: int, cpu: bool) -> None:
    """Upstream's thread and --cpu settings; the device list is also emptied because
    CUDA_VISIBLE_DEVICES means nothing to tensorflow-metal."""
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    import tensorflow as tf

    try:
        if cpu:
            tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError as exc:  # TensorFlow already started in this process
        print(f"[WARN] upstream engine: TensorFlow already initialised, settings unchanged ({exc})",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def _upstream_environment(home: Path, bn: str) -> Iterator[None]:
    """Checkout first on sys.path, NumPy aliases, optional unfused BatchNorm; undone afterwards so
    that a native run later in the same process sees Keras and NumPy untouched."""
    saved_path = list(sys.path)
    sys.path.insert(0, str(home))
    added = patches.apply_numpy_alias_shim()
    bn_context = patches.unfused_batchnorm() if bn == "unfused" else contextlib.nullcontext()
    try:
        with bn_context:
            yield
    finally:
        sys.path[:] = saved_path
        if added:
            patches.remove_numpy_alias_shim()


def _exit_status(code: object) -> int:
    """SystemExit's code as a shell would see it (None → 0, a message → 1)."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def run_upstream(req: UpstreamRequest) -> int:
    """Run upstream's ``predict()``; returns its exit status (1 when some image failed)."""
    check_request(req)
    home = find_synthseg_home(req.synthseg_home)
    kwargs = predict_kwargs(req, home)
    print(f"[INFO] upstream engine: {version_name(req)} from {home}, weights in {req.models_dir}, "
          f"{req.threads} thread(s), {req.bn} BatchNorm{', CPU only' if req.cpu else ''}", flush=True)
    _configure_tensorflow(req.threads, req.cpu)
    with _upstream_environment(home, req.bn):
        try:
            module = importlib.import_module("SynthSeg.predict_synthseg")
            module.predict(**kwargs)
        except SystemExit as exc:
            return _exit_status(exc.code)
        except Exception as exc:
            traceback.print_exc()
            raise UpstreamError(f"upstream SynthSeg failed: {type(exc).__name__}: {exc}") from exc
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m synthseg_native.upstream",
                                description="Run an official SynthSeg checkout with given weights.")
    p.add_argument("--synthseg-home", help="SynthSeg checkout (default: $SYNTHSEG_HOME)")
    p.add_argument("--models", required=True, help="folder holding the .h5 weight files")
    p.add_argument("--bn", choices=BN_FORMS, default="fused", help="BatchNorm form (unfused for Metal)")
    p.add_argument("--i", required=True, help="image, folder or .txt list")
    p.add_argument("--o", required=True, help="segmentation output(s)")
    for flag in ("parc", "robust", "fast", "ct", "cpu", "v1"):
        p.add_argument(f"--{flag}", action="store_true")
    for flag in ("vol", "qc", "post", "resample"):
        p.add_argument(f"--{flag}")
    p.add_argument("--crop", nargs="+", type=int)
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    req = UpstreamRequest(i=a.i, o=a.o, parc=a.parc, robust=a.robust, fast=a.fast, ct=a.ct, vol=a.vol,
                          qc=a.qc, post=a.post, resample=a.resample, crop=a.crop, threads=a.threads,
                          cpu=a.cpu, v1=a.v1, synthseg_home=a.synthseg_home, models_dir=a.models, bn=a.bn)
    try:
        return run_upstream(req)
    except UpstreamError as exc:
        print(f"[ERR] {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
