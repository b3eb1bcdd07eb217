"""Devices and threads: what TensorFlow really runs on, and ``make doctor``.

"GPU detected" is not an answer on a Mac: tensorflow-metal registers a GPU but cannot run the
fused BatchNorm kernel on 5-D tensors, which is what SynthSeg's networks use. So the doctor runs a
tiny Conv3D + BatchNormalization on a 5-D tensor on every device and reports, per op, where it
actually ran and whether fused BatchNorm works there:

* each op alone, eagerly: TensorFlow silently moves an op without a kernel on the requested device
  to the CPU, and the output tensor's ``.device`` says where it went;
* the same two layers as a Keras model in inference mode, traced like the engine's networks, with
  soft placement switched off, so a success means every op of the graph ran on that device.

The other functions set TensorFlow up for a run: they must run before TensorFlow starts its runtime
(the first op), because thread counts and visible devices are frozen after that. ``make doctor``
(``tools/doctor.py``) prints :func:`report`.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from importlib.metadata import version

import h5py
import nibabel
import numpy as np

from ...machine import cpu_has_bf16, cpu_model, cpu_vendor

logger = logging.getLogger(__name__)
_SHAPE = (1, 8, 8, 8, 1)


def prepare_tensorflow(debug: bool = False) -> None:
    """Environment TensorFlow reads once, at import: call before the first ``import tensorflow``.

    On x86-64 Linux, TensorFlow 2.15 enables its oneDNN CPU kernels only on some Intel CPUs; elsewhere
    (AMD EPYC, for one) it falls back to Eigen's Conv3D, which crashes (segfault) on full-size brains
    — upstream SynthSeg included — and is 2-3x slower. We turn oneDNN on unless the user chose
    (``TF_ENABLE_ONEDNN_OPTS`` set); ``--engine upstream`` runs in the same process, so comparisons
    always use the same kernels. A choice of ``0`` (qsiprep sets it around FreeSurfer's mri_synthseg) is
    honoured on Intel CPUs, where it gives FreeSurfer's bytes under the same setting, and overridden with a
    warning elsewhere, where it would crash. ``TF_USE_LEGACY_KERAS`` (also qsiprep's) is dropped: it would make
    TensorFlow 2.15 look for the ``tf_keras`` package, and its own ``tf.keras`` is the Keras 2 that variable asks for.
    """
    if os.environ.pop("TF_USE_LEGACY_KERAS", None) is not None:
        # qsiprep sets it; TensorFlow 2.15 would then load tf.keras from the separate tf_keras package and fail
        # without it, while its own tf.keras already is Keras 2 (FreeSurfer 8's script fails the same way on 2.15)
        logger.info("TF_USE_LEGACY_KERAS ignored: TensorFlow 2.15's tf.keras already is Keras 2")
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
        if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0" and cpu_vendor() != "GenuineIntel":
            # qsiprep sets it for FreeSurfer's mri_synthseg; honoured, it crashes here on a full-size brain
            os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
            logger.warning(f"TF_ENABLE_ONEDNN_OPTS=0 is not honoured: on this CPU ({cpu_model()}) TensorFlow's "
                           "Eigen Conv3D, which it selects, crashes on full-size brains (segmentation fault); "
                           "oneDNN stays on (docs/freesurfer.md)")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        # TensorFlow's Python warnings (e.g. its retracing heuristic, which counts the staged U-Net's
        # per-stage functions as "retracing") are noise for users; --debug shows them.
        logging.getLogger("tensorflow").setLevel(logging.ERROR)


def onednn_enabled() -> bool:
    """Whether TensorFlow's oneDNN CPU kernels are on in this process."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1"


def hide_gpus() -> bool:
    """For --cpu: hide CUDA devices (env var) and any GPU TensorFlow registered (Metal ignores the env var). False
    where TensorFlow had already initialised its devices in this process (a GPU that failed its self-check): the
    GPUs stay visible and the caller pins its work to the CPU instead."""
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        return not tf.config.get_visible_devices("GPU")
    return True


def available() -> list[str]:
    """TensorFlow's CPU and GPU devices by the names ops are pinned with: "/CPU:0", "/GPU:0"."""
    import tensorflow as tf

    return [f"/{d.device_type}:{d.name.split(':')[-1]}" for d in tf.config.list_physical_devices()
            if d.device_type in ("CPU", "GPU")]


def cpu_name() -> str:
    """The CPU as the run reports it: "CPU (x86_64)", "CPU (arm)"."""
    return f"CPU ({platform.processor() or platform.machine()})"


def configure_threads(n: int | None = None) -> int:
    """Set TensorFlow's intra/inter-op threads (default: all cores); returns the number in effect.

    Upstream SynthSeg defaults to one thread; results do not depend on the count, speed does.
    TensorFlow refuses to change it once its runtime started; in that case (several runs in one
    process, e.g. tests) the first setting stays and is reported.
    """
    import tensorflow as tf

    want = n or os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(want)
        tf.config.threading.set_inter_op_parallelism_threads(want)
    except RuntimeError:
        current = tf.config.threading.get_intra_op_parallelism_threads()
        return current or want
    return want


PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def precision_unsupported(precision: str) -> str | None:
    """Why ``precision`` cannot run fast on the device the networks will use (None: it can).

    Reduced precision only pays where the hardware has it: bf16 on CPUs with AVX512-BF16 or AMX and on
    CUDA GPUs of compute capability 8.0 or newer, fp16 on CUDA GPUs. TensorFlow 2.15 has no fast fp16
    Conv3D on CPUs (a reference kernel, hundreds of times slower), and tensorflow-metal's reduced
    precision is not validated here.
    """
    if precision == "fp32":
        return None
    import tensorflow as tf

    gpus = tf.config.get_visible_devices("GPU") if tf.config.list_physical_devices("GPU") else []
    if gpus:
        if is_metal_gpu():
            return "reduced precision is not validated on tensorflow-metal"
        major = (tf.config.experimental.get_device_details(gpus[0]).get("compute_capability") or (0, 0))[0]
        if precision == "bf16" and major < 8:
            return f"bf16 needs a CUDA GPU of compute capability 8.0 or newer (this one: {major}.x)"
        return None
    if precision == "fp16":
        return "TensorFlow 2.15 has no fast float16 Conv3D on CPUs"
    if not cpu_has_bf16():
        return "this CPU has neither AVX512-BF16 nor AMX-BF16"
    return None


def framework() -> str:
    """TensorFlow's version, and tensorflow-metal's when it is installed (for messages and the self-check's cache)."""
    import tensorflow as tf

    try:
        metal = f", tensorflow-metal {version('tensorflow-metal')}"
    except Exception:  # not installed (anywhere but macOS arm64)
        metal = ""
    return f"TensorFlow {tf.__version__}{metal}"


def is_metal_gpu() -> bool:
    """True when the GPU TensorFlow would use is Apple's Metal plugin (the engine then unfuses BatchNorm)."""
    import tensorflow as tf

    if sys.platform != "darwin":
        return False
    return bool(tf.config.get_visible_devices("GPU"))


def network_device() -> str:
    """Human-readable name of the device the networks will run on: "CPU (...)", "GPU:0 (name)"."""
    import tensorflow as tf

    gpus = tf.config.get_visible_devices("GPU") if tf.config.list_physical_devices("GPU") else []
    if not gpus:
        return cpu_name()
    if is_metal_gpu():
        return "GPU:0 (Apple Metal)"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU:0 ({details.get('device_name', 'CUDA')})"


def _failure(exc: BaseException) -> str:
    """One short line for an op that could not run (TensorFlow's messages span many lines)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"FAILED ({type(exc).__name__}: {first[:160]})"


def probe(device: str) -> dict[str, str]:
    """Run Conv3D + fused BatchNorm on a 5-D tensor on ``device``, eagerly; map op type → device or error."""
    import tensorflow as tf

    x = tf.constant(np.random.RandomState(0).rand(*_SHAPE).astype(np.float32))
    kernel = tf.constant(np.random.RandomState(1).rand(3, 3, 3, 1, 4).astype(np.float32))
    ones, zeros = tf.ones([4]), tf.zeros([4])
    where: dict[str, str] = {}
    with tf.device(device):
        try:
            y = tf.nn.conv3d(x, kernel, [1] * 5, "SAME")
            where["Conv3D"] = y.device or device
        except Exception as exc:  # a device that cannot run the op at all raises here
            where["Conv3D"] = _failure(exc)
            return where
        try:
            z = tf.raw_ops.FusedBatchNormV3(x=y, scale=ones, offset=zeros, mean=zeros, variance=ones,
                                            epsilon=1e-3, data_format="NDHWC", is_training=False)[0]
            where["FusedBatchNormV3 (5-D)"] = z.device or device
        except Exception as exc:  # tensorflow-metal: "input must be 4-dimensional"
            where["FusedBatchNormV3 (5-D)"] = _failure(exc)
        z = (y - zeros) * tf.math.rsqrt(ones + 1e-3) * ones + zeros
        where["unfused BatchNorm (Rsqrt/Mul/Sub/AddV2)"] = z.device or device
    return where


def keras_probe(device: str) -> tuple[list[str], str]:
    """Trace Conv3D → BatchNormalization (training=False) as Keras builds it and run it on ``device``.

    Returns the compute op types of the traced graph (showing which BatchNorm kernel Keras picked)
    and where the graph ran: the device, or the first line of the error. Soft placement is off
    while it runs, so TensorFlow cannot quietly move an op to the CPU.
    """
    import tensorflow as tf

    soft = tf.config.get_soft_device_placement()
    try:
        with tf.device(device):  # variables live on the probed device too, as they would in the engine
            inp = tf.keras.Input(shape=_SHAPE[1:])
            out = tf.keras.layers.BatchNormalization(axis=-1)(tf.keras.layers.Conv3D(4, 3, padding="same")(inp))
            model = tf.keras.Model(inp, out)
            infer = tf.function(lambda t: model(t, training=False), autograph=False)
            graph = infer.get_concrete_function(tf.TensorSpec(_SHAPE, tf.float32)).graph
            skip = {"Placeholder", "ReadVariableOp", "Identity", "NoOp", "Const"}
            ops = sorted({op.type for op in graph.get_operations() if op.type not in skip})
            tf.config.set_soft_device_placement(False)
            y = infer(tf.ones(_SHAPE))
            return ops, y.device or device
    except Exception as exc:
        return locals().get("ops", []), _failure(exc)
    finally:
        tf.config.set_soft_device_placement(soft)


def run_ops(device: str, inputs: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray | None, str]]:
    """Every op type of SynthSeg's networks on ``device`` (``/GPU:0``, ``/CPU:0``; ``make doctor``'s probe), with soft
    placement off: the result as numpy and where it ran (or why it failed). ``inputs``: channels-last float32
    arrays (x, kernel, bias, gamma, beta, mean, var)."""
    import tensorflow as tf

    found: dict[str, tuple[np.ndarray | None, str]] = {}
    soft = tf.config.get_soft_device_placement()
    tf.config.set_soft_device_placement(False)
    try:
        with tf.device(device):
            x = tf.constant(inputs["x"])
            ops = {
                "Conv3D": lambda: tf.nn.bias_add(tf.nn.conv3d(x, inputs["kernel"], [1] * 5, "SAME"), inputs["bias"]),
                "MaxPool3D": lambda: tf.nn.max_pool3d(x, 2, 2, "SAME"),
                "UpSampling3D (nearest)": lambda: tf.keras.layers.UpSampling3D(2)(x),
                "Concatenate": lambda: tf.concat([x, 2 * x], axis=-1),
                "ELU": lambda: tf.nn.elu(x - 0.5),
                "Softmax": lambda: tf.nn.softmax(x, axis=-1),
                "Argmax/one-hot": lambda: tf.one_hot(tf.argmax(x, axis=-1), x.shape[-1]),
                "BatchNorm (inference)": lambda: tf.nn.batch_normalization(x, inputs["mean"], inputs["var"],
                                                                           inputs["beta"], inputs["gamma"], 1e-3),
            }
            for name, op in ops.items():
                try:
                    out = op()
                    found[name] = (out.numpy(), out.device or device)
                except Exception as exc:  # an op the device lacks: report it, do not crash the doctor
                    found[name] = (None, _failure(exc))
    finally:
        tf.config.set_soft_device_placement(soft)
    return found


def _short(where: str) -> str:
    """"/job:localhost/replica:0/task:0/device:CPU:0" → "device:CPU:0"; failures stay whole."""
    return where if where.startswith("FAILED") else where.split("/")[-1]


def report() -> str:
    """The doctor's report: versions, devices, and per device where each op type ran."""
    import keras
    import tensorflow as tf

    lines = [f"Python {platform.python_version()} on {platform.system()} {platform.machine()}",
             f"tensorflow {tf.__version__}, keras {keras.__version__}, numpy {np.__version__}, "
             f"nibabel {nibabel.__version__}, h5py {h5py.__version__}"]
    devices = tf.config.list_physical_devices()
    lines.append("physical devices: " + ", ".join(f"{d.device_type}:{d.name.split(':')[-1]}" for d in devices))
    fused_ok, fused_failed = [], []
    for name in available():
        for op, where in probe(name).items():
            lines.append(f"  {name}: {op} -> {_short(where)}")
            if op.startswith("FusedBatchNormV3"):
                (fused_ok if where.endswith(name[1:]) else fused_failed).append(name)
        ops, where = keras_probe(name)
        lines.append(f"  {name}: keras Conv3D+BatchNormalization (inference; ops {', '.join(ops)}) -> {_short(where)}")
    lines.append(f"fused 5-D BatchNorm runs on: {', '.join(fused_ok) or 'none'}"
                 + (f"; not on: {', '.join(fused_failed)}" if fused_failed else ""))
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset: TensorFlow's per-CPU default)")
    lines.append(f"oneDNN CPU kernels: {'on' if onednn_enabled() else 'off'} (TF_ENABLE_ONEDNN_OPTS={onednn})")
    metal = is_metal_gpu()
    lines.append(f"network device: {network_device()}; BatchNorm --bn auto = {'unfused' if metal else 'fused'}")
    return "\n".join(lines)
