"""The TensorFlow backend's predictor: SynthSeg's networks built and loaded once, then run per image.

Everything here reproduces upstream's inference graph with the same Keras layers and TensorFlow ops,
so that on the CPU the posteriors are upstream's bits (docs/equivalence.md). The engine talks to it
through :class:`synthseg_native.engine.predictor.Predictor`; this module and its siblings are the
only ones that import TensorFlow.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import tensorflow as tf

from ....config import Options
from ....errors import UsageError, WeightsError
from ... import heads, tiling
from ... import labels as L
from ...runtime import Runtime, Timings
from ...weights import MODEL_FILES, file_sha256, find_weights, is_test_weights, read_weights
from . import devices, network
from .blur import ChannelBlur, blur_average_flipped, blurred_slabs
from .flops import conv_flops
from .patches import unfused_batchnorm

logger = logging.getLogger(__name__)
SIGMA_POSTERIORS = 0.5  # upstream smooths the segmentation posteriors with this Gaussian


def start(opts: Options) -> Runtime:
    """Devices, threads and precision for this process, before the first TensorFlow op.

    ``--precision`` falls back to fp32 (with a warning) where the device lacks fast support for it.
    """
    if opts.cpu:
        devices.hide_gpus()
    elif opts.device in ("cuda", "mps") and not tf.config.list_physical_devices("GPU"):
        raise UsageError(f"--device {opts.device}: TensorFlow sees no GPU (a CPU-only build, no driver, or "
                         "CUDA_VISIBLE_DEVICES hides it); --backend torch may see it")
    threads = devices.configure_threads(opts.threads)
    precision = opts.precision
    if precision != "fp32":
        why = devices.precision_unsupported(precision)
        if why:
            logger.warning(f"--precision {precision}: {why}; running in fp32 (identical to upstream)")
            precision = "fp32"
    device = devices.network_device()
    return Runtime(threads=threads, device=device, precision=precision, backend="tf",
                   device_kind="cpu" if device.startswith("CPU") else ("mps" if devices.is_metal_gpu() else "cuda"))


class TFPredictor:
    """Holds the built and loaded networks so a batch pays for model construction once."""

    def __init__(self, opts: Options, timings: Timings):
        if not opts.debug:  # e.g. "triggered tf.function retracing" in a batch: noise between the log lines
            tf.get_logger().setLevel("ERROR")
        self.opts = opts
        self.labels = L.LabelSet.build(opts.v1)
        t0 = time.perf_counter()
        self.bn = opts.bn if opts.bn != "auto" else ("unfused" if devices.is_metal_gpu() else "fused")
        key = opts.segmentation_model
        self.weight_paths = {key: find_weights(MODEL_FILES[key], opts.models)}
        self.flip = None if (opts.fast or opts.robust) else self.labels.flip
        with batchnorm_form(self.bn), precision_policy(opts.precision):
            if opts.robust:
                self.model = network.robust_model(len(self.labels.labels), len(L.denoiser_groups()))
            else:
                self.model = network.unet_model(len(self.labels.labels))
        self.blur = None if opts.robust else ChannelBlur(SIGMA_POSTERIORS)
        path = self.weight_paths[key]
        assign(self.model, read_weights(path), path)
        # The plain U-Nets run in stages (same bits, a fraction of the memory); robust stays one graph.
        with precision_policy(opts.precision):
            self.run_seg = self.model if opts.robust else network.StagedUNet(self.model)
        self.channels = network.ArgmaxLabels(np.arange(len(self.labels.labels)))
        self.parc_model = self.qc_model = None
        self._flop_cache: dict[tuple[int, ...], int] = {}
        if opts.parc:
            with precision_policy(opts.precision):
                parc = network.parc_model(len(L.parcellation_labels()))
            self.parc_model = self._load("parc", parc)
            with precision_policy(opts.precision):
                self.run_parc = network.StagedUNet(self.parc_model, prefix="unet_parc")
            self.parc_blur = ChannelBlur(SIGMA_POSTERIORS)
        if opts.qc:
            self.qc_model = self._load("qc", network.qc_model(len(np.unique(self.labels.qc_groups))))
        for weights in self.weight_paths.values():
            if is_test_weights(weights):
                logger.warning(f"{weights}: seeded random test weights (synthseg_native.tools.testweights), not "
                               "the official ones: outputs are anatomically meaningless")
        timings.add("load_weights", time.perf_counter() - t0)

    def _load(self, key: str, model: tf.keras.Model) -> tf.keras.Model:
        path = find_weights(MODEL_FILES[key], self.opts.models)
        self.weight_paths[key] = path
        assign(model, read_weights(path), path)
        return model

    def network_flop(self, shape: tuple[int, ...]) -> int:
        """Convolution FLOPs the segmentation (both passes) and parcellation networks spend on one padded input.

        The QC network and the posterior blur are not counted (a small fraction; see flops.py).
        """
        key = tuple(shape)
        if key not in self._flop_cache:
            total = conv_flops(self.model, key) * (1 if self.flip is None else 2)
            if self.parc_model is not None:
                total += conv_flops(self.parc_model, key[:-1] + (3,))
            self._flop_cache[key] = total
        return self._flop_cache[key]

    def device_memory(self) -> tuple[float | None, str] | None:
        """None: the host's memory bounds a TensorFlow run (its GPU memory use is not modelled)."""
        return None

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
        heads_on = self.parc_model is not None or self.qc_model is not None
        if self.blur is None:  # robust: no smoothing anywhere
            blurred = returned = self.run_seg.predict(image, verbose=0)
        elif self.flip is not None:  # both passes blurred as their slabs come out of the network
            blurred = network.assemble(blurred_slabs(self.run_seg.predict_slabs(image), self.blur),
                                       image.shape[1])
            flipped = self.run_seg.predict_slabs(np.ascontiguousarray(image[:, ::-1]))
            blurred = returned = blur_average_flipped(blurred, flipped, self.blur, self.flip)
        else:
            soft = self.run_seg.predict(image, verbose=0)
            returned = soft.copy() if heads_on else None
            blurred = self.blur(soft)
            returned = blurred if returned is None else returned
        return returned, blurred

    def _parcellate(self, image: np.ndarray, blurred: np.ndarray) -> np.ndarray | None:
        if self.parc_model is None:
            return None
        cortex = heads.cortex_lut(self.labels)[self.channels(blurred)]
        post_parc = self.run_parc.predict(heads.parc_input(image, cortex), verbose=0)
        if self.qc_model is None:
            post_parc = self.parc_blur(post_parc)
        return post_parc

    def _qc_channels(self, returned: np.ndarray, blurred: np.ndarray) -> np.ndarray:
        """The hard decision (1, X, Y, Z) the QC network scores."""
        return self.channels(returned if self.parc_model is not None else blurred)

    def _qc(self, channels: np.ndarray) -> np.ndarray:
        assert self.qc_model is not None
        return self.qc_model.predict(heads.qc_input(channels[0], self.labels), verbose=0)


@contextmanager
def precision_policy(precision: str) -> Iterator[None]:
    """Build Keras layers under a reduced-precision policy (--precision bf16/fp16).

    Weights stay float32 (the same files load); convolutions run in the reduced type and the softmax in
    float32. fp32 leaves the global policy untouched, so the default graph is exactly upstream's.
    """
    policy = devices.PRECISIONS[precision]
    if policy == "float32":
        yield
        return
    saved = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(saved)


@contextmanager
def batchnorm_form(form: str) -> Iterator[None]:
    """Build Keras BatchNorm layers in the requested (fused/unfused) form."""
    if form != "unfused":
        yield
        return
    with unfused_batchnorm():
        yield


def assign(model: tf.keras.Model, arrays: dict[str, dict[str, np.ndarray]], path: str | os.PathLike,
           prefixes: tuple[str, ...] | None = None) -> int:
    """Set every weighted layer of ``model`` (optionally only those with a given prefix) from
    :func:`~synthseg_native.engine.weights.read_weights`'s arrays.

    Returns the number of layers set; raises naming the first layer that is missing or misshaped, where
    Keras' own ``load_weights(by_name=True)`` would skip it silently.
    """
    count = 0
    for name, layer in network.weighted_layers(model).items():
        if prefixes is not None and not name.startswith(prefixes):
            continue
        if name not in arrays:
            raise WeightsError(f"{path}: layer '{name}' is missing from the weights file")
        stored = arrays[name]
        values = []
        for w in layer.weights:
            kind = w.name.split("/")[-1].split(":")[0]
            if kind not in stored:
                raise WeightsError(f"{path}: layer '{name}' has no '{kind}' weights")
            if tuple(stored[kind].shape) != tuple(w.shape):
                raise WeightsError(f"{path}: layer '{name}' {kind} has shape {tuple(stored[kind].shape)}, "
                                   f"the network expects {tuple(w.shape)}")
            if not np.all(np.isfinite(stored[kind])):  # damaged bytes inside a dataset read back as NaN/Inf
                raise WeightsError(f"{path}: layer '{name}' {kind} has NaN or infinite values (corrupt file?)")
            values.append(stored[kind])
        layer.set_weights(values)
        count += 1
    return count
