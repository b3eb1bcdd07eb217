"""The TensorFlow backend: SynthSeg's networks as tf.keras models and the primitives the engine's predictor runs.

Everything here reproduces upstream's inference graph with the same Keras layers and TensorFlow ops, so that on the
CPU the posteriors are upstream's bits (docs/equivalence.md): the plain U-Nets run staged (network.StagedUNet, same
bits in a fraction of the memory), the robust cascade as one graph, the blur and the flip average as upstream's
float32 ops on slabs (blur.py). Tensors are numpy arrays, handed to TensorFlow without copies (tensors.py). This
package is the only one that imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import tensorflow as tf

from ....errors import UsageError
from ... import architecture as arch
from ...backend import SIGMA_POSTERIORS, Slab, out_of_memory
from ...runtime import DeviceMemory, Runtime
from ...spec import ModelSpec
from . import devices, network
from .blur import ChannelBlur, blur_average_flipped, blurred_slabs
from .patches import unfused_batchnorm

logger = logging.getLogger(__name__)


def start(spec: ModelSpec) -> TFBackend:
    """Devices, threads and precision for this process, before the first TensorFlow op.

    ``--precision`` falls back to fp32 (with a warning) where the device lacks fast support for it.
    """
    if not spec.debug:  # e.g. "triggered tf.function retracing" in a batch: noise between the log lines
        tf.get_logger().setLevel("ERROR")
    pinned = False  # GPUs still visible after --cpu (TensorFlow started on one): everything pinned to /CPU:0
    if spec.device == "cpu":
        pinned = not devices.hide_gpus()
    elif spec.device in ("cuda", "mps") and not tf.config.list_physical_devices("GPU"):
        raise UsageError(f"--device {spec.device}: TensorFlow sees no GPU (a CPU-only build, no driver, or "
                         "CUDA_VISIBLE_DEVICES hides it); --backend torch may see it")
    threads = devices.configure_threads(spec.threads)
    precision = spec.precision
    if precision != "fp32":
        why = devices.precision_unsupported(precision)
        if why:
            logger.warning(f"--precision {precision}: {why}; running in fp32 (identical to upstream)")
            precision = "fp32"
    device = devices.cpu_name() if pinned else devices.network_device()
    kind = "cpu" if device.startswith("CPU") else ("mps" if devices.is_metal_gpu() else "cuda")
    bn = spec.bn if spec.bn != "auto" else ("unfused" if kind == "mps" else "fused")
    runtime = Runtime(threads=threads, device=device, precision=precision, backend="tf", device_kind=kind,
                      framework=devices.framework())
    return TFBackend(runtime, bn, scope="/CPU:0" if pinned else None)


class TFBackend:
    """The primitives of :class:`~synthseg_native.engine.backend.Backend` in TensorFlow; tensors are numpy arrays."""

    name = "tf"

    def __init__(self, runtime: Runtime, bn: str, scope: str | None = None):
        self.runtime, self.bn, self.scope = runtime, bn, scope  # scope: a device to pin everything to ("/CPU:0")
        self._blur: ChannelBlur | None = None
        self._argmax: network.Argmax | None = None

    def _placed(self) -> contextlib.AbstractContextManager:
        return tf.device(self.scope) if self.scope else contextlib.nullcontext()

    def build(self, net: arch.Network, arrays: dict[str, dict[str, np.ndarray]]) -> Any:
        """Every network in the BatchNorm form the device needs; the segmentation and parcellation networks in the
        run's precision (the QC network stays float32, as its scores are printed to four decimals). A plain U-Net
        runs staged; the robust cascade as one Keras graph."""
        precision = "fp32" if isinstance(net, arch.QC) else self.runtime.precision
        with self._placed(), batchnorm_form(self.bn), precision_policy(precision):
            model = network.keras_model(net)
            assign(model, arrays)
            if isinstance(net, arch.UNet):
                return network.StagedUNet(model, prefix=net.prefix, n_levels=net.n_levels)
        return model

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        try:
            with self._placed():
                yield
        except tf.errors.ResourceExhaustedError as exc:
            raise out_of_memory(str(exc)) from exc

    @property
    def blurrer(self) -> ChannelBlur:
        if self._blur is None:
            self._blur = ChannelBlur(SIGMA_POSTERIORS)
        return self._blur

    def upload(self, image: np.ndarray) -> np.ndarray:
        return image

    def download(self, post: np.ndarray) -> np.ndarray:
        return post

    def copy(self, post: np.ndarray) -> np.ndarray:
        return post.copy()

    def flipped(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:, ::-1])

    def run(self, net: Any, x: np.ndarray) -> np.ndarray:
        return net.predict(x, verbose=0)

    def run_slabs(self, net: network.StagedUNet, x: np.ndarray) -> Iterator[Slab]:
        return net.predict_slabs(x)

    def assemble(self, slabs: Iterator[Slab], like: np.ndarray) -> np.ndarray:
        return network.assemble(slabs, like.shape[1])

    def blur(self, post: np.ndarray) -> np.ndarray:
        return self.blurrer(post)

    def blur_slabs(self, slabs: Iterator[Slab]) -> Iterator[Slab]:
        return blurred_slabs(slabs, self.blurrer)

    def blur_flip_average(self, post: np.ndarray, flipped: Iterator[Slab], order: np.ndarray) -> np.ndarray:
        return blur_average_flipped(post, flipped, self.blurrer, order)

    def decisions(self, post: np.ndarray) -> np.ndarray:
        if self._argmax is None:
            self._argmax = network.Argmax()
        return self._argmax(post)

    def parc_input(self, x: np.ndarray, post: np.ndarray, cortex: np.ndarray) -> np.ndarray:
        one_hot = np.eye(2, dtype=np.float32)[cortex[self.decisions(post)].astype(np.int64)]
        return np.concatenate([x, one_hot], axis=-1)

    def score(self, net: tf.keras.Model, groups: np.ndarray) -> np.ndarray:
        return net.predict(groups, verbose=0)

    def device_memory(self) -> DeviceMemory | None:
        """None: the host's memory bounds a TensorFlow run (its GPU memory use is not modelled)."""
        return None

    def cpu_twin(self) -> TFBackend:
        """The networks pinned to the CPU in this process (TensorFlow picks the GPU by default), in fused BatchNorm."""
        if self.runtime.device_kind == "cpu":
            return self
        runtime = Runtime(threads=self.runtime.threads, device=devices.cpu_name(), precision="fp32",
                          backend="tf", framework=self.runtime.framework)
        return TFBackend(runtime, "fused", scope="/CPU:0")


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


def assign(model: tf.keras.Model, arrays: dict[str, dict[str, np.ndarray]]) -> int:
    """Set every weighted layer of ``model`` from checked arrays (``engine.weights.checked``: names, shapes and
    values verified against the architecture); returns the number of layers set."""
    count = 0
    for name, layer in network.weighted_layers(model).items():
        layer.set_weights([arrays[name][w.name.split("/")[-1].split(":")[0]] for w in layer.weights])
        count += 1
    return count
