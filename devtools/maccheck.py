"""``make mac-check``: one command for a Mac owner to run and send back (docs/performance.md, "Apple GPUs").

No Mac is available to this project, so the Apple-GPU paths (tensorflow-metal, PyTorch's MPS) are guarded and
tested on Linux but have never run. This check is what a Mac owner runs once:

1. ``synthseg-native-doctor`` on the GPU: every op type against float64, and the engine's self-check (GPU vs CPU);
2. the full MNI152 T1 with each installed backend, on the CPU and on the GPU (TensorFlow through tensorflow-metal,
   PyTorch on MPS), for each mode (default; ``--parc --qc``): wall time, the network stage, the process's peak
   memory, the GPU's peak (PyTorch: sampled), each run in a process of its own;
3. each GPU run against the CPU run of the same backend and mode: voxels that differ, max |diff| of the posteriors
   and of the volumes (mm3), the QC scores;

and writes ``results/<date>-<host>/mac-check/`` (summary.md, summary.json with the machine's model, macOS and the
frameworks' versions, each run's log and timings; a few hundred kB: the weights and the compared arrays stay out).
``--device cpu`` puts the CPU in the GPU's place: what the tests do on Linux.

    python -m devtools.maccheck [--device mps|cpu] [--modes default parcqc] [--crop N] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from devtools import gpucheck
from synthseg_native.engine.machine import peak_rss
from synthseg_native.engine.predictor import installed
from synthseg_native.io.atomic import write_text
from synthseg_native.log import DONE, RUN
from synthseg_native.tools.demo import mni152_t1
from synthseg_native.tools.testweights import generate

logger = logging.getLogger(f"synthseg_native.{__spec__.name if __spec__ else __name__}")  # the [TAG] lines
ROOT = Path(__file__).resolve().parents[1]
MODES = {m: gpucheck.MODES[m] for m in ("default", "parcqc")}  # the GPU check's, two of them


def machine() -> dict[str, str]:
    """The machine as a bug report needs it: model, chip, macOS (or the OS), Python and the frameworks."""
    facts = {"host": socket.gethostname(), "os": platform.platform(), "python": platform.python_version(),
             "machine": platform.machine()}
    mac = platform.mac_ver()[0]
    if mac:
        facts["macos"] = mac
        for key, name in (("model", "hw.model"), ("chip", "machdep.cpu.brand_string"), ("memory", "hw.memsize")):
            try:
                facts[key] = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True).stdout.strip()
            except OSError:
                pass
    for module in ("tensorflow", "tensorflow-metal", "torch", "numpy"):
        try:
            facts[module] = version(module)
        except Exception:  # not installed
            pass
    return facts


def backends() -> list[str]:
    return [name for name, module in (("tf", "tensorflow"), ("torch", "torch")) if installed(module)]


def gpu_device(backend: str, requested: str) -> str:
    """The GPU of ``backend`` here (tf reaches Apple's GPU through tensorflow-metal with --device auto), or the
    device asked for."""
    if requested != "auto":
        return requested
    return "mps" if backend == "torch" else "auto"


def one(args: argparse.Namespace) -> int:
    """One run in this process: segment, keep what is compared, and the timings and peaks."""
    from synthseg_native import Segmenter

    out = Path(args.out)
    options = {"backend": args.backend, "device": args.device, "models": args.models, "threads": args.threads,
               "device_check": "off" if args.device == "cpu" else "error", **MODES[args.mode]}
    if args.crop:
        options["crop"] = args.crop
    t0 = time.perf_counter()
    peak_device = None
    with Segmenter(**options) as seg:
        kind = seg.runtime.device_kind
        if args.backend == "torch":
            from synthseg_native.engine.backends.torch import devices

            devices.reset_peak_memory(kind)
        result = seg.segment_image(args.image, posteriors=True)
        if args.backend == "torch":
            peak_device = devices.peak_memory(kind)
        device = seg.runtime.device
    wall = time.perf_counter() - t0
    rss = int(peak_rss())
    np.savez_compressed(out / "result.npz", labels=np.asanyarray(result.labels.dataobj).astype(np.int16),
                        posteriors=np.asanyarray(result.posteriors.dataobj).astype(np.float32),
                        volumes=np.array(list(result.volumes.values())),
                        qc=np.array(list((result.qc or {}).values())))
    facts = {"device": device, "wall_s": wall, "stages": result.timings, "peak_rss_bytes": rss,
             "peak_device_bytes": peak_device}
    write_text(out / "run.json", json.dumps(facts, indent=1) + "\n")
    return 0


def launch(args: argparse.Namespace, backend: str, device: str, mode: str, models: str, where: Path) -> dict:
    """One run in a process of its own (its peak memory is then its own); its facts, or why it failed."""
    where.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "devtools.maccheck", "one", "--backend", backend, "--device", device, "--mode", mode,
           "--image", str(args.image), "--models", models, "--out", str(where)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--crop", str(args.crop)] if args.crop else []
    logger.log(RUN, f"{backend} on {device}, {mode}")
    with open(where / "log.txt", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        tail = (where / "log.txt").read_text().strip().splitlines()[-3:]
        return {"ok": False, "error": f"exit {rc}: " + " / ".join(tail)}
    return {"ok": True, **json.loads((where / "run.json").read_text())}


def agreement(gpu: Path, cpu: Path) -> dict[str, float]:
    """The GPU check's figures (devtools.gpucheck.agreement) over two runs' saved arrays (QC only when scored)."""
    a, b = ({k: v for k, v in np.load(d / "result.npz").items() if k != "qc" or v.size} for d in (gpu, cpu))
    return gpucheck.agreement(a, b)


def summary_markdown(facts: dict, rows: list[dict], doctor_rc: int) -> str:
    lines = ["# Mac check", "", f"- date: {facts['date']}"] + [f"- {k}: {v}" for k, v in facts["machine"].items()]
    lines += [f"- doctor (op probes and GPU self-check): {'passed' if doctor_rc == 0 else 'FAILED (doctor.txt)'}",
              "", "Each GPU run is compared with the CPU run (the reference) of the same backend and mode.", "",
              "| backend | run | device | mode | wall s | network s | peak RSS GB | GPU peak GB | voxels differ | "
              "max post diff | max vol diff mm3 | max QC diff |", "|---|---|---|---|" + "---:|" * 8]
    for r in rows:
        role = "reference" if r["role"] == "cpu" else "GPU"
        if not r["ok"]:
            lines.append(f"| {r['backend']} | {role} | {r['target']} | {r['mode']} | failed: {r['error']} ||||||||")
            continue
        agree = r.get("agreement") or {}
        gpu_peak = "" if r.get("peak_device_bytes") is None else f"{r['peak_device_bytes'] / 1e9:.2f}"
        lines.append(f"| {r['backend']} | {role} | {r['device']} | {r['mode']} | {r['wall_s']:.1f} | "
                     f"{r['stages'].get('network', 0):.1f} | {r['peak_rss_bytes'] / 1e9:.2f} | {gpu_peak} | "
                     f"{agree.get('voxels_differ', '')} | {agree.get('max_abs_posterior_diff', '')} | "
                     f"{agree.get('max_abs_volume_diff_mm3', '')} | {agree.get('max_abs_qc_diff', '')} |")
    return "\n".join(lines) + "\n"


def check(args: argparse.Namespace) -> int:
    date = dt.date.today().isoformat()
    out = Path(args.out or ROOT / "results" / f"{date}-{socket.gethostname().split('.')[0]}" / "mac-check")
    out.mkdir(parents=True, exist_ok=True)
    args.image = Path(args.image) if args.image else ROOT / "build" / "mac-check" / "mni152_t1.nii.gz"
    if not args.image.is_file() and not mni152_t1(args.image):
        return 1
    models = args.models or os.environ.get("SYNTHSEG_MODELS")
    test_weights = not models
    if test_weights:  # kept out of the folder to send back (the five files are ~250 MB)
        models = str(ROOT / "build" / "mac-check-weights")
        generate(models, only=gpucheck.keys_for(args.modes))
    logger.log(RUN, "synthseg-native-doctor (op probes and the GPU self-check)")
    doctor = subprocess.run([sys.executable, "-m", "synthseg_native.tools.doctor"]
                            + (["--device", args.device] if args.device != "auto" else []),
                            capture_output=True, text=True, cwd=ROOT)
    write_text(out / "doctor.txt", doctor.stdout + doctor.stderr)
    rows = []
    for backend in backends():
        target = gpu_device(backend, args.device)
        for mode in args.modes:
            cpu = launch(args, backend, "cpu", mode, models, out / f"{backend}-cpu-{mode}")
            rows.append({"backend": backend, "role": "cpu", "target": "cpu", "mode": mode, **cpu})
            gpu = launch(args, backend, target, mode, models, out / f"{backend}-gpu-{mode}")
            if gpu["ok"] and cpu["ok"]:
                gpu["agreement"] = agreement(out / f"{backend}-gpu-{mode}", out / f"{backend}-cpu-{mode}")
            rows.append({"backend": backend, "role": "gpu", "target": target, "mode": mode, **gpu})
            for side in ("cpu", "gpu"):  # compared: the arrays need not travel back, the numbers do
                (out / f"{backend}-{side}-{mode}" / "result.npz").unlink(missing_ok=True)
    facts = {"date": date, "machine": machine(), "image": str(args.image), "crop": args.crop,
             "test_weights": test_weights, "doctor_exit": doctor.returncode, "runs": rows}
    write_text(out / "summary.json", json.dumps(facts, indent=1) + "\n")
    write_text(out / "summary.md", summary_markdown(facts, rows, doctor.returncode))
    failed = [r for r in rows if not r["ok"]]
    logger.log(DONE, f"mac check in {out}/ (summary.md): {len(rows) - len(failed)} of {len(rows)} runs, doctor "
               f"{'passed' if doctor.returncode == 0 else 'FAILED'}; please send this folder back")
    return 1 if failed or doctor.returncode else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m devtools.maccheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="the GPU to check: auto (tensorflow-metal for tf, mps for "
                   "torch), mps, or cpu (the CPU standing in for a GPU, as in the tests on Linux)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--image", help="default: nilearn's MNI152 T1 (written to build/mac-check/)")
    p.add_argument("--models", help="official weights (default: $SYNTHSEG_MODELS, else the seeded test weights "
                   "in build/mac-check-weights)")
    p.add_argument("--crop", type=int, help="a centred patch (tests); default: the whole image")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="default: results/<date>-<host>/mac-check")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["one"]:
        p = argparse.ArgumentParser(prog="python -m devtools.maccheck one")
        for flag in ("--backend", "--device", "--mode", "--image", "--models", "--out"):
            p.add_argument(flag, required=True)
        p.add_argument("--threads", type=int)
        p.add_argument("--crop", type=int)
        return one(p.parse_args(argv[1:]))
    return check(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
