"""``scripts/gpu_check.sh``: the PyTorch backend on a lent GPU, prepared here so it fits one short loan.

Two steps, on two machines:

* ``reference`` (here, on the CPU): the torch backend in fp32 on the input (the full MNI152 by default) for each
  mode; keeps the labels, the volumes, the QC scores and a strided sample of the posteriors (every 5th voxel along
  each axis) in ``ref-<mode>.npz``, small enough to carry.
* ``run`` (on the GPU machine: Python, PyTorch, numpy, h5py, scipy, no internet, no TensorFlow): per mode and
  precision, the networks loaded once, one scan timed alone (the first, with the device's warm-up), then
  ``--scans`` scans in a row (segment and write, as a batch does), the GPU's peak memory, where the time went,
  and the agreement with the CPU reference. One ``summary.json`` and ``summary.md`` in ``--out``.

Weights: ``--models`` when given (official weights, present on both machines), else seeded test weights, which
both steps rebuild from the recipes in the package (``tools.testweights``: numpy and h5py, bit for bit the same
files on both machines). Results are then comparable, but anatomically meaningless.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from synthseg_native.api import Segmenter, save
from synthseg_native.config.sizes import format_size
from synthseg_native.io.atomic import write_text
from synthseg_native.log import DONE, RUN
from synthseg_native.tools.testweights import generate

logger = logging.getLogger(f"synthseg_native.{__spec__.name if __spec__ else __name__}")  # the [TAG] lines

MODES = {"default": {}, "fast": {"fast": True}, "robust": {"robust": True}, "parcqc": {"parc": True, "qc": True}}
STRIDE = 5  # posterior sample: every 5th voxel along each axis (1/125 of them)


def keys_for(modes: list[str]) -> list[str]:
    """The networks (keys of ``MODEL_FILES``) that ``modes`` run."""
    return sorted({k for m in modes for k in {"robust": ["robust"], "parcqc": ["seg2", "parc", "qc"]}.get(m, ["seg2"])})


def test_weights(models: str | None, work: Path, modes: list[str]) -> str:
    """``models``, or the seeded test weights the modes need, rebuilt into ``work`` from the package's recipes (the
    same files on both machines; the GPU machine has no TensorFlow and the files are too big to carry)."""
    if models:
        return models
    generate(work, only=keys_for(modes))
    return str(work)


def sample(post: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(post[::STRIDE, ::STRIDE, ::STRIDE]).astype(np.float32)


def outputs(result) -> dict[str, np.ndarray]:
    """What is compared of one result: labels, volumes, QC scores, the posterior sample."""
    found = {"labels": np.asanyarray(result.labels.dataobj).astype(np.int16),
             "volumes": np.array(list(result.volumes.values()), dtype=np.float64),
             "posteriors": sample(np.asanyarray(result.posteriors.dataobj))}
    if result.qc:
        found["qc"] = np.array(list(result.qc.values()), dtype=np.float64)
    return found


def reference(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = Path(args.image)
    if args.copy_image and (out / image.name).resolve() != image.resolve():
        shutil.copy(image, out / image.name)
    work = Path(tempfile.mkdtemp(prefix="gpucheck-weights-"))
    try:
        models = test_weights(args.models, work, args.modes)
        reference_runs(args, image, models, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from synthseg_native.engine.backends.torch import devices  # heavy: imports PyTorch (loaded by the runs above)

    facts = {"date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
             "torch": devices.version(), "image": image.name, "crop": args.crop, "modes": args.modes,
             "test_weights": not args.models}
    write_text(out / "reference.json", json.dumps(facts, indent=2) + "\n")
    logger.log(DONE, f"reference in {out}/ ({', '.join(f'ref-{m}.npz' for m in args.modes)})")
    return 0


def reference_runs(args: argparse.Namespace, image: Path, models: str, out: Path) -> None:
    for mode in args.modes:
        logger.log(RUN, f"CPU reference, {mode}")
        with Segmenter(backend="torch", device="cpu", models=models, threads=args.threads, crop=args.crop,
                       **MODES[mode]) as seg:
            found = outputs(seg.segment_image(str(image), posteriors=True))
        np.savez_compressed(out / f"ref-{mode}.npz", **found)


def agreement(found: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    labels = found["labels"] != ref["labels"]
    out = {"voxels_differ": int(labels.sum()), "voxels": int(labels.size),
           "max_abs_posterior_diff": float(np.abs(found["posteriors"] - ref["posteriors"]).max()),
           "max_abs_volume_diff_mm3": float(np.abs(found["volumes"] - ref["volumes"]).max())}
    if "qc" in ref and "qc" in found:
        out["max_abs_qc_diff"] = float(np.abs(found["qc"] - ref["qc"]).max())
    return out


def run(args: argparse.Namespace) -> int:
    from synthseg_native.engine.backends.torch import devices  # heavy: imports PyTorch

    ref_dir, out = Path(args.ref), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = Path(args.image) if args.image else ref_dir / json.loads((ref_dir / "reference.json").read_text())["image"]
    facts = json.loads((ref_dir / "reference.json").read_text())
    models = test_weights(args.models, Path(tempfile.mkdtemp(prefix="gpucheck-weights-")), args.modes)
    device = devices.pick(args.device)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="gpucheck-out-"))
    for mode in args.modes:
        ref = dict(np.load(ref_dir / f"ref-{mode}.npz"))
        for precision in args.precisions:
            logger.log(RUN, f"{mode}, {precision} on {device}")
            devices.reset_peak_memory(device)
            t0 = time.perf_counter()
            with Segmenter(backend="torch", device=device, precision=precision, models=models, threads=args.threads,
                           crop=facts.get("crop"), **MODES[mode]) as seg:
                load_s = time.perf_counter() - t0
                granted = seg.options.precision
                t1 = time.perf_counter()
                first = seg.segment_image(str(image), posteriors=True)
                single_s = time.perf_counter() - t1
                times, stages = [], {}
                for k in range(args.scans):
                    t2 = time.perf_counter()
                    result = seg.segment_image(str(image), posteriors=False, name=f"scan{k}")
                    save(result, scratch / f"scan{k}.nii.gz", vol=str(scratch / f"scan{k}.csv"))
                    times.append(time.perf_counter() - t2)
                    for stage, secs in result.timings.items():
                        stages[stage] = stages.get(stage, 0.0) + secs / args.scans
            peak = devices.peak_memory(device)
            row = {"mode": mode, "precision": precision, "precision_granted": granted, "load_s": load_s,
                   "single_scan_s": single_s, "batch_scan_s": times, "batch_mean_s": float(np.mean(times)),
                   "stages_mean_s": stages, "gpu_peak_bytes": peak, **agreement(outputs(first), ref)}
            rows.append(row)
            logger.info(f"{mode} {granted}: {row['batch_mean_s']:.2f} s/scan in a batch of {args.scans}, single "
                        f"{single_s:.2f} s, peak {format_size(peak) if peak else 'n/a'}, "
                        f"{row['voxels_differ']} voxels differ from the CPU")
    shutil.rmtree(scratch, ignore_errors=True)
    summary = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "device": devices.describe(device),
               "python": platform.python_version(), "torch": devices.version(), "numpy": np.__version__,
               "image": str(image), "scans": args.scans, "reference": facts, "rows": rows}
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text(out / "summary.md", markdown(summary))
    logger.log(DONE, f"summary in {out}/summary.json and summary.md")
    return 0


def markdown(summary: dict) -> str:
    lines = [f"# GPU check: {summary['device']}", "",
             f"{summary['date']}; Python {summary['python']}, PyTorch {summary['torch']}, numpy {summary['numpy']}; "
             f"input {Path(summary['image']).name}; {summary['scans']} scans per batch; reference: CPU torch fp32 "
             f"on {summary['reference'].get('machine')} ({summary['reference'].get('date')})"
             f"{', TEST WEIGHTS' if summary['reference'].get('test_weights') else ''}.", "",
             "| mode | precision | s/scan (batch) | single scan s | load s | GPU peak | network s | voxels differ | "
             "max dpost | max dvol mm3 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        peak = format_size(r["gpu_peak_bytes"]) if r["gpu_peak_bytes"] else "n/a"
        lines.append(f"| {r['mode']} | {r['precision_granted']} | {r['batch_mean_s']:.2f} | {r['single_scan_s']:.2f} | "
                     f"{r['load_s']:.1f} | {peak} | {r['stages_mean_s'].get('network', float('nan')):.2f} | "
                     f"{r['voxels_differ']} of {r['voxels']} | {r['max_abs_posterior_diff']:.2e} | "
                     f"{r['max_abs_volume_diff_mm3']:.3f} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m devtools.gpucheck", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("reference", "run"):
        s = sub.add_parser(name)
        s.add_argument("--image", required=name == "reference", help="Input image (reference: the MNI152 T1).")
        s.add_argument("--out", required=True, help="Folder for the reference files / the summary.")
        s.add_argument("--models", help="Weights folder (default: seeded test weights, generated).")
        s.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
        s.add_argument("--threads", type=int, default=None)
    ref = sub.choices["reference"]
    ref.add_argument("--crop", type=int, nargs="+", default=None, help="Smaller grids for tests.")
    ref.add_argument("--copy-image", action="store_true", help="Copy the input beside the reference (to carry).")
    go = sub.choices["run"]
    go.add_argument("--ref", required=True, help="Folder written by the reference step.")
    go.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda", "mps"])
    go.add_argument("--scans", type=int, default=5)
    go.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16", "tf32"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return reference(args) if args.step == "reference" else run(args)


if __name__ == "__main__":
    sys.exit(main())
