"""The author of the test weights' recipes (development tree: needs TensorFlow and nilearn; not installed).

Plain random weights make almost every voxel one label, so post-processing (components, topology,
flip swap) would never be exercised. Instead each network is calibrated on a real brain (the MNI152
template shipped by nilearn): BatchNorm statistics are set from the activations they actually see
(then jittered, so they are not identities), and the final 1×1×1 layer is a ridge fit to a
left/right-consistent pseudo-segmentation, so that many labels win in compact regions.

The calibration runs TensorFlow, whose float rounding depends on the CPU, so it is done once and its result kept
as recipes in the package (``synthseg_native/data/testweights``, :mod:`synthseg_native.tools.weightrecipe`), from
which ``synthseg-native-testweights`` rebuilds the same files everywhere without TensorFlow. Run this only to change
the recipes (a new model, a new calibration); the files change with them, and every recorded equivalence check
then has to be redone on the new weights.

Usage: ``python -m devtools.weightauthor [--recipes DIR] [--weights DIR] [--only ...]`` (``make testweight-recipes``)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from synthseg_native.engine import architecture as arch
from synthseg_native.engine import geometry, heads
from synthseg_native.engine import labels as L
from synthseg_native.engine.backends.tf.devices import prepare_tensorflow
from synthseg_native.engine.preprocess import rescale
from synthseg_native.engine.weights import MODEL_FILES, SYNTHSEG_KEYS, write_weights
from synthseg_native.log import DONE
from synthseg_native.tools import testweights, weightrecipe

logger = logging.getLogger(f"synthseg_native.{__spec__.name if __spec__ else __name__}")  # the [TAG] lines

# Left-hemisphere labels that pseudo-segmentation cells cycle through (their right twins mirror them).
_SIDED_2 = [2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 17, 18, 26, 28]
_TWIN = {2: 41, 3: 42, 4: 43, 5: 44, 7: 46, 8: 47, 10: 49, 11: 50, 12: 51, 13: 52, 17: 53, 18: 54,
         26: 58, 28: 60}


def calibration_image() -> np.ndarray:
    """A 96×112×96 block of the MNI152 T1 at 1 mm around the brain centre, RAS, rescaled: (1, X, Y, Z, 1).

    1 mm, because BatchNorm statistics and the last layer fitted at another scale do not transfer:
    calibrated at 2 mm, inference at 1 mm gave mostly background and CSF.
    """
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=1)
    data = geometry.align_to(np.asarray(img.get_fdata(), dtype=np.float64), img.affine, np.eye(4))
    data = rescale(np.ascontiguousarray(data))
    block, _ = geometry.centre_crop(data, [96, 112, 96])
    return block[np.newaxis, ..., np.newaxis].astype(np.float32)


def pseudo_segmentation(image: np.ndarray, v1: bool = False) -> np.ndarray:
    """Label values on the calibration grid: cells of (intensity quartile × position) per hemisphere."""
    vol = image[0, ..., 0]
    head = vol > 0.15
    labels = np.zeros(vol.shape, dtype=np.int32)
    if not head.any():
        return labels
    xs, ys, zs = np.nonzero(head)
    cx, cy, cz = xs.mean(), ys.mean(), zs.mean()
    q = np.quantile(vol[head], [0.25, 0.5, 0.75])
    gx, gy, gz = np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij")
    ibin = np.digitize(vol, q)
    cell = ibin * 6 + (gy > cy) * 3 + np.digitize(gz, [cz - 8, cz + 8])
    left_label = np.array(_SIDED_2)[cell % len(_SIDED_2)]
    right_label = np.vectorize(_TWIN.get)(left_label)
    labels[head] = np.where(gx < cx, right_label, left_label)[head]  # RAS: low x is the right side
    neutral = [14, 15, 16] if v1 else [14, 15, 16, 24]
    midline = head & (np.abs(gx - cx) < 3)
    labels[midline] = np.array(neutral)[cell[midline] % len(neutral)]
    return labels


def pseudo_parcels(seg: np.ndarray) -> np.ndarray:
    """Parcel channel per voxel: 34 angular sectors of each hemisphere's pseudo-cortex."""
    out = np.zeros(seg.shape, dtype=np.int64)
    cortex = np.isin(seg, [3, 42])
    if not cortex.any():
        return out
    _, ys, zs = np.nonzero(cortex)
    gy, gz = np.meshgrid(np.arange(seg.shape[1]), np.arange(seg.shape[2]), indexing="ij")
    angle = np.arctan2(gz - zs.mean(), gy - ys.mean())[np.newaxis]
    sector = np.minimum(((angle + np.pi) / (2 * np.pi) * 34).astype(np.int64), 33)
    sector = np.broadcast_to(sector, seg.shape)
    out[seg == 3] = 1 + sector[seg == 3]
    out[seg == 42] = 35 + sector[seg == 42]
    return out


def _qc_stage(x: np.ndarray, rng: np.random.RandomState, draws: weightrecipe.Draws | None = None):
    """QC encoder with calibrated BatchNorm; the last conv is set so scores sit inside (0, 1)."""
    from synthseg_native.engine.backends.tf.network import qc_model  # imports TensorFlow: after prepare_tensorflow()

    ls = L.LabelSet.build(False)
    seg = _channel_index(pseudo_segmentation(x), ls.labels)
    groups = heads.qc_lut(ls)[seg]
    n_groups = len(np.unique(ls.qc_groups))
    inp = np.eye(n_groups, dtype=np.float32)[groups][np.newaxis]
    model = qc_model(arch.QC(n_groups))
    _init_random(model, rng, draws)
    _calibrate_bn(model, inp, rng)
    final = model.get_layer("qc_final_conv_1")
    k = final.kernel.shape
    final.set_weights([rng.normal(0, 0.02 / np.sqrt(np.prod(k[:-1])), k).astype(np.float32),
                       rng.uniform(0.3, 0.9, k[-1]).astype(np.float32)])
    return model


def _init_random(model, rng: np.random.RandomState, draws: weightrecipe.Draws | None = None) -> None:
    """He-normal kernels, small biases, BatchNorm near identity; ``draws`` records how each kernel was drawn
    (``tools.weightrecipe``: the files rebuilt elsewhere without TensorFlow)."""
    import tensorflow as tf

    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv3D):
            k = tuple(layer.kernel.shape)
            fan_in = int(np.prod(k[:-1]))
            layer.set_weights([weightrecipe.normal(rng, np.sqrt(2.0 / fan_in), k, draws, f"{layer.name}/kernel"),
                               rng.normal(0, 0.02, k[-1]).astype(np.float32)])
        elif isinstance(layer, tf.keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.8, 1.25, c).astype(np.float32),
                               rng.normal(0, 0.1, c).astype(np.float32),
                               np.zeros(c, np.float32), np.ones(c, np.float32)])


def _calibrate_bn(model, x: np.ndarray, rng: np.random.RandomState) -> None:
    """Moving statistics from the batch statistics each BN layer sees, slightly perturbed."""
    import tensorflow as tf

    bns = [lyr for lyr in model.layers if isinstance(lyr, tf.keras.layers.BatchNormalization)]
    probe = tf.keras.Model(model.inputs, [b.input for b in bns])
    acts = probe(x, training=True)
    acts = acts if isinstance(acts, list) else [acts]
    for bn, a in zip(bns, acts):
        a = a.numpy().reshape(-1, a.shape[-1]).astype(np.float64)
        mean, var = a.mean(0), a.var(0)
        gamma, beta = bn.get_weights()[:2]
        mean = mean + rng.normal(0, 0.05, mean.shape) * np.sqrt(var)
        var = var * rng.uniform(0.9, 1.1, var.shape) + 1e-4
        bn.set_weights([gamma, beta, mean.astype(np.float32), var.astype(np.float32)])


def _fit_final(model, prefix: str, x: np.ndarray, target: np.ndarray, n_labels: int,
               rng: np.random.RandomState, sharpness: float = 4.0) -> None:
    """Ridge fit of the 1×1×1 likelihood layer so the argmax follows ``target`` (channel indices)."""
    import tensorflow as tf

    final = model.get_layer(f"{prefix}_likelihood")
    feats = tf.keras.Model(model.inputs, final.input)(x, training=False).numpy()
    f = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
    t = target.reshape(-1)
    pick = rng.choice(f.shape[0], size=min(f.shape[0], 300_000), replace=False)
    f, t = f[pick], t[pick]
    f = np.concatenate([f, np.ones((f.shape[0], 1))], axis=1)
    y = np.full((f.shape[0], n_labels), -1.0)
    y[np.arange(f.shape[0]), t] = 1.0
    # Rare classes would be ignored by a plain fit; weight samples by inverse class frequency.
    counts = np.bincount(t, minlength=n_labels).astype(np.float64)
    w = 1.0 / np.maximum(counts[t], 1.0)
    fw = f * w[:, None]
    coef = np.linalg.solve(f.T @ fw + 1e-3 * np.eye(f.shape[1]), fw.T @ y)
    logits = f @ coef
    coef *= sharpness / max(float(np.std(logits)), 1e-6)
    kernel = coef[:-1].reshape(1, 1, 1, -1, n_labels).astype(np.float32)
    final.set_weights([kernel, coef[-1].astype(np.float32)])


def _arrays(model) -> dict[str, dict[str, np.ndarray]]:
    from synthseg_native.engine.backends.tf.network import weighted_layers

    return {name: {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in layer.weights}
            for name, layer in weighted_layers(model).items()}


def _stage(x: np.ndarray, prefix: str, n_out: int, target: np.ndarray, rng: np.random.RandomState,
           conv_size: int = 3, n_features: int = 24, skip_n: int = 0, draws: weightrecipe.Draws | None = None):
    """Build, randomise and calibrate one U-Net; returns the Keras model."""
    import tensorflow as tf

    from synthseg_native.engine.backends.tf.network import unet

    inp = tf.keras.layers.Input(shape=[None, None, None, x.shape[-1]])
    net = arch.UNet(prefix, x.shape[-1], n_out, conv_size=conv_size, n_features=n_features, skip_n=skip_n)
    model = tf.keras.Model(inp, unet(inp, net))
    _init_random(model, rng, draws)
    _calibrate_bn(model, x, rng)
    _fit_final(model, prefix, x, target, n_out, rng)
    return model


def _one_hot_argmax(model, x: np.ndarray, depth: int) -> np.ndarray:
    return np.eye(depth, dtype=np.float32)[np.argmax(model.predict(x, verbose=0), axis=-1)]


def _channel_index(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    lut = np.zeros(int(table.max()) + 1, dtype=np.int64)
    lut[table] = np.arange(len(table))
    return lut[values]


def generate(out_dir: str | Path, seed: int = 0, layout: str = "model",
             only: list[str] | None = None, recipes: str | Path | None = None) -> dict[str, Path]:
    """Write the requested model files (keys of ``MODEL_FILES``) into ``out_dir``; with ``recipes``, also each
    file's ``tools.weightrecipe`` recipe there (``<file>.recipe.npz``)."""
    import tensorflow as tf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    which = only or list(SYNTHSEG_KEYS)
    x = calibration_image()
    written: dict[str, Path] = {}
    for key in which:
        tf.keras.backend.clear_session()
        rng = np.random.RandomState(seed + sum(map(ord, key)))
        draws: weightrecipe.Draws = {}
        arrays: dict[str, dict[str, np.ndarray]] = {}
        if key in ("seg2", "seg1"):
            ls = L.LabelSet.build(v1=key == "seg1")
            target = _channel_index(pseudo_segmentation(x, ls.v1), ls.labels)
            arrays = _arrays(_stage(x, "unet", len(ls.labels), target, rng, draws=draws))
        elif key == "robust":
            ls = L.LabelSet.build(False)
            seg = pseudo_segmentation(x)
            groups = L.raw_denoiser_groups()[np.unique(L.raw_segmentation_labels(), return_index=True)[1]]
            group_target = groups[_channel_index(seg, ls.labels)]
            n_groups = len(L.denoiser_groups())
            m1 = _stage(x, "unet", n_groups, group_target, rng, draws=draws)
            x2 = _one_hot_argmax(m1, x, n_groups)
            m2 = _stage(x2, "l2l", n_groups, group_target, rng, conv_size=5, n_features=16, skip_n=2, draws=draws)
            x3 = np.concatenate([x, _one_hot_argmax(m2, x2, n_groups)], axis=-1)
            m3 = _stage(x3, "unet2", len(ls.labels), _channel_index(seg, ls.labels), rng, draws=draws)
            for m in (m1, m2, m3):
                arrays.update(_arrays(m))
        elif key == "parc":
            seg = pseudo_segmentation(x)
            cortex = np.isin(seg, [3, 42])
            inp = np.concatenate([x, np.eye(2, dtype=np.float32)[cortex.astype(np.int64)][np.newaxis]], axis=-1)
            arrays = _arrays(_stage(inp, "unet_parc", len(L.parcellation_labels()), pseudo_parcels(seg), rng,
                                    draws=draws))
        elif key == "qc":
            arrays = _arrays(_qc_stage(x, rng, draws))
        else:
            raise ValueError(f"unknown model key {key!r}; choose from {sorted(SYNTHSEG_KEYS)}")
        path = out / MODEL_FILES[key]
        write_weights(path, arrays, layout=layout, test_seed=seed)
        if recipes is not None:
            Path(recipes).mkdir(parents=True, exist_ok=True)
            weightrecipe.write(Path(recipes) / f"{MODEL_FILES[key]}{weightrecipe.RECIPE_SUFFIX}", path, draws,
                               layout, seed)
        written[key] = path
    return written


def main(argv: list[str] | None = None) -> int:
    prepare_tensorflow()
    p = argparse.ArgumentParser(prog="python -m devtools.weightauthor",
                                description="Calibrate the seeded test weights with TensorFlow and write their recipes "
                                "(default: into the package, where synthseg-native-testweights rebuilds them).")
    p.add_argument("--recipes", default=str(testweights.recipe("seg2").parent), help="folder for the recipes")
    p.add_argument("--weights", help="folder for the weight files themselves (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=testweights.SEED)
    p.add_argument("--only", nargs="+", choices=sorted(SYNTHSEG_KEYS))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for key, path in generate(args.weights or tmp, args.seed, "model", args.only, recipes=args.recipes).items():
            logger.log(DONE, f"{key}: {Path(args.recipes) / (path.name + weightrecipe.RECIPE_SUFFIX)}"
                       + (f" and {path}" if args.weights else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
