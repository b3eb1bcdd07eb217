"""Devices and threads: what TensorFlow really runs on, and ``make doctor``.

"GPU detected" is not an answer on a Mac: tensorflow-metal registers a GPU but cannot run the
fused BatchNorm kernel on 5-D tensors, which is what SynthSeg's networks use. So the doctor runs a
tiny Conv3D + BatchNormalization on a 5-D tensor on every device and reports, per op, where it
actually ran and whether fused BatchNorm works there.
"""

from __future__ import annotations

import os
import platform
import sys


def hide_gpus() -> None:
    """For --cpu: hide CUDA devices (env var) and any GPU TensorFlow registered (Metal ignores the env var)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices in this process
        print("[WARN] --cpu requested after TensorFlow started; GPUs stay visible", file=sys.stderr)


def configure_threads(n: int | None = None) -> int:
    """Set TensorFlow's intra/inter-op threads (default: all cores); returns the number in effect.

    TensorFlow refuses to change them once its runtime started; in that case (several runs in one
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


def is_metal_gpu() -> bool:
    """True when the GPU TensorFlow would use is Apple's Metal plugin."""
    import tensorflow as tf

    if sys.platform != "darwin":
        return False
    return bool(tf.config.list_physical_devices("GPU"))


def network_device() -> str:
    """Human-readable name of the device the networks will run on."""
    import tensorflow as tf

    gpus = tf.config.get_visible_devices("GPU") if tf.config.list_physical_devices("GPU") else []
    if not gpus:
        return f"CPU ({platform.processor() or platform.machine()})"
    if is_metal_gpu():
        return "GPU:0 (Apple Metal)"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU:0 ({details.get('device_name', 'CUDA')})"


def probe(device: str) -> dict[str, str]:
    """Run Conv3D + fused BatchNorm on a 5-D tensor on ``device``; map op type → device or error."""
    import numpy as np
    import tensorflow as tf

    x = tf.constant(np.random.RandomState(0).rand(1, 8, 8, 8, 1).astype(np.float32))
    kernel = tf.constant(np.random.RandomState(1).rand(3, 3, 3, 1, 4).astype(np.float32))
    ones, zeros = tf.ones([4]), tf.zeros([4])
    where: dict[str, str] = {}
    with tf.device(device):
        try:
            y = tf.nn.conv3d(x, kernel, [1] * 5, "SAME")
            where["Conv3D"] = y.device or device
        except Exception as exc:  # a device without the kernel raises here
            where["Conv3D"] = f"FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
            return where
        try:
            z = tf.raw_ops.FusedBatchNormV3(x=y, scale=ones, offset=zeros, mean=zeros, variance=ones,
                                            epsilon=1e-3, data_format="NDHWC", is_training=False)[0]
            where["FusedBatchNormV3 (5-D)"] = z.device or device
        except Exception as exc:
            where["FusedBatchNormV3 (5-D)"] = f"FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        z = (y - zeros) * tf.math.rsqrt(ones + 1e-3) * ones + zeros
        where["unfused BatchNorm (Rsqrt/Mul/Sub/AddV2)"] = z.device or device
    return where


def report() -> str:
    import h5py
    import keras
    import nibabel
    import numpy as np
    import tensorflow as tf

    lines = [f"Python {platform.python_version()} on {platform.system()} {platform.machine()}",
             f"tensorflow {tf.__version__}, keras {keras.__version__}, numpy {np.__version__}, "
             f"nibabel {nibabel.__version__}, h5py {h5py.__version__}"]
    devices = tf.config.list_physical_devices()
    lines.append("physical devices: " + ", ".join(f"{d.device_type}:{d.name.split(':')[-1]}" for d in devices))
    for d in devices:
        if d.device_type not in ("CPU", "GPU"):
            continue
        name = f"/{d.device_type}:{d.name.split(':')[-1]}"
        for op, where in probe(name).items():
            lines.append(f"  {name}: {op} -> {where.split('/')[-1] if not where.startswith('FAILED') else where}")
    metal = is_metal_gpu()
    lines.append(f"network device: {network_device()}; BatchNorm --bn auto = {'unfused' if metal else 'fused'}")
    return "\n".join(lines)


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    print("[INFO] " + report().replace("\n", "\n[INFO] "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
