"""Official SynthSeg weight files: where to find them and how to read them without Keras' loader.

Layer by layer, as arrays by name: a backend sets them on its own layers (TensorFlow:
``backends.tf.predictor.assign``), so no framework is needed to find, read or digest them.

Reading the HDF5 file ourselves (h5py) keeps loading identical across Keras versions (Keras 2 and 3
match layers by name differently) and lets a missing or misshaped layer fail with a message that
names it, instead of being skipped silently as ``load_weights(by_name=True)`` does.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import WeightsError

MODEL_FILES = {
    "seg2": "synthseg_2.0.h5",
    "seg1": "synthseg_1.0.h5",
    "parc": "synthseg_parc_2.0.h5",
    "robust": "synthseg_robust_2.0.h5",
    "qc": "synthseg_qc_2.0.h5",
    "photo_both": "synthseg_photo_both_1.0.h5",      # FreeSurfer 8's Photo-SynthSeg (--photo both)
    "photo_single": "synthseg_photo_single_1.0.h5",  # (--photo left|right)
}
SYNTHSEG_KEYS = ("seg2", "seg1", "parc", "robust", "qc")  # SynthSeg's five files (Photo-SynthSeg: FreeSurfer's)
OFFICIAL_SOURCE = ("FreeSurfer >= 7.3 ships them in $FREESURFER_HOME/models; otherwise download them from the "
                   "link in the SynthSeg repository README (github.com/BBillot/SynthSeg) and pass --models DIR")

# Keras' per-layer weight order (how write_weights orders a layer's arrays, as Keras does).
_ORDER = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")


def search_dirs(models_dir: str | None = None, freesurfer_first: bool = False) -> list[tuple[str, Path]]:
    """Candidate folders in priority order, each with the reason it is searched. An explicit ``--models`` folder is
    the only one: a typo in it must not quietly run other weights found further down the list. ``freesurfer_first``
    (the ``mri_synthseg`` command) puts ``$FREESURFER_HOME/models`` first, where FreeSurfer's own looks."""
    if models_dir:
        return [("--models", Path(models_dir))]
    dirs: list[tuple[str, Path]] = []
    if os.environ.get("SYNTHSEG_MODELS"):
        dirs.append(("$SYNTHSEG_MODELS", Path(os.environ["SYNTHSEG_MODELS"])))
    dirs.append(("./models", Path.cwd() / "models"))
    if os.environ.get("FREESURFER_HOME"):
        place = ("$FREESURFER_HOME/models", Path(os.environ["FREESURFER_HOME"]) / "models")
        dirs.insert(0, place) if freesurfer_first else dirs.append(place)
    if os.environ.get("SYNTHSEG_HOME"):
        dirs.append(("$SYNTHSEG_HOME/models", Path(os.environ["SYNTHSEG_HOME"]) / "models"))
    return dirs


def locate(filename: str, models_dir: str | None = None, freesurfer_first: bool = False) -> tuple[Path, str]:
    """The first existing ``filename`` along the search order, and why that folder was searched (``--models``,
    ``$SYNTHSEG_MODELS``, ...); the error names every place tried."""
    if models_dir and not Path(models_dir).is_dir():
        raise WeightsError(f"--models {models_dir}: no such folder (an explicit --models folder is the only place "
                           f"searched). Official weights are not distributed with this toolkit: {OFFICIAL_SOURCE}")
    tried = []
    for why, folder in search_dirs(models_dir, freesurfer_first):
        candidate = folder / filename
        if candidate.is_file():
            return candidate, why
        tried.append(f"{candidate} ({why})")
    if models_dir:
        raise WeightsError(f"weights file {filename} not found in the --models folder {models_dir} (the only place "
                           f"searched when --models is given). Official weights are not distributed with this "
                           f"toolkit: {OFFICIAL_SOURCE}")
    raise WeightsError(f"weights file {filename} not found; searched: {'; '.join(tried)}. "
                       f"Official weights are not distributed with this toolkit: {OFFICIAL_SOURCE}")


def find_weights(filename: str, models_dir: str | None = None, freesurfer_first: bool = False) -> Path:
    """:func:`locate`'s file."""
    return locate(filename, models_dir, freesurfer_first)[0]


def model_files(keys: list[str] | tuple[str, ...], models_dir: str | None = None,
                model_file: str | None = None, freesurfer_first: bool = False) -> dict[str, Path]:
    """The weight file of each network of a run (keys of ``MODEL_FILES``, the segmentation model first): the others
    beside the segmentation model when they are there (where upstream's engine takes them from), else found along
    the search order. ``model_file`` (FreeSurfer's ``--model``) is the segmentation model's file itself; the heads
    are then looked for along the search order, as FreeSurfer takes them from its models folder."""
    if model_file is not None:
        if not Path(model_file).is_file():
            raise WeightsError(f"--model {model_file}: the provided model path does not exist")
        files = {keys[0]: Path(model_file)}
        files.update({key: find_weights(MODEL_FILES[key], models_dir, freesurfer_first) for key in keys[1:]})
        return files
    first = find_weights(MODEL_FILES[keys[0]], models_dir, freesurfer_first)
    files = {keys[0]: first}
    for key in keys[1:]:
        beside = first.parent / MODEL_FILES[key]
        files[key] = beside if beside.is_file() else find_weights(MODEL_FILES[key], models_dir, freesurfer_first)
    return files


def checked(arrays: dict[str, dict[str, np.ndarray]], shapes: dict[str, dict[str, tuple[int, ...]]],
            path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of every layer in ``shapes`` (``architecture.weight_shapes``), as float32, checked: a layer or an
    array missing, of another shape, or not finite raises :class:`WeightsError` naming it (where Keras'
    ``load_weights(by_name=True)`` would skip it silently). Extra layers in the file are ignored."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, kinds in shapes.items():
        if name not in arrays:
            raise WeightsError(f"{path}: layer '{name}' is missing from the weights file")
        out[name] = {}
        for kind, shape in kinds.items():
            if kind not in arrays[name]:
                raise WeightsError(f"{path}: layer '{name}' has no '{kind}' weights")
            value = np.asarray(arrays[name][kind], dtype=np.float32)
            if tuple(value.shape) != tuple(shape):
                raise WeightsError(f"{path}: layer '{name}' {kind} has shape {tuple(value.shape)}, the network "
                                   f"expects {tuple(shape)}")
            if not np.all(np.isfinite(value)):  # damaged bytes inside a dataset read back as NaN/Inf
                raise WeightsError(f"{path}: layer '{name}' {kind} has NaN or infinite values (corrupt file?)")
            out[name][kind] = value
    return out


def _names(attr) -> list[str]:
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in attr]


def read_weights(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """All arrays of a Keras HDF5 file as {layer: {kind: array}}, for both Keras layouts.

    ``model.save`` puts the layer groups under ``model_weights/``; ``save_weights`` puts them at the
    root. Layer names come from each weight's stored name (``layer/kernel:0``), so nested models
    (a group holding several layers) are flattened too.
    """
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable HDF5 weights file ({exc})") from exc
    try:
        with f:
            return _read_layers(f, path)
    except WeightsError:
        raise
    except Exception as exc:  # h5py raises KeyError/OSError/RuntimeError for damaged objects inside the file
        raise WeightsError(f"{path}: corrupt HDF5 weights file ({type(exc).__name__}: {exc}); "
                           "download it again") from exc


def _read_layers(f: h5py.File, path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    root = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
    if "layer_names" not in root.attrs:
        raise WeightsError(f"{path}: no Keras layer table (attribute 'layer_names') found")
    out: dict[str, dict[str, np.ndarray]] = {}
    for group_name in _names(root.attrs["layer_names"]):
        group = root[group_name]
        for weight_name in _names(group.attrs.get("weight_names", [])):
            parts = weight_name.split("/")
            layer = parts[-2] if len(parts) >= 2 else group_name
            kind = parts[-1].split(":")[0]
            out.setdefault(layer, {})[kind] = np.asarray(group[weight_name])
    return out


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


TEST_WEIGHTS_ATTR = "synthseg_native_test_weights"  # root attribute of generated test weights: their seed


def is_test_weights(path: str | os.PathLike) -> bool:
    """Whether ``path`` was written by our test-weight generator (random, anatomically meaningless), so
    that runs and benchmarks on such files say so wherever the files came from."""
    try:
        with h5py.File(path, "r") as f:
            return TEST_WEIGHTS_ATTR in f.attrs
    except Exception:  # unreadable files are reported by read_weights
        return False


def write_weights(path: str | os.PathLike, layers: dict[str, dict[str, np.ndarray]],
                  layout: str = "model", test_seed: int | None = None) -> None:
    """Write arrays in Keras 2's HDF5 layout (``model``: under model_weights/, ``weights``: at the root);
    ``test_seed`` marks generated test weights (an extra root attribute Keras ignores)."""
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        if test_seed is not None:
            f.attrs[TEST_WEIGHTS_ATTR] = test_seed
        root = f.create_group("model_weights") if layout == "model" else f
        if layout == "model":
            root.attrs["backend"] = b"tensorflow"
            root.attrs["keras_version"] = b"2.15.0"
        root.attrs["layer_names"] = np.array([n.encode("utf8") for n in layers])
        for name, kinds in layers.items():
            group = root.create_group(name)
            ordered = [k for k in _ORDER if k in kinds] + [k for k in kinds if k not in _ORDER]
            weight_names = [f"{name}/{k}:0" for k in ordered]
            group.attrs["weight_names"] = np.array([w.encode("utf8") for w in weight_names])
            for k, wn in zip(ordered, weight_names):
                group.create_dataset(wn, data=np.asarray(kinds[k], dtype=np.float32))
