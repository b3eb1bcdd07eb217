"""Test weights as a few hundred kB that rebuild, bit for bit, the files of ``tools.testweights``.

Why: the GPU machines this project borrows have no TensorFlow (the test-weight generator calibrates with it) and
take at most 64 MiB per call, while the five generated files are ~250 MB of float32. Nearly all of that is
convolution kernels drawn from numpy's legacy ``RandomState``, whose stream is frozen across numpy versions and
platforms; so a kernel is stored as the generator's state before its draw plus its standard deviation, and
everything else (biases, BatchNorm statistics, the fitted final layers) as arrays. ``rebuild`` redraws the
kernels and checks a digest of every array against the one recorded when the recipe was written, so a machine
whose numpy drew differently is caught instead of silently comparing different networks.

Only numpy, h5py and ``engine.weights`` are needed: no TensorFlow, no nilearn.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from ..engine.weights import read_weights, write_weights
from ..errors import WeightsError
from ..io.atomic import atomic_write

RECIPE_SUFFIX = ".recipe.npz"
Draws = dict[str, dict]  # "layer/weight" -> {"std", "shape", "state"}: how a kernel was drawn


def normal(rng: np.random.RandomState, std: float, shape: tuple[int, ...], draws: Draws | None = None,
           name: str | None = None) -> np.ndarray:
    """``rng.normal(0, std, shape)`` as float32: the one draw expression of the generator and of ``rebuild``.

    With ``draws``, the generator's state before the draw is recorded under ``name`` so it can be replayed.
    """
    if draws is not None and name is not None:
        kind, keys, pos, has_gauss, cached = rng.get_state()
        draws[name] = {"std": float(std), "shape": [int(s) for s in shape],
                       "state": (str(kind), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss),
                                 float(cached))}
    return rng.normal(0, std, shape).astype(np.float32)


def _replay(draw: dict) -> np.ndarray:
    rng = np.random.RandomState()
    rng.set_state(draw["state"])
    return normal(rng, draw["std"], tuple(draw["shape"]))


def digest(layers: dict[str, dict[str, np.ndarray]]) -> str:
    """SHA-256 over every array's name, shape and float32 bytes, in file order (not the HDF5 file's bytes,
    which hold metadata that differs between h5py builds)."""
    h = hashlib.sha256()
    for layer, kinds in layers.items():
        for kind, value in kinds.items():
            a = np.ascontiguousarray(value, dtype=np.float32)
            h.update(f"{layer}/{kind}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def write(path: str | os.PathLike, weights_file: str | os.PathLike, draws: Draws, layout: str,
          test_seed: int) -> int:
    """The recipe of ``weights_file`` (just written by the generator, with ``draws`` recorded); its size in bytes.

    A recorded draw that no longer matches the file's array (a kernel later refitted) is stored as an array.
    """
    layers = read_weights(weights_file)
    meta: dict = {"file": Path(weights_file).name, "layout": layout, "test_seed": test_seed,
                  "digest": digest(layers), "layers": [], "draws": {}}
    arrays: dict[str, np.ndarray] = {}
    for layer, kinds in layers.items():
        meta["layers"].append([layer, list(kinds)])
        for kind, value in kinds.items():
            name = f"{layer}/{kind}"
            draw = draws.get(name)
            if draw is not None and np.array_equal(_replay(draw), value):
                kind_, _, pos, has_gauss, cached = draw["state"]
                key = f"s{len(meta['draws'])}"
                meta["draws"][name] = {"std": draw["std"], "shape": draw["shape"], "keys": key, "kind": kind_,
                                       "pos": pos, "has_gauss": has_gauss, "cached": cached}
                arrays[key] = draw["state"][1]
            else:
                key = f"a{len(arrays)}"
                meta.setdefault("arrays", {})[name] = key
                arrays[key] = np.asarray(value, dtype=np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.array(json.dumps(meta)), **arrays)
    atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))
    return len(buf.getvalue())


def rebuild(recipe: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the weights file of ``recipe`` into ``out_dir``; raises :class:`WeightsError` if the rebuilt arrays
    differ from those the recipe was made from (their digest)."""
    try:
        with np.load(recipe, allow_pickle=False) as z:
            stored = {k: z[k] for k in z.files}
        meta = json.loads(str(stored.pop("meta")))
    except Exception as exc:
        raise WeightsError(f"{recipe}: not a readable weights recipe ({type(exc).__name__}: {exc})") from exc
    layers: dict[str, dict[str, np.ndarray]] = {}
    for layer, kinds in meta["layers"]:
        layers[layer] = {}
        for kind in kinds:
            name = f"{layer}/{kind}"
            if name in meta["draws"]:
                d = meta["draws"][name]
                state = (d["kind"], stored[d["keys"]], d["pos"], d["has_gauss"], d["cached"])
                layers[layer][kind] = _replay({"std": d["std"], "shape": d["shape"], "state": state})
            else:
                layers[layer][kind] = stored[meta["arrays"][name]]
    found = digest(layers)
    if found != meta["digest"]:
        raise WeightsError(f"{recipe}: rebuilt arrays differ from the recorded ones (digest {found[:12]} != "
                           f"{meta['digest'][:12]}): this numpy draws another stream")
    out = Path(out_dir) / meta["file"]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: write_weights(tmp, layers, layout=meta["layout"], test_seed=meta["test_seed"]))
    return out


def rebuild_all(folder: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Every ``*.recipe.npz`` of ``folder`` rebuilt into ``out_dir``."""
    return [rebuild(r, out_dir) for r in sorted(Path(folder).glob(f"*{RECIPE_SUFFIX}"))]
