"""Step 40 of a numbered pipeline: ``synthseg-native stage [IN [OUT]]``, which ``scripts/40_synthseg_native.sh`` runs.

The toolkit replaces the SynthSeg step of existing pipelines (``00_env_check … 30_synthsr → 40_synthseg →
50_fastsurfer``), whose scripts share a ``.env`` and call each step as ``bash scripts/40_….sh``. Everything the
step decides lives here, in one process: the host's ``.env`` (read, never executed), the paths (the naming rules
are :mod:`.batch.plan`'s), the settings checked against :mod:`.config`'s choices, the provenance cache
(:mod:`.batch.provenance`), the run itself through :func:`.api.segment`, and the log lines and exit status that the
host's ``set -euo pipefail`` runner stops on. The shell script only finds the toolkit and ``exec``s this, so it can
be copied into any pipeline's ``scripts/`` folder and sources nothing there.

``ENGINE=docker`` (``scripts/40_synthseg_docker.sh``) runs the old step instead: upstream SynthSeg in the
``pwesp/synthseg:py38`` image, with the same paths and flags, always (a baseline is made on purpose).

Exit status: 0 done or current, 1 a bad setting, a missing input or a failed run, 128+N stopped by signal N.
"""

from __future__ import annotations

import logging
import os
import platform
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict

from .batch import provenance
from .batch.plan import StageFiles, pipeline_files, stage_files
from .config.envfile import read_env_file, settings
from .config.options import BACKENDS, DEVICES, ENGINES
from .config.parser import Parser
from .errors import ProvenanceError, SynthSegError
from .log import DONE, RUN

logger = logging.getLogger(__name__)

#: The ``.env`` keys the stage reads (a non-empty environment variable wins over the file); any other key of the
#: host's file is ignored.
KEYS = ("DATA_ROOT", "SID", "THREADS", "FORCE", "SYNTHSEG_FLAGS", "SYNTHSEG_MODELS", "DEVICE", "BACKEND", "ENGINE",
        "SYNTHSEG_HOME", "POSTERIORS", "DOCKER_IMAGE", "DOCKER_SYNTHSEG_CMD")
STAGE_ENGINES = (*ENGINES, "docker")
STAGE_DEVICES = (*DEVICES, "gpu")       # gpu: whichever GPU the engine finds (auto)
DOCKER_DEVICES = ("auto", "cpu", "gpu")
DOCKER_IMAGE = "pwesp/synthseg:py38"
DOCKER_CMD = "python /workspace/SynthSeg/scripts/commands/SynthSeg_predict.py"
ENV_FILE_HELP = "the pipeline's KEY=VALUE settings (default: $ENV_FILE, else ./.env)"


class StageError(SynthSegError):
    """A setting, an input or a run that stops the step; the message is its one ``[ERR]`` line."""


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise StageError(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, not '{value}'")
    return value


def resolve_files(args: list[str], conf: dict[str, str], env_file: str) -> StageFiles:
    """The step's files: from ``IN [OUT]``, or with no argument from the pipeline's ``DATA_ROOT`` and ``SID``."""
    posteriors = conf.get("POSTERIORS") == "1"
    if args:
        return stage_files(args[0], args[1] if len(args) > 1 else None, posteriors)
    if not conf.get("DATA_ROOT") or not conf.get("SID"):
        raise StageError(f"no input given and DATA_ROOT/SID are not set (in {env_file} or the environment)")
    return pipeline_files(conf["DATA_ROOT"], conf["SID"], posteriors)


def engine_args(files: StageFiles, conf: dict[str, str], engine: str, device: str, flags: list[str]) -> list[str]:
    """The engine's command line for this step (what the provenance record is built from)."""
    args = ["--i", files.image, "--o", files.seg, "--vol", files.vol, "--engine", engine, *flags]
    if files.post:
        args += ["--post", files.post]
    if conf.get("THREADS"):
        args += ["--threads", conf["THREADS"]]
    if device == "cpu":
        args.append("--cpu")
    elif device in ("cuda", "mps"):
        args += ["--device", device]
    for key, flag in (("BACKEND", "--backend"), ("SYNTHSEG_MODELS", "--models"), ("SYNTHSEG_HOME", "--synthseg-home")):
        if conf.get(key):
            args += [flag, conf[key]]
    return args


def run_engine(args: list[str], files: StageFiles, engine: str, force: bool) -> int:
    """The cache check, the run in this process, the provenance record (last, so a failed run leaves none)."""
    try:
        opts = provenance.parse_engine_args(args)
        if provenance.check(opts, force=force) == provenance.EXIT_CURRENT:
            return 0
    except (ProvenanceError, OSError) as exc:
        raise StageError(f"cannot check the cache for {files.seg}: {exc}") from exc
    from .api import segment  # the engine's imports are paid only when there is something to run

    logger.log(RUN, f"SynthSeg step 40 ({engine} engine): {files.image}")
    start = time.monotonic()
    keywords = {k: v for k, v in asdict(opts).items() if k not in ("i", "o")}
    if segment(opts.i or "", opts.o, **keywords).exit_code != 0:
        return 1  # the engine's [ERR] line said why; no provenance: the next run starts again
    try:
        logger.info(f"provenance written: {provenance.write(opts)}")
    except (ProvenanceError, OSError) as exc:
        raise StageError(f"could not record provenance for {files.seg}: {exc}") from exc
    logger.log(DONE, f"{files.seg} and {files.vol} in {time.monotonic() - start:.0f} s")
    return 0


def _bind(source: str, target: str, extra: str = "") -> str:
    """A ``--mount`` value; Docker parses it as CSV, so a source with a comma or a double quote is quoted."""
    src = f"source={source}"
    if "," in src or '"' in src:
        src = '"' + src.replace('"', '""') + '"'
    return f"type=bind,{src},target={target}{extra}"


def docker_command(files: StageFiles, conf: dict[str, str], device: str, flags: list[str],
                   system: str | None = None, machine: str | None = None) -> list[str]:
    """``docker run …`` for the old step 40 on this machine (``system``/``machine``: ``uname -s``/``-m``)."""
    system, machine = system or platform.system(), machine or platform.machine()
    cmd = ["docker", "run", "--rm"]
    user = os.environ.get("DOCKER_USER", f"{os.getuid()}:{os.getgid()}")
    if system == "Darwin":
        user = os.environ.get("DOCKER_USER", "")  # Docker Desktop maps file ownership to you already
        if machine == "arm64":
            cmd += ["--platform", "linux/amd64"]  # an amd64 image, emulated on Apple silicon
    if user:
        cmd += ["--user", user]
    if device == "gpu":
        cmd += ["--gpus", "all"]
    in_dir, out_dir = os.path.abspath(os.path.dirname(files.image)), os.path.abspath(os.path.dirname(files.seg))
    cmd += ["--mount", _bind(in_dir, "/in", ",readonly"), "--mount", _bind(out_dir, "/out")]
    cmd += [conf.get("DOCKER_IMAGE", DOCKER_IMAGE), *shlex.split(conf.get("DOCKER_SYNTHSEG_CMD", DOCKER_CMD))]
    cmd += ["--i", f"/in/{os.path.basename(files.image)}", "--o", f"/out/{os.path.basename(files.seg)}",
            "--vol", f"/out/{os.path.basename(files.vol)}", *flags]
    if files.post:
        cmd += ["--post", f"/out/{os.path.basename(files.post)}"]
    if conf.get("THREADS"):
        cmd += ["--threads", conf["THREADS"]]
    if device == "cpu":
        cmd.append("--cpu")
    return cmd


def run_docker(files: StageFiles, conf: dict[str, str], device: str, flags: list[str]) -> int:
    if shutil.which("docker") is None:
        raise StageError("docker not found: install Docker (or use scripts/40_synthseg_native.sh)")
    if subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        raise StageError("the Docker daemon is not reachable ('docker info' failed): start Docker Desktop or dockerd")
    os.makedirs(os.path.dirname(os.path.abspath(files.seg)), exist_ok=True)
    cmd = docker_command(files, conf, device, flags)
    logger.log(RUN, f"SynthSeg step 40 (Docker baseline): {files.image}")
    start = time.monotonic()
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise StageError(f"SynthSeg in Docker failed (exit {rc}) on {files.image}")
    logger.log(DONE, f"{files.seg} and {files.vol} in {time.monotonic() - start:.0f} s")
    return 0


def run(args: list[str], env_file: str) -> int:
    """Step 40 for ``args`` (``[IN [OUT]]``) with the settings of ``env_file`` and the environment."""
    conf = settings(KEYS, read_env_file(env_file), os.environ)
    files = resolve_files(args, conf, env_file)
    engine = _choice("ENGINE", conf.get("ENGINE", "native"), STAGE_ENGINES)
    device = _choice("DEVICE", conf.get("DEVICE", "auto"), DOCKER_DEVICES if engine == "docker" else STAGE_DEVICES)
    if conf.get("BACKEND"):
        _choice("BACKEND", conf["BACKEND"], BACKENDS)
    try:
        flags = shlex.split(conf.get("SYNTHSEG_FLAGS", ""))
    except ValueError as exc:  # an unclosed quote
        raise StageError(f"SYNTHSEG_FLAGS cannot be split into flags ({exc}): {conf['SYNTHSEG_FLAGS']}") from None
    logger.info(f"input:   {files.image}")
    logger.info(f"outputs: {', '.join(p for p in (files.seg, files.vol, files.post) if p)}")
    what = f"docker {conf.get('DOCKER_IMAGE', DOCKER_IMAGE)}" if engine == "docker" else engine
    backend = f" ({conf['BACKEND']} backend)" if conf.get("BACKEND") and engine == "native" else ""
    logger.info(f"engine:  {what}{backend}, device: {device}{', flags: ' + ' '.join(flags) if flags else ''}")
    if not os.path.isfile(files.image):
        raise StageError(f"input not found: {files.image} (run step 30 first, or pass an image)")
    if engine == "docker":
        return run_docker(files, conf, device, flags)
    return run_engine(engine_args(files, conf, engine, device, flags), files, engine, conf.get("FORCE") == "1")


def main(argv: list[str]) -> int:
    p = Parser(prog="synthseg-native stage", description="Pipeline step 40: SynthSeg on "
               "$DATA_ROOT/derivatives/$SID/synthsr/${SID}_synthsr.nii.gz, or on IN, cached by provenance "
               "(docs/pipeline.md).")
    p.add_argument("--env-file", default=os.environ.get("ENV_FILE") or ".env", help=ENV_FILE_HELP)
    p.add_argument("input", nargs="?", metavar="IN", help="an image (default: the pipeline's SynthSR output)")
    p.add_argument("output", nargs="?", metavar="OUT", help="the segmentation file, or a folder for it")
    try:
        opts = p.parse_args(argv)
        return run([a for a in (opts.input, opts.output) if a is not None], opts.env_file)
    except SynthSegError as exc:  # the stage's own, and what the engine raises before any scan (weights, locks)
        logger.error(str(exc))
        return 1
    except OSError as exc:
        logger.error(str(exc))
        return 1
