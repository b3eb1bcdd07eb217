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

import contextlib
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import Options
from ..engine.backends.tf import devices, patches
from ..engine.weights import MODEL_FILES, find_weights
from ..errors import UpstreamError

logger = logging.getLogger(__name__)
PREDICT_FILE = "SynthSeg/predict_synthseg.py"
LABELS_DIR = "data/labels_classes_priors"


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


def predict_kwargs(opts: Options, home: Path, models: str) -> dict[str, Any]:
    """``predict()``'s arguments as upstream's script derives them from its flags.

    The robust model implies fast (``Options.normalised``, the rule's one home); v1 swaps the segmentation model
    and the versioned label tables (``*_2.0.npy`` → ``*.npy``) but keeps the 2.0 denoiser table and the
    parcellation and QC models, as upstream does.
    """
    opts = opts.normalised()
    labels = os.path.join(str(home), LABELS_DIR)
    table = ".npy" if opts.v1 else "_2.0.npy"
    return {
        "path_images": opts.i,
        "path_segmentations": opts.o,
        "path_model_segmentation": os.path.join(models, MODEL_FILES[opts.segmentation_model]),
        "labels_segmentation": os.path.join(labels, "synthseg_segmentation_labels" + table),
        "robust": opts.robust,
        "fast": opts.fast,
        "v1": opts.v1,
        "do_parcellation": opts.parc,
        "n_neutral_labels": 18 if opts.v1 else 19,
        "names_segmentation": os.path.join(labels, "synthseg_segmentation_names" + table),
        "labels_denoiser": os.path.join(labels, "synthseg_denoiser_labels_2.0.npy"),
        "path_posteriors": opts.post,
        "path_resampled": opts.resample,
        "path_volumes": opts.vol,
        "path_model_parcellation": os.path.join(models, MODEL_FILES["parc"]),
        "labels_parcellation": os.path.join(labels, "synthseg_parcellation_labels.npy"),
        "names_parcellation": os.path.join(labels, "synthseg_parcellation_names.npy"),
        "path_model_qc": os.path.join(models, MODEL_FILES["qc"]),
        "labels_qc": os.path.join(labels, "synthseg_qc_labels" + table),
        "path_qc_scores": opts.qc,
        "names_qc": os.path.join(labels, "synthseg_qc_names" + table),
        "cropping": opts.crop,
        "topology_classes": os.path.join(labels, "synthseg_topological_classes" + table),
        "ct": opts.ct,
    }


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


def run_upstream(opts: Options) -> int:
    """Run upstream's ``predict()`` on ``opts`` (checked, normalised); returns its exit status.

    Threads default to all cores like the native engine's (upstream's own default is 1); the weights
    come from the folder the native engine would use, BatchNorm is fused unless ``--bn unfused``.
    """
    home = find_synthseg_home(opts.synthseg_home)
    models = str(find_weights(MODEL_FILES[opts.segmentation_model], opts.models).parent)
    kwargs = predict_kwargs(opts, home, models)
    threads = opts.threads or os.cpu_count() or 1
    bn = "unfused" if opts.bn == "unfused" else "fused"
    logger.info(f"upstream engine: {opts.version} from {home}, weights in {models}, {threads} thread(s), "
                f"{bn} BatchNorm{', CPU only' if opts.cpu else ''}")
    if opts.cpu and not devices.hide_gpus():
        logger.warning("--cpu requested after TensorFlow started; GPUs stay visible")
    devices.configure_threads(threads)
    with _upstream_environment(home, bn):
        try:
            module = importlib.import_module("SynthSeg.predict_synthseg")
            module.predict(**kwargs)
        except SystemExit as exc:
            return _exit_status(exc.code)
        except Exception as exc:
            traceback.print_exc()
            raise UpstreamError(f"upstream SynthSeg failed: {type(exc).__name__}: {exc}") from exc
    return 0
