"""``make profile-layers``: where the TF network stage's time goes, piece by piece, against bare convolutions.

``--profile`` says how long the network stage took and its GFLOP/s; ``make roofline`` how fast this machine runs
bare Conv3D layers. Neither says which step of the staged U-Net loses the difference. This tool segments one image
with the native TF engine (after a warm-up run that traces every graph), times every compiled piece of
:class:`~synthseg_native.engine.backends.tf.network.StagedUNet` (each slab conv with its context rows, BN + pooling,
the whole-volume core), then times a bare Conv3D (bias and ELU fused) of each convolution's own shape, on the whole
grid of its level, with the same TensorFlow build and threads. Per conv piece: seconds, GFLOP, GFLOP/s and the
share of the bare conv's speed it reaches; the rest of the network stage (posterior blur and flip average, slab
copies and assembly) is one row, the blur's cost per pass measured apart. The last line is the FLOP-weighted
figure the performance target is about: the time the network's convolutions would take at the bare-conv speed of
their shapes, over the network stage's real time. With ``--precision bf16`` the network runs in bf16 and so do the
bare convs it is compared with (a bf16 network held to fp32 convs would look better than it is).

The timed run computes the same values as an untimed one (the pieces are only wrapped by a timer).

Usage: synthseg-native-layerprofile [--i scan.nii.gz] [--models DIR] [--threads N] [--parc] [--fast]
           [--precision fp32|bf16|fp16] [--repeats R] [--out profile.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from devtools.roofline import conv_time
from synthseg_native.api import Segmenter
from synthseg_native.engine import architecture as arch
from synthseg_native.engine.backends.tf.devices import PRECISIONS, prepare_tensorflow
from synthseg_native.engine.machine import cpu_flags, cpu_model
from synthseg_native.engine.preprocess import preprocess
from synthseg_native.errors import SynthSegError, UsageError
from synthseg_native.io.atomic import write_text
from synthseg_native.io.images import load_image
from synthseg_native.log import DONE, RUN
from synthseg_native.tools.demo import mni152_t1

logger = logging.getLogger(f"synthseg_native.{__spec__.name if __spec__ else __name__}")  # the [TAG] lines
# the precision the network ran in (the runtime's, after any fallback) -> the dtype of the bare convs it is held to:
# the compute dtype of the Keras policy the TF backend builds that precision under ("mixed_bfloat16" -> "bfloat16")
BARE_DTYPES = {precision: policy.removeprefix("mixed_") for precision, policy in PRECISIONS.items()}


@dataclass
class Row:
    """One line of the profile: a compiled piece (or the rest of the stage), and what a bare conv would take."""

    piece: str
    calls: int
    seconds: float
    gflop: float = 0.0
    bare_seconds: float | None = None   # its convolutions at the bare-conv speed of their shapes
    shapes: list[str] = field(default_factory=list)

    @property
    def gflops(self) -> float | None:
        return self.gflop / self.seconds if self.gflop and self.seconds else None

    @property
    def efficiency(self) -> float | None:
        return self.bare_seconds / self.seconds if self.bare_seconds and self.seconds else None


class BareConvs:
    """Bare Conv3D timings by shape, each measured once (``roofline.conv_time``)."""

    def __init__(self, repeats: int, dtype: str = "float32"):
        self.repeats = repeats
        self.dtype = dtype  # the network's compute type: bf16 pieces are held to bf16 convs
        self.rates: dict[tuple, float] = {}

    def rate(self, grid: tuple[int, ...], c_in: int, c_out: int, kernel: int) -> float:
        """GFLOP/s of a bare conv of this shape (measured on first use)."""
        key = (tuple(grid), c_in, c_out, kernel)
        if key not in self.rates:
            gflop, sec = conv_time(tuple(grid), c_in, c_out, self.dtype, self.repeats, kernel)
            self.rates[key] = gflop / sec
            logger.info(f"bare {self.dtype} conv {kernel}^3 {c_in}->{c_out} on {'x'.join(map(str, grid))}: "
                        f"{self.rates[key]:.1f} GFLOP/s")
        return self.rates[key]


def shape_text(grid: tuple[int, ...], c_in: int, c_out: int, kernel: int) -> str:
    return f"{kernel}^3 {c_in}->{c_out} @ {'x'.join(map(str, grid))}"


def piece_rows(staged, net: arch.UNet, grid: tuple[int, int, int], bare: BareConvs | None) -> list[Row]:
    """A row per piece of one StagedUNet (the U-Net ``net`` describes), in the order the pieces run."""
    rows = []
    for piece in staged.pieces:
        level_grid = tuple(g // 2 ** piece.level for g in grid)
        row = Row(piece.label, piece.calls, piece.seconds)
        if piece is staged.run_core:  # one graph: its convs are those of the levels it runs (the architecture's)
            convs = [(c, tuple(g // 2 ** c.level for g in grid)) for c in net.layers()
                     if isinstance(c, arch.Conv) and c.level >= staged.fine]
            flops = [math.prod(g) * c.flop_per_voxel() for c, g in convs]
            row.gflop = piece.calls * sum(flops) / 1e9
            if bare is not None:
                row.bare_seconds = piece.calls * sum(
                    f / 1e9 / bare.rate(g, c.c_in, c.c_out, c.kernel) for (c, g), f in zip(convs, flops))
            row.shapes = sorted({shape_text(g, c.c_in, c.c_out, c.kernel) for c, g in convs})
        elif piece.convs:
            row.gflop = piece.flop / 1e9
            shapes = [((conv.kernel.shape[-2], conv.filters, conv.kernel.shape[0]), flop)
                      for conv, flop in piece.conv_flops()]
            if bare is not None:
                row.bare_seconds = sum(flop / 1e9 / bare.rate(level_grid, *shape) for shape, flop in shapes)
            row.shapes = [shape_text(level_grid, *shape) for shape, _ in shapes]
        rows.append(row)
    return rows


def blur_seconds(blur, grid: tuple[int, int, int], channels: int) -> float:
    """One pass of the posterior blur on a posterior volume of ``grid`` (median of 3 after a warm-up)."""
    post = np.random.default_rng(0).random((1, *grid, channels), dtype=np.float32)
    times = []
    for _ in range(4):
        work = post.copy()
        t0 = time.perf_counter()
        blur(work)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def table(rows: list[Row]) -> list[str]:
    """The rows as a markdown table."""
    lines = ["| piece | calls | s | GFLOP | GFLOP/s | bare conv s | of bare speed | shapes |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        gflops = "" if r.gflops is None else f"{r.gflops:.1f}"
        bare = "" if r.bare_seconds is None else f"{r.bare_seconds:.2f}"
        eff = "" if r.efficiency is None else f"{100 * r.efficiency:.0f} %"
        gflop = f"{r.gflop:.1f}" if r.gflop else ""
        lines.append(f"| {r.piece} | {r.calls} | {r.seconds:.2f} | {gflop} | {gflops} | {bare} | {eff} | "
                     f"{'; '.join(r.shapes)} |")
    return lines


def profile(args: argparse.Namespace) -> dict:
    from synthseg_native.engine.backends.tf.network import StagedUNet

    options = {"models": args.models, "threads": args.threads, "parc": args.parc, "fast": args.fast,
               "backend": "tf", "crop": args.crop, "precision": args.precision}
    with Segmenter(**{k: v for k, v in options.items() if v is not None}) as seg:
        predictor = seg.predictor
        staged = [(built, predictor.architectures[key]) for key, built in ((seg.spec.model, predictor.seg),
                                                                          ("parc", predictor.parc))
                  if isinstance(built, StagedUNet)]
        if not staged:
            raise UsageError("this model runs as one graph (--robust): there are no staged pieces to profile")
        grid = tuple(preprocess(load_image(args.i), args.i, crop=seg.options.crop, ct=seg.options.ct,
                                min_pad=seg.options.crop).image.shape[1:4])
        for _ in range(args.warmup):
            logger.log(RUN, f"warm-up run on {args.i} (traces every graph)")
            seg.segment_image(args.i)
        for net, _ in staged:
            for piece in net.pieces:
                piece.timing, piece.calls, piece.seconds, piece.voxels = True, 0, 0.0, 0
        logger.log(RUN, f"timed run on {args.i}, network grid {'x'.join(map(str, grid))}")
        try:
            result = seg.segment_image(args.i)
        finally:
            for net, _ in staged:
                for piece in net.pieces:
                    piece.timing = False
        bare = None if args.no_bare else BareConvs(args.repeats, BARE_DTYPES[seg.runtime.precision])
        rows = [row for net, described in staged for row in piece_rows(net, described, grid, bare)]
        network = result.timings["network"]
        rest = Row("rest of the network stage: posterior blur + flip average, slab copies, assembly", 1,
                   max(0.0, network - sum(r.seconds for r in rows)))
        blur = predictor.backend.blurrer if seg.spec.flip else None
        blur_pass = None if blur is None else blur_seconds(blur, grid, len(seg.labels.labels))
        threads, precision = seg.runtime.threads, seg.runtime.precision
    conv_rows = [r for r in rows if r.gflop]
    gflop = sum(r.gflop for r in conv_rows)
    bare_total = None if args.no_bare else sum(r.bare_seconds or 0.0 for r in conv_rows)
    return {
        "input": args.i, "grid": list(grid), "threads": threads, "precision": precision,
        "cpu": {"model": cpu_model(), "machine": platform.machine(),
                "flags": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "fma")))},
        "stages": result.timings, "rows": [asdict(r) | {"gflops": r.gflops, "efficiency": r.efficiency}
                                           for r in rows + [rest]],
        "blur_pass_seconds": blur_pass,
        "network_seconds": network, "conv_gflop": gflop, "conv_seconds": sum(r.seconds for r in conv_rows),
        "bare_conv_seconds": bare_total,
        "network_vs_bare": None if not bare_total else bare_total / network,
        "table": table(rows + [rest]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Per-piece time of the TF network stage against bare convolutions.")
    p.add_argument("--i", help="The image to segment (default: nilearn's MNI152 T1, 1 mm, saved in build/).")
    p.add_argument("--models", help="Folder of the weight files (as the command line's --models).")
    p.add_argument("--threads", type=int, help="TensorFlow threads (default: all cores).")
    p.add_argument("--parc", action="store_true", help="Profile the parcellation network too.")
    p.add_argument("--fast", action="store_true", help="No flipped second pass (as --fast).")
    p.add_argument("--crop", type=int, nargs="+", help="As the command line's --crop (a smaller grid).")
    p.add_argument("--precision", choices=sorted(BARE_DTYPES), default="fp32",
                   help="As the command line's --precision (a precision the machine lacks falls back to fp32); "
                   "bare convs run in the type the network ran in (default fp32).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed runs first (default 1: tracing is not speed).")
    p.add_argument("--repeats", type=int, default=2, help="Timed repeats of each bare conv (median).")
    p.add_argument("--no-bare", action="store_true", help="Skip the bare-conv comparison (only the pieces).")
    p.add_argument("--out", help="Write the profile as JSON here.")
    args = p.parse_args(argv)
    if args.i is None:
        args.i = str(Path("build") / "mni152_t1.nii.gz")
        if not mni152_t1(Path(args.i)):  # it said why
            return 2
    if not Path(args.i).is_file():
        logger.error(f"{args.i}: no such image")
        return 2
    prepare_tensorflow()  # TensorFlow's settings (oneDNN, quiet C++ logs) before anything imports it
    try:
        report = profile(args)
    except UsageError as exc:
        logger.error(str(exc))
        return 2
    except SynthSegError as exc:
        logger.error(str(exc))
        return 1
    print(f"network stage of {report['input']} (grid {'x'.join(map(str, report['grid']))}), "
          f"{report['threads']} thread(s), {report['precision']}, {report['cpu']['model']}")
    print("\n".join(report["table"]))
    if report["blur_pass_seconds"] is not None:
        print(f"posterior blur: {report['blur_pass_seconds']:.2f} s per pass (measured apart; part of the rest)")
    done = (f"network stage {report['network_seconds']:.2f} s, convolution pieces {report['conv_seconds']:.2f} s "
            f"for {report['conv_gflop']:.0f} GFLOP")
    if report["network_vs_bare"] is not None:
        done += (f"; at bare-conv speed they would take {report['bare_conv_seconds']:.2f} s: the network stage "
                 f"runs at {100 * report['network_vs_bare']:.0f} % of the per-shape roofline (FLOP-weighted)")
    logger.log(DONE, done)
    if args.out:
        write_text(args.out, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
