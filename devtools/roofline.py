"""``make roofline``: how fast this machine runs the convolutions the SynthSeg U-Net is made of.

A network's GFLOP/s means little alone; against the throughput the same TensorFlow build reaches on
bare Conv3D layers of the U-Net's own shapes it says how much of the machine the network used. Each
case is a 3×3×3 Conv3D (bias and ELU fused, as in the network) timed on a fixed input; the reported
figure is the median of the repeats. fp32 always; bf16 where the CPU has AVX512-BF16/AMX (or on a GPU);
fp16 on GPUs. A precision the build or device cannot run is reported as unsupported, not guessed.

Usage: synthseg-native-roofline [--threads N] [--repeats R] [--size S] [--out roofline.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from synthseg_native.engine.backends.tf.devices import prepare_tensorflow
from synthseg_native.engine.machine import cpu_has_bf16
from synthseg_native.io.atomic import write_text
from synthseg_native.log import DONE, SKIP

logger = logging.getLogger(f"synthseg_native.{__spec__.name if __spec__ else __name__}")  # the [TAG] lines

# (name, spatial edge at full size, C_in, C_out): the U-Net's dominant convolutions, by level.
CASES = [
    ("level0 24->24", 96, 24, 24),
    ("level0 merge 72->24", 96, 72, 24),
    ("level1 merge 144->48", 48, 144, 48),
    ("level2 96->96", 24, 96, 96),
]


@dataclass
class Result:
    case: str
    precision: str
    shape: list[int]
    gflop: float
    seconds: float
    gflops: float


CPU_FP16 = ("TensorFlow 2.15 has no oneDNN float16 Conv3D on CPU: it falls back to a reference kernel "
            "(measured 0.4 GFLOP/s on a 24^3 volume, even with AVX512-FP16)")


def unsupported_precisions(device: str) -> dict[str, str]:
    """Precisions not worth measuring on this device, with the reason (the others are measured)."""
    if device == "GPU":
        return {}
    skip = {"float16": CPU_FP16}
    if not cpu_has_bf16():
        skip["bfloat16"] = "this CPU has neither AVX512-BF16 nor AMX-BF16 (bf16 would be emulated)"
    return skip


def measure(case: tuple[str, int, int, int], dtype: str, repeats: int, scale: float) -> Result:
    name, edge, c_in, c_out = case
    edge = max(8, int(round(edge * scale)))
    gflop, sec = conv_time((edge,) * 3, c_in, c_out, dtype, repeats)
    return Result(name, dtype, [edge] * 3 + [c_in, c_out], gflop, sec, gflop / sec)


def conv_time(grid: tuple[int, ...], c_in: int, c_out: int, dtype: str = "float32", repeats: int = 3,
              kernel: int = 3) -> tuple[float, float]:
    """GFLOP and median seconds of one bare Conv3D (``kernel``³, bias and ELU fused, as in the network) on a
    ``grid`` of ``c_in`` channels: the figure a network layer of that shape is measured against."""
    import tensorflow as tf

    from synthseg_native.engine.architecture import per_voxel_flop

    layer = tf.keras.layers.Conv3D(c_out, kernel, padding="same", activation="elu", dtype=dtype)
    x = tf.random.stateless_uniform([1, *grid, c_in], seed=[1, 2], dtype="float32")
    x = tf.cast(x, dtype)
    fn = tf.function(lambda t: layer(t))
    fn(x).numpy()  # build, trace, warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x).numpy()
        times.append(time.perf_counter() - t0)
    voxels = 1
    for edge in grid:
        voxels *= edge
    return voxels * per_voxel_flop(c_in, c_out, kernel) / 1e9, statistics.median(times)


def run(threads: int | None, repeats: int, scale: float) -> dict:
    from synthseg_native.engine.backends.tf import devices  # imports TensorFlow: after prepare_tensorflow()

    n_threads = devices.configure_threads(threads)
    device = devices.network_device()
    kind = "GPU" if device.startswith("GPU") else "CPU"
    results, unsupported = [], unsupported_precisions(kind)
    for dtype in ("float32", "bfloat16", "float16"):
        if dtype in unsupported:
            continue
        for case in CASES:
            try:
                res = measure(case, dtype, repeats, scale)
            except Exception as exc:  # an op this build cannot run in this precision
                unsupported[dtype] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                break
            results.append(res)
            logger.info(f"conv3d {res.case} {dtype}: {res.gflops:.1f} GFLOP/s ({res.seconds * 1e3:.1f} ms)")
    best = {}
    for res in results:
        best[res.precision] = max(best.get(res.precision, 0.0), res.gflops)
    return {"device": device, "threads": n_threads, "repeats": repeats, "scale": scale,
            "results": [asdict(r) for r in results], "best_gflops": best, "unsupported": unsupported}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Conv3D throughput of this machine (fp32, bf16/fp16 where supported).")
    p.add_argument("--threads", type=int, default=None, help="TensorFlow threads (default: all cores).")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=float, default=1.0, help="Scale of the test volumes (tests use a small one).")
    p.add_argument("--out", help="Write the results as JSON here.")
    args = p.parse_args(argv)
    prepare_tensorflow()
    report = run(args.threads, args.repeats, args.size)
    for dtype, gflops in report["best_gflops"].items():
        logger.log(DONE, f"best conv3d {dtype}: {gflops:.1f} GFLOP/s on {report['device']}, "
                         f"{report['threads']} thread(s)")
    for dtype, why in report["unsupported"].items():
        logger.log(SKIP, f"{dtype}: {why}")
    if args.out:
        write_text(args.out, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
