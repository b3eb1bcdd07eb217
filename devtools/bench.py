"""``make bench``: native vs upstream reference vs Docker baseline, timed by hyperfine, in one command.

A hand-timed loop cannot be re-run or trusted; this runs every available engine on the same input,
flags and threads under hyperfine (each run forced into an emptied output folder), wraps each run to
record its peak RSS (hyperfine measures time only), profiles one native run stage by stage, measures
the machine's conv3d roofline with the same TensorFlow build, and writes everything into
``results/<date>-<host>/``: hyperfine's JSON and markdown, machine facts, a summary table and a chart.

The default input is the MNI152 T1 inside nilearn, so a fresh machine can run it. Without official
weights it uses seeded test weights and says so: run time does not depend on the weight values.

``--reference freesurfer`` measures this toolkit's ``mri_synthseg`` against FreeSurfer 8's own (docs/freesurfer.md).

Usage: synthseg-native-bench [--in IMG] [--runs 5] [--warmup 1] [--threads N] [--flags "..."]
           [--backends "tf torch"] [--precisions "fp32 bf16"] [--reference upstream|freesurfer]
           [--no-interleave] [--max-time-ratio R] [--max-rss-ratio R] [--min-agreement PCT]
       python -m devtools.bench rss --record FILE -- CMD...   (internal: peak RSS of one run)
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from devtools import benchgate, benchtiming
from devtools.benchreport import chart, other_profile_markdown, rounds_markdown, summarise, summary_markdown
from synthseg_native.config.options import PRECISIONS
from synthseg_native.config.parser import parse
from synthseg_native.engine import machine
from synthseg_native.engine.backends.tf.devices import prepare_tensorflow
from synthseg_native.engine.weights import MODEL_FILES, find_weights, is_test_weights
from synthseg_native.errors import UpstreamError, UsageError, WeightsError
from synthseg_native.io.atomic import image_extension, write_text
from synthseg_native.log import DONE, RUN, SKIP
from synthseg_native.reference.upstream import find_synthseg_home
from synthseg_native.tools.demo import mni152_t1
from synthseg_native.tools.testweights import generate

logger = logging.getLogger(f"synthseg_native.{__spec__.name if __spec__ else __name__}")  # the [TAG] lines


def project_root() -> Path:
    """The source tree these development tools live in (results/ and scripts/ are there)."""
    return Path(__file__).resolve().parents[1]


PROJECT = project_root()
HYPERFINE_HINT = ("install the command-line tool: 'apt-get install hyperfine', 'brew install hyperfine' or "
                  "'cargo install hyperfine' (never 'pip install hyperfine': that PyPI package is an unrelated "
                  "physics library)")
PROFILE_LINE = re.compile(r"profile (\w+): ([\d.]+) s \(peak RSS so far ([\d.]+) GB\)")
THROUGHPUT_LINE = re.compile(r"profile network throughput: ([\d.]+) GFLOP .* = ([\d.]+) GFLOP/s")
SHAPE_LINE = re.compile(r"network input (\d+x\d+x\d+)")


class BenchError(Exception):
    """The benchmark cannot run (missing tool, failing engine); the message says what to do."""


@dataclass
class Engine:
    name: str
    argv: list[str]
    env: dict[str, str]
    out: Path


# ---------------------------------------------------------------------------------------------------
# peak RSS of one run


def peak_rss_kb_of_children() -> int:
    return int(machine.peak_rss_of_children() // 1024)


def rss_main(argv: list[str]) -> int:
    """Run a command, append its peak RSS (largest process of its tree) to a JSON-lines record."""
    p = argparse.ArgumentParser(prog="bench rss")
    p.add_argument("--record", required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    rc = subprocess.call(cmd)
    with open(args.record, "a") as fh:
        fh.write(json.dumps({"peak_rss_kb": peak_rss_kb_of_children(), "rc": rc}) + "\n")
    return rc


# ---------------------------------------------------------------------------------------------------
# inputs, weights, engines


def default_results_dir() -> Path:
    host = platform.node().split(".")[0] or "host"
    return PROJECT / "results" / f"{dt.date.today().isoformat()}-{host}"


def default_input(work: Path) -> Path:
    image = work / "mni152_t1.nii.gz"
    if not mni152_t1(image):
        raise BenchError("no input: give --in IMG, or install nilearn for the default MNI152 T1")
    return image


def needed_models(flags: list[str]) -> list[str]:
    """The weight files the engine flags need, read by the engine's own parser."""
    try:
        return parse(["--i", "in.nii.gz", "--o", "out.nii.gz", *flags]).normalised().model_keys
    except UsageError as exc:
        raise BenchError(f"FLAGS: {exc}") from exc


def resolve_weights(models: str | None, flags: list[str], work: Path) -> tuple[str, bool]:
    """Folder with the weights the flags need, and whether they are generated test weights."""
    keys = needed_models(flags)
    try:
        files = [find_weights(MODEL_FILES[k], models) for k in keys]
        if len({f.parent for f in files}) == 1:
            return str(files[0].parent), any(is_test_weights(f) for f in files)
    except WeightsError:
        pass
    folder = work / "test-weights"
    missing = [k for k in keys if not (folder / MODEL_FILES[k]).is_file()]
    if missing:
        logger.log(RUN, f"no official weights found; generating seeded test weights in {folder} ({', '.join(missing)})")
        generate(folder, only=missing)
    return str(folder), True


def native_name(backend: str, precision: str) -> str:
    """``native`` is the TF backend in fp32 (the exact engine); others add ``-torch`` and/or ``-bf16`` etc."""
    return "native" + ("" if backend == "tf" else f"-{backend}") + ("" if precision == "fp32" else f"-{precision}")


FS_COMMAND = "MRI_SYNTHSEG_FS"  # env: how to run FreeSurfer's own mri_synthseg (default $FREESURFER_HOME/bin/...)


def freesurfer_command() -> tuple[list[str] | None, str]:
    """FreeSurfer 8's ``mri_synthseg`` as a command (``$MRI_SYNTHSEG_FS``, e.g. ``"/fsenv/bin/python
    /path/mri_synthseg"``, else ``$FREESURFER_HOME/bin/mri_synthseg``), or None and why it cannot run."""
    home = os.environ.get("FREESURFER_HOME")
    if not home or not (Path(home) / "models").is_dir():
        return None, "FREESURFER_HOME is not set or has no models/ folder (FreeSurfer's script reads its weights there)"
    cmd = shlex.split(os.environ.get(FS_COMMAND) or str(Path(home) / "bin" / "mri_synthseg"))
    if not cmd or shutil.which(cmd[0]) is None:
        return None, f"{cmd[0] if cmd else '?'} not found (set ${FS_COMMAND} to the command that runs FreeSurfer's " \
                     "mri_synthseg)"
    return cmd, ""


def engines(image: Path, flags: list[str], threads: int, models: str, work: Path, python: str,
            backends: tuple[str, ...] = ("tf",), precisions: tuple[str, ...] = ("fp32",),
            reference: str = "upstream") -> tuple[list[Engine], dict[str, str]]:
    """The engines that can run here, and a reason for each one that cannot: the native engine once per backend
    and precision (``native`` is the TF backend in fp32, ``native-torch`` the PyTorch one, ``native-bf16`` the TF
    backend in bf16: all timed in the one run, against the same reference), the reference, Docker.

    ``reference``: ``upstream`` (upstream SynthSeg through ``--engine upstream``) or ``freesurfer`` (FreeSurfer 8's
    own ``mri_synthseg``, with the weights of ``$FREESURFER_HOME/models``; the native engines are then run as this
    toolkit's ``mri_synthseg``, its flags and files, on the same weights)."""
    out: list[Engine] = []
    skipped: dict[str, str] = {}
    freesurfer = reference == "freesurfer"
    base = ["--i", str(image), "--threads", str(threads), *flags]
    program = ["-m", "synthseg_native.mri_synthseg"] if freesurfer else ["-m", "synthseg_native"]

    def cli(name: str, extra: list[str], command: list[str] | None = None, env: dict[str, str] | None = None
            ) -> Engine:
        folder = work / "runs" / name
        argv = command or [python, *program, "--models", models]
        return Engine(name, [*argv, *base, "--o", str(folder / "seg.nii.gz"), "--vol", str(folder / "vol.csv"),
                             *extra], env or {}, folder)

    for backend in backends:
        for precision in precisions:
            name = native_name(backend, precision)
            extra = [] if precision == "fp32" else ["--precision", precision]
            if backend == "tf":
                out.append(cli(name, extra))
            elif importlib.util.find_spec(backend) is None:
                skipped[name] = f"{backend} is not installed in this environment (make setup installs it)"
            else:
                out.append(cli(name, ["--backend", backend, "--device", "cpu", *extra]))
    home = os.environ.get("SYNTHSEG_HOME")
    if freesurfer:
        command, why = freesurfer_command()
        if command is None:
            skipped["reference"] = why
        else:  # the same TensorFlow kernels as ours (its Eigen Conv3D crashes on full-size brains on AMD CPUs)
            onednn = {"TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1")}
            out.append(cli("reference", ["--cpu"], command, onednn))
    elif not home:
        skipped["reference"] = "SYNTHSEG_HOME is not set (an upstream SynthSeg checkout runs the reference engine)"
    else:
        try:
            find_synthseg_home(home)
            out.append(cli("reference", ["--engine", "upstream"]))
        except UpstreamError as exc:
            skipped["reference"] = str(exc)
    why = "the Docker baseline runs upstream's container, not FreeSurfer's" if freesurfer else docker_unavailable()
    if why:
        skipped["baseline"] = why
    else:
        folder = work / "runs" / "baseline"
        out.append(Engine("baseline", ["bash", str(PROJECT / "scripts" / "40_synthseg_docker.sh"), str(image),
                                       str(folder) + "/"],
                          {"THREADS": str(threads), "SYNTHSEG_FLAGS": " ".join(flags)}, folder))
    return out, skipped


def docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    try:
        proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no daemon"])[-1]
        return f"the Docker daemon is not reachable ({first})"
    return None


def shell_command(engine: Engine, python: str, record: Path) -> str:
    env = [f"{k}={v}" for k, v in engine.env.items()]
    argv = [python, "-m", "devtools.bench", "rss", "--record", str(record), "--",
            *(["env", *env] if env else []), *engine.argv]
    return shlex.join(argv)


# ---------------------------------------------------------------------------------------------------
# measurements


def profile_native(engine: Engine, work: Path) -> dict:
    """One extra native run with --profile: seconds and peak memory per stage, network GFLOP/s."""
    shutil.rmtree(work / "runs", ignore_errors=True)
    logger.log(RUN, "native engine once more with --profile (stage breakdown)")
    proc = subprocess.run([*engine.argv, "--profile"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"the profiled native run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return parse_profile(proc.stdout)


def parse_profile(text: str) -> dict:
    stages = {m[1]: {"seconds": float(m[2]), "peak_rss_gb": float(m[3])} for m in PROFILE_LINE.finditer(text)}
    out: dict = {"stages": stages}
    if m := THROUGHPUT_LINE.search(text):
        out["network_gflop"], out["network_gflops"] = float(m[1]), float(m[2])
    if m := SHAPE_LINE.search(text):
        out["network_input"] = m[1]
    return out


def run_roofline(python: str, threads: int, res: Path, size: float, repeats: int) -> dict:
    logger.log(RUN, "conv3d roofline (make roofline)")
    out = res / "roofline.json"
    proc = subprocess.run([python, "-m", "devtools.roofline", "--threads", str(threads), "--out", str(out),
                           "--size", str(size), "--repeats", str(repeats)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"roofline failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.read_text())


def machine_facts(python: str) -> dict:
    """CPU, cores, memory, OS and TensorFlow as the benchmarked interpreter sees them."""
    code = ("import json; from synthseg_native.engine.backends.tf.devices import prepare_tensorflow, onednn_enabled, "
            "network_device;"
            "prepare_tensorflow(); import tensorflow as tf;"
            "print(json.dumps({'tensorflow': tf.__version__, 'network_device': network_device(),"
            "'onednn': onednn_enabled()}))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    tf_facts = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    flags = sorted(machine.cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"})
    return {"cpu": machine.cpu_model(), "cores": os.cpu_count(),
            "memory_gb": round((machine.physical_memory() or 0) / 1e9, 1),
            "os": platform.platform(), "python": platform.python_version(), "cpu_flags": flags, **tf_facts}


def read_rss(record: Path) -> list[int]:
    if not record.is_file():
        return []
    return [json.loads(line)["peak_rss_kb"] for line in record.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make bench", description="Time native vs reference vs Docker with hyperfine.")
    p.add_argument("--in", dest="image", help="Input image (default: nilearn's MNI152 T1, 1 mm).")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="Threads for every engine (default: all cores).")
    p.add_argument("--flags", default="", help="SynthSeg flags for every engine, e.g. '--parc --robust'.")
    p.add_argument("--backends", default="tf", help="Native backends to time side by side: 'tf', 'torch' or "
                   "'tf torch' (torch runs --device cpu: the CPU comparison).")
    p.add_argument("--precisions", default="fp32", help="Precisions of the native engines, e.g. 'fp32 bf16' "
                   "(each backend in each; one that this machine lacks falls back to fp32 with a [WARN], as the "
                   "command line does).")
    p.add_argument("--models", help="Weights folder (default: the usual search order, else test weights; "
                   "$FREESURFER_HOME/models with --reference freesurfer).")
    p.add_argument("--reference", choices=("upstream", "freesurfer"), default="upstream",
                   help="The engine the others are measured against: upstream SynthSeg ($SYNTHSEG_HOME, default) "
                   "or FreeSurfer 8's mri_synthseg ($MRI_SYNTHSEG_FS or $FREESURFER_HOME/bin/mri_synthseg, weights "
                   "from $FREESURFER_HOME/models; the native engines then run as this toolkit's mri_synthseg).")
    p.add_argument("--results", help="Report folder (default: results/<date>-<host>/).")
    p.add_argument("--work", help="Scratch folder for inputs, weights and outputs (default: results/tmp/bench).")
    p.add_argument("--no-interleave", action="store_true", help="Time each engine's runs in one block (hyperfine's "
                   "order) instead of in rounds that run every engine once, in rotated order (the default: on a "
                   "machine whose speed drifts, the engines then meet the same drift).")
    p.add_argument("--no-roofline", action="store_true", help="Skip the conv3d roofline.")
    p.add_argument("--roofline-size", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--roofline-repeats", type=int, default=5, help=argparse.SUPPRESS)
    benchgate.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rss"]:
        return rss_main(argv[1:])
    args = parser().parse_args(argv)
    prepare_tensorflow()  # the same TensorFlow settings and quiet logs as the runs it times
    # the commands it times run `python -m devtools.bench rss`: the tree these tools live in is on their path
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))
    try:
        return bench(args)
    except BenchError as exc:
        logger.error(str(exc))
        return 1


def bench(args: argparse.Namespace) -> int:
    criteria = benchgate.Criteria.from_args(args)
    if why := criteria.check():
        raise BenchError(why)
    if shutil.which("hyperfine") is None:
        raise BenchError(f"hyperfine not found: {HYPERFINE_HINT}")
    if args.runs < 1 or args.warmup < 0:
        raise BenchError(f"RUNS must be >= 1 and WARMUP >= 0 (got {args.runs}, {args.warmup})")
    flags = shlex.split(args.flags)
    backends = tuple(args.backends.split())
    unknown = [b for b in backends if b not in ("tf", "torch")]
    if unknown or not backends:
        raise BenchError(f"BACKENDS takes tf and/or torch, not {args.backends!r}")
    precisions = tuple(dict.fromkeys(args.precisions.split()))
    wrong = [x for x in precisions if x not in PRECISIONS]
    if wrong or not precisions:
        raise BenchError(f"PRECISIONS takes {', '.join(PRECISIONS)}, not {args.precisions!r}")
    if "--precision" in flags:
        raise BenchError("give the precision as PRECISIONS=..., not in FLAGS (the reference runs fp32 only)")
    python = sys.executable
    res = Path(args.results) if args.results else default_results_dir()
    work = Path(args.work) if args.work else PROJECT / "results" / "tmp" / "bench"
    res.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    image = Path(args.image).resolve() if args.image else default_input(work / "input")
    if not image.is_file() or image_extension(str(image)) is None:
        raise BenchError(f"{image}: not an image file (.nii, .nii.gz or .mgz)")
    threads = args.threads or os.cpu_count() or 1
    if args.reference == "freesurfer" and not args.models and os.environ.get("FREESURFER_HOME"):
        args.models = str(Path(os.environ["FREESURFER_HOME"]) / "models")  # the files FreeSurfer's script reads
    models, test_weights = resolve_weights(args.models, flags, work)
    todo, skipped = engines(image, flags, threads, models, work, python, backends, precisions, args.reference)
    for name, why in skipped.items():
        logger.log(SKIP, f"{name}: {why}")
    records = {e.name: work / f"rss-{e.name}.jsonl" for e in todo}
    for record in records.values():
        record.unlink(missing_ok=True)
    cmds = [(e.name, shell_command(e, python, records[e.name])) for e in todo]
    facts = machine_facts(python)
    logger.info(f"input {image}, {threads} thread(s), weights {models}{' (TEST WEIGHTS)' if test_weights else ''}")
    timed = [(name, cmd, e.out) for (name, cmd), e in zip(cmds, todo)]
    try:
        hf = (benchtiming.run_blocks if args.no_interleave else benchtiming.run_rounds)(
            timed, args.runs, args.warmup, res)
    except benchtiming.TimingError as exc:
        raise BenchError(str(exc)) from None
    rows = summarise(hf, {name: read_rss(path) for name, path in records.items()})
    verdicts = benchgate.evaluate(criteria, rows, {e.name: e.out / "seg.nii.gz" for e in todo}, skipped) \
        if criteria.any() else []
    natives = [e for e in todo if e.name.startswith("native")]
    profiles = {e.name: profile_native(e, work) for e in natives}
    profile = profiles[natives[0].name]
    roof = None if args.no_roofline else run_roofline(python, threads, res, args.roofline_size, args.roofline_repeats)
    setup = {"date": dt.date.today().isoformat(), "input": str(image), "flags": flags, "threads": threads,
             "runs": args.runs, "warmup": args.warmup, "interleaved": not args.no_interleave,
             "reference": args.reference,
             "test_weights": test_weights, "weights": models,
             "commands": cmds}
    write_text(res / "machine.json", json.dumps(facts, indent=2) + "\n")
    write_text(res / "profile.json", json.dumps(profile, indent=2) + "\n")
    write_text(res / "summary.json", json.dumps({"setup": setup, "rows": rows, "skipped": skipped,
                                                 "profile": profile, "profiles": profiles,
                                                 "gate": [asdict(v) for v in verdicts]}, indent=2) + "\n")
    text = summary_markdown(rows, skipped, facts, profile, roof, setup, rounds_markdown(hf))
    for name, extra in list(profiles.items())[1:]:
        text += other_profile_markdown(name, extra)
    write_text(res / "summary.md", text + benchgate.markdown(verdicts))
    chart(rows, profile, res / "chart.png")
    shutil.rmtree(work / "runs", ignore_errors=True)
    logger.log(DONE, f"benchmark report in {res}/ (summary.md, hyperfine.json, chart.png)")
    for v in verdicts:
        (logger.info if v.held else logger.error)(v.line())
    unmet = [v for v in verdicts if not v.held]
    if verdicts:
        logger.info(f"gate: {len(verdicts) - len(unmet)} of {len(verdicts)} criteria held")
    return 1 if unmet else 0


if __name__ == "__main__":
    sys.exit(main())
