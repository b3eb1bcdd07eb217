"""Command line with upstream ``SynthSeg_predict.py``'s flags (plus --models, --bn, --engine, ...).

It only turns arguments into an :class:`Options` object and a plan of files (upstream's rules, or
BIDS-Derivatives names for a BIDS dataset, cut to one shard with --shard), sets up TensorFlow's
devices and threads before TensorFlow starts, and hands over to the runner or to the upstream
reference engine.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType
from typing import NoReturn

from .bids import DEFAULT_SUFFIXES, plan_bids
from .bids import is_dataset as is_bids
from .outputs import Plan, UsageError, plan_outputs
from .runner import Interrupted, Options, log

N_LEVELS = 5  # the U-Net halves the grid 5 times: --crop sizes are rounded up to multiples of 2**5


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one [ERR] line and exit 2 like every other usage error."""

    def error(self, message: str) -> NoReturn:
        log("ERR", f"{message} (--help lists the flags)")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="synthseg-native",
        description="SynthSeg brain MRI segmentation, native tf.keras engine (same flags as SynthSeg_predict.py).")
    p.add_argument("--i", help="Image to segment (.nii/.nii.gz/.mgz), a folder of images, a .txt list, or a BIDS "
                   "dataset (a folder with dataset_description.json).")
    p.add_argument("--o", help="Segmentation output: file or folder (folder if --i is a folder; .txt if a list; "
                   "the derivative dataset's folder for BIDS).")
    p.add_argument("--parc", action="store_true", help="Cortical parcellation (DK atlas).")
    p.add_argument("--robust", action="store_true", help="SynthSeg-robust (implies --fast; not with --v1).")
    p.add_argument("--fast", action="store_true", help="Skip the flipped prediction and topology cleaning.")
    p.add_argument("--ct", action="store_true", help="Clip intensities to [0, 80] for CT scans.")
    p.add_argument("--vol", help="CSV file with volumes (mm3) of all structures.")
    p.add_argument("--qc", help="CSV file with automated QC scores.")
    p.add_argument("--post", help="Posteriors output(s), same kind as --o.")
    p.add_argument("--resample", help="Resampled input image(s) at 1 mm, same kind as --o.")
    p.add_argument("--crop", nargs="+", type=int, help="Analyse a centred patch of this size (1 or 3 values).")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for TensorFlow (default: all cores; upstream defaults to 1).")
    p.add_argument("--cpu", action="store_true", help="Run on the CPU even if a GPU is available.")
    p.add_argument("--v1", action="store_true", help="Use SynthSeg 1.0 instead of 2.0.")
    p.add_argument("--keepgeom", action="store_true",
                   help="FreeSurfer 8: write outputs on the input's voxel grid (labels nearest, posteriors linear); "
                   "volumes still come from the 1 mm posteriors.")
    p.add_argument("--addctab", action="store_true",
                   help="FreeSurfer 8: FreeSurfer colours and names for the labels (embedded in .mgz, sidecar "
                   "<name>_ctab.txt for NIfTI).")
    p.add_argument("--models", help="Folder with the weight files (searched first).")
    p.add_argument("--bn", choices=["auto", "fused", "unfused"], default="auto",
                   help="BatchNorm form: fused (exact, CPU/CUDA), unfused (Metal); auto picks per device.")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="Network arithmetic: fp32 (default, identical to upstream); bf16 (CPUs with AVX512-BF16/AMX, "
                   "CUDA >= 8.0) or fp16 (CUDA) are faster but NOT identical (docs/precision.md). Falls back to fp32 "
                   "with a warning where the hardware lacks support.")
    p.add_argument("--max-memory", metavar="SIZE", type=_size, default="auto",
                   help="Memory budget per image, e.g. 8G, 8GB, 8000M, 12.5G (decimal; 8GiB binary). An image whose "
                   "estimated need exceeds it is segmented in overlapping tiles (fewest that fit; results can "
                   "differ from upstream near tile seams, docs/performance.md); refused only if even the smallest "
                   "tiles do not fit. Default auto: the memory available to the process (cgroup limits included).")
    p.add_argument("--engine", choices=["native", "upstream"], default="native",
                   help="native (default) or upstream: run $SYNTHSEG_HOME's SynthSeg for comparison.")
    p.add_argument("--synthseg-home", help="Upstream SynthSeg checkout for --engine upstream "
                   "(default: $SYNTHSEG_HOME).")
    batch = p.add_argument_group("batches and cohorts (docs/cohorts.md)")
    batch.add_argument("--resume", action="store_true",
                       help="Record each finished scan (<seg>.provenance.json) and skip scans whose record "
                       "proves their outputs current; a batch with nothing to do loads no model.")
    batch.add_argument("--shard", metavar="i/N",
                       help="Segment only part i of N (1 <= i <= N) of the sorted scan list; N workers with the "
                       "same arguments split it exactly. Shared CSVs become <name>.shard-i-of-N.csv "
                       "(python -m synthseg_native.cohort finish merges them).")
    batch.add_argument("--snapshot", metavar="DIR",
                       help="QC snapshot per scan (DIR/<name>.png: three slices, labels in FreeSurfer colours) "
                       "and a cohort page DIR/index.html (thumbnail, key volumes, QC scores, run time).")
    batch.add_argument("--bids-suffix", nargs="+", default=list(DEFAULT_SUFFIXES), metavar="SUFFIX",
                       help="With a BIDS dataset as --i: the anat suffixes to segment (default: T1w).")
    p.add_argument("--profile", action="store_true", help="Print the time spent in each stage.")
    p.add_argument("--debug", action="store_true", help="Show Python tracebacks and TensorFlow logs.")
    return p


def _size(text: str) -> str:
    """argparse type of --max-memory: checked here (a usage error), kept as text (provenance records it)."""
    from .memory import SizeError, parse_size

    try:
        parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _check(args: argparse.Namespace) -> None:
    if args.robust and args.v1:
        raise UsageError("--robust cannot be used with --v1 (SynthSeg-robust only exists for 2.0)")
    if args.crop is not None:
        if len(args.crop) not in (1, 3):
            raise UsageError(f"--crop takes 1 or 3 sizes, got {len(args.crop)}")
        if any(c <= 0 for c in args.crop):
            raise UsageError(f"--crop sizes must be positive, got {args.crop}")
    if args.engine == "upstream" and (args.keepgeom or args.addctab):
        raise UsageError("--keepgeom and --addctab are FreeSurfer 8 options; upstream SynthSeg has neither")
    if args.engine == "upstream" and args.precision != "fp32":
        raise UsageError("--precision is a native-engine option; upstream SynthSeg runs in fp32 only")
    if args.engine == "upstream" and args.max_memory != "auto":
        raise UsageError("--max-memory is a native-engine option; upstream SynthSeg has no tiling")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.engine == "upstream" and (args.resume or args.shard or args.snapshot or is_bids(args.i)):
        raise UsageError("--resume, --shard, --snapshot and BIDS datasets need the native engine")
    if args.shard:
        from .cohort import parse_shard

        parse_shard(args.shard)


def make_plan(args: argparse.Namespace, shard: bool = True) -> Plan:
    """Which files the run reads and writes: BIDS naming for a BIDS dataset, else upstream's rules;
    then the part of it that ``--shard`` selects."""
    from .cohort import parse_shard, shard_plan

    if is_bids(args.i):
        plan = plan_bids(args.i, args.o, args.post, args.resample, args.vol, args.qc, tuple(args.bids_suffix))
    else:
        plan = plan_outputs(args.i, args.o, args.post, args.resample, args.vol, args.qc)
    if shard and args.shard:
        plan = shard_plan(plan, *parse_shard(args.shard))
    return plan


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all images done, 1 some failed, 2 usage error, 128+N stopped by signal N (130: Ctrl-C).

    SIGTERM (batch schedulers, ``kill``) and SIGHUP (a closed terminal) are turned into exceptions for the
    duration of the call, so they clean up temporaries and locks like Ctrl-C does.
    """
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _raise_interrupted)
        except (ValueError, OSError):  # not the main thread (an embedding application): leave signals alone
            pass
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:  # before or after the batch loop, which reports its own interrupts
        signum = getattr(exc, "signum", signal.SIGINT)
        log("ERR", f"interrupted ({signal.Signals(signum).name}); no output of the image in progress was written")
        return 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help()
        return 1
    args = parser.parse_args(argv)
    if args.robust:
        args.fast = True
    try:
        _check(args)
        plan = make_plan(args)
    except UsageError as exc:
        log("ERR", str(exc))
        return 2
    if args.crop is not None and any(c % 2 ** N_LEVELS for c in args.crop):
        rounded = [-(-c // 2 ** N_LEVELS) * 2 ** N_LEVELS for c in args.crop]
        log("INFO", f"--crop {' '.join(map(str, args.crop))} is rounded up to {' '.join(map(str, rounded))} "
                    f"(the network needs multiples of {2 ** N_LEVELS}), as upstream does")
    from .devices import prepare_tensorflow
    from .memory import parse_size

    prepare_tensorflow(debug=args.debug)
    crop = None if args.crop is None else (args.crop * 3 if len(args.crop) == 1 else args.crop)
    opts = Options(i=args.i, o=args.o, parc=args.parc, robust=args.robust, fast=args.fast, ct=args.ct,
                   vol=args.vol, qc=args.qc, post=args.post, resample=args.resample, crop=crop,
                   threads=args.threads, cpu=args.cpu, v1=args.v1, keepgeom=args.keepgeom, addctab=args.addctab,
                   models=args.models, bn=args.bn, precision=args.precision,
                   max_memory=parse_size(args.max_memory),
                   profile=args.profile, debug=args.debug, resume=args.resume,
                   snapshot=os.path.abspath(args.snapshot) if args.snapshot else None)
    if args.engine == "upstream":
        return _run_upstream(opts, args.synthseg_home)
    return _run_native(opts, plan)


def _run_native(opts: Options, plan: Plan) -> int:
    from . import devices
    from .runner import run

    version = "SynthSeg-robust 2.0" if opts.robust else ("SynthSeg 1.0" if opts.v1 else "SynthSeg 2.0")
    if opts.fast and not opts.robust:
        version += " (fast)"
    if opts.cpu:
        devices.hide_gpus()
    threads = devices.configure_threads(opts.threads)
    if opts.precision != "fp32":
        why = devices.precision_unsupported(opts.precision)
        if why:
            log("WARN", f"--precision {opts.precision}: {why}; running in fp32 (identical to upstream)")
            opts.precision = "fp32"
        else:
            version += f", {opts.precision} (not identical to upstream)"
    log("INFO", f"{version}, native engine, {len(plan.images)} image(s), {threads} thread(s), "
                f"device {devices.network_device()}")
    if plan.bids_root is not None:
        from .bids import write_dataset_files

        try:
            write_dataset_files(plan, opts.o, opts.v1, opts.parc, f"{version}, native tf.keras engine")
        except OSError as exc:
            log("ERR", f"{opts.o}: cannot write the derivative dataset's files ({exc})")
            return 1
    return run(opts, plan)


def _run_upstream(opts: Options, synthseg_home: str | None) -> int:
    from .upstream import UpstreamError, UpstreamRequest, find_synthseg_home, run_upstream
    from .weights import MODEL_FILES, WeightsError, find_weights

    try:
        home = find_synthseg_home(synthseg_home)
        key = "robust" if opts.robust else ("seg1" if opts.v1 else "seg2")
        models_dir = str(find_weights(MODEL_FILES[key], opts.models).parent)
        flags = opts.upstream_flags() | {"threads": opts.threads or os.cpu_count() or 1}
        req = UpstreamRequest(**flags, synthseg_home=str(home), models_dir=models_dir,
                              bn="unfused" if opts.bn == "unfused" else "fused")
        return run_upstream(req)
    except (UpstreamError, WeightsError) as exc:
        log("ERR", str(exc))
        return 1
