"""``make doctor`` / ``synthseg-native-doctor``: versions, devices, and whether each device computes SynthSeg right.

"GPU detected" is not an answer: tensorflow-metal registers a GPU that cannot run a 5-D fused BatchNorm, MPS has
lacked 3-D ops and has returned wrong values without an error (docs/platforms in README). So for each installed
backend and each of its devices, every op type of the networks (Conv3D, MaxPool3D, nearest upsampling, concat, ELU,
softmax, argmax/one-hot, BatchNorm) runs on small random inputs and is compared with a float64 numpy reference:
where it ran, and how far off it is. On every GPU the engine's own self-check follows (engine.selfcheck: a streamed
U-Net, the blur and the flip average against the CPU), recomputed here (the runs keep their own cached verdict).
An environment without a framework says so instead of failing. Exit 1 when an op fails or is wrong, or a GPU fails
its self-check.

``--device cpu`` runs the self-check with the CPU standing in for the GPU (what a machine without a GPU can test).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Callable

import numpy as np

from ..config import Options
from ..engine import predictor as engine
from ..engine import selfcheck
from ..engine.spec import ModelSpec
from ..errors import SynthSegError

logger = logging.getLogger(__spec__.name if __spec__ else __name__)  # under "python -m" too
TOLERANCE = 1e-4  # float32 against float64 on inputs of unit size


def inputs() -> dict[str, np.ndarray]:
    """Small random channels-last inputs of every op (even sizes for the pooling)."""
    rng = np.random.RandomState(3)
    return {"x": rng.rand(1, 12, 10, 8, 4).astype(np.float32),
            "kernel": rng.normal(0, 0.3, (3, 3, 3, 4, 6)).astype(np.float32),
            "bias": rng.normal(0, 0.1, 6).astype(np.float32), "gamma": rng.uniform(0.5, 1.5, 4).astype(np.float32),
            "beta": rng.normal(0, 0.1, 4).astype(np.float32), "mean": rng.normal(0, 0.1, 4).astype(np.float32),
            "var": rng.uniform(0.5, 1.5, 4).astype(np.float32)}


def references(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same ops in float64 numpy: what every device's results are compared with."""
    x = a["x"].astype(np.float64)[0]
    padded = np.pad(x, ((1, 1), (1, 1), (1, 1), (0, 0)))
    conv = np.zeros(x.shape[:3] + (a["kernel"].shape[-1],))
    for i, j, k in np.ndindex(3, 3, 3):
        conv += padded[i:i + x.shape[0], j:j + x.shape[1], k:k + x.shape[2]] @ a["kernel"][i, j, k]
    s = x.shape
    e = np.exp(x - x.max(-1, keepdims=True))
    return {k: v[np.newaxis] for k, v in {
        "Conv3D": conv + a["bias"],
        "MaxPool3D": x.reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2, s[3]).max(axis=(1, 3, 5)),
        "UpSampling3D (nearest)": x.repeat(2, 0).repeat(2, 1).repeat(2, 2),
        "Concatenate": np.concatenate([x, 2 * x], axis=-1),
        "ELU": np.where(x - 0.5 > 0, x - 0.5, np.expm1(np.minimum(x - 0.5, 0))),
        "Softmax": e / e.sum(-1, keepdims=True),
        "Argmax/one-hot": np.eye(s[3])[np.argmax(x, axis=-1)],
        "BatchNorm (inference)": (x - a["mean"]) / np.sqrt(a["var"] + 1e-3) * a["gamma"] + a["beta"],
    }.items()}


def probe(device: str, run_ops: Callable[[str, dict[str, np.ndarray]], dict]) -> tuple[list[str], bool]:
    """One line per op on ``device``: where it ran and how far from the reference; and whether all were right."""
    given = inputs()
    expected = references(given)
    lines, good = [], True
    for op, (out, where) in run_ops(device, given).items():
        if out is None:
            lines.append(f"  {device}: {op} -> {where}")
            good = False
            continue
        diff = float(np.max(np.abs(out.astype(np.float64) - expected[op])))
        ok = diff <= TOLERANCE
        good &= ok
        lines.append(f"  {device}: {op} -> {where.split('/')[-1]}, max |diff| vs float64 {diff:.2g}: "
                     f"{'ok' if ok else 'WRONG'}")
    return lines, good


def self_check(backend: str, device: str) -> tuple[str, bool]:
    """engine.selfcheck on ``device`` (or with the CPU standing in for a GPU), recomputed: the runs' cached verdict
    is neither read nor written."""
    try:
        started = engine.start(ModelSpec.of(Options(backend=backend, device=device, device_check="off")))
        diff = selfcheck.difference(started, started.cpu_twin())
    except SynthSegError as exc:
        return f"  {backend} {device}: self-check not run ({exc})", False
    ok = diff <= selfcheck.TOLERANCE
    return (f"  {backend} on {started.runtime.device}: self-check against the CPU (streamed U-Net, blur, flip "
            f"average on a {'x'.join(map(str, selfcheck.GRID))} grid): max |diff| {diff:.2g}, limit "
            f"{selfcheck.TOLERANCE:g}: {'ok' if ok else 'FAILED'}"), ok


def main(argv: list[str] | None = None) -> int:
    """Print each installed backend's report, op probes and self-checks as [INFO] lines; exit 1 on a failure or when
    neither framework is installed."""
    p = argparse.ArgumentParser(prog="synthseg-native-doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="run the GPU self-check on this device only (cpu: the CPU standing in for a "
                   "GPU); default: every GPU found")
    args = p.parse_args(argv)
    found, healthy = 0, True
    if importlib.util.find_spec("tensorflow") is not None:
        from ..engine.backends.tf import devices as tf_devices

        tf_devices.prepare_tensorflow()  # before TensorFlow's import: start-up noise off, the engine's kernels
        lines = tf_devices.report().splitlines()
        names = tf_devices.available()
        for name in names:
            more, good = probe(name, tf_devices.run_ops)
            lines += more
            healthy &= good
        gpus = [args.device] if args.device else (["auto"] if any("GPU" in n for n in names) else [])
        for device in gpus:
            line, good = self_check("tf", device)
            lines.append(line)
            healthy &= good
        for line in lines:
            logger.info(line)
        found += 1
    else:
        logger.info("TensorFlow: not installed (the tf backend is unavailable; --backend torch runs without it)")
    if importlib.util.find_spec("torch") is not None:
        from ..engine.backends.torch import devices as torch_devices

        lines = torch_devices.report().splitlines()
        for device in torch_devices.available():
            more, good = probe(device, torch_devices.run_ops)
            lines += more
            healthy &= good
        gpus = [args.device] if args.device else [d for d in torch_devices.available() if d != "cpu"]
        for device in gpus:
            line, good = self_check("torch", device)
            lines.append(line)
            healthy &= good
        for line in lines:
            logger.info(line)
        found += 1
    else:
        logger.info("PyTorch: not installed (--backend torch needs it: make setup BACKEND=torch, or "
                    "pip install 'synthseg-native[torch]')")
    if not found:
        logger.error("neither TensorFlow nor PyTorch is installed: pip install 'synthseg-native[tf]' or "
                     "'synthseg-native[torch]', or run make setup")
        return 1
    if not healthy:
        logger.error("a device failed an op probe or its self-check (the lines above): it would compute wrong "
                     "segmentations; use --device cpu for it")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
