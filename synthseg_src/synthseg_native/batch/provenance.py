"""Provenance sidecars: the pipeline stage's cache may skip a run only when it can prove the outputs
came from this very input, these flags, these weights and this toolkit.

Existing outputs alone prove nothing (an interrupted run, other flags, new weights), so every
finished run leaves ``<segmentation>.provenance.json`` beside its segmentation, written last and
atomically. ``check`` compares it with what a run would use now; when anything differs it deletes
the record *before* the new run starts, so a run that dies half-way is never mistaken for a
finished one. The record is built from the engine's own argument list, parsed by the engine's own
parser, so the pipeline stage only builds that list and never has to know what matters.

Batches with ``--resume`` keep one such record per scan (:mod:`.cohort`); a volume or QC table that
several scans share is then listed in the record but not digested (each scan changes it), and the
batch checks that the table still holds the scan's row instead.

From a shell (exit 0: outputs current, 3: a run is needed, 1: error, 2: usage)::

    synthseg-native provenance check [--force] -- --i IN --o SEG --vol CSV [engine flags]
    synthseg-native provenance write -- --i IN --o SEG --vol CSV [engine flags]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Collection
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..config import Options
from ..config.parser import parse
from ..engine.predictor import resolve_backend
from ..engine.spec import ModelSpec
from ..engine.weights import file_sha256, model_files
from ..errors import ProvenanceError, UpstreamError, WeightsError
from ..io.atomic import image_extension, write_text
from ..log import SKIP
from ..reference.upstream import PREDICT_FILE, find_synthseg_home
from ..version import __version__

logger = logging.getLogger(__spec__.name if __spec__ else __name__)  # under "python -m" too
PACKAGE_DIR = Path(__file__).resolve().parents[1]

SIDECAR_SUFFIX = ".provenance.json"
SCHEMA = 1
EXIT_CURRENT, EXIT_ERROR, EXIT_USAGE, EXIT_STALE = 0, 1, 2, 3
OUTPUT_FLAGS = ("o", "vol", "post", "resample", "qc")
# Engine options that cannot change a result (or are covered by a digest: weights, checkout).
# Batch options (--resume, --shard, --snapshot, --bids-suffix, --no-overlap) only choose which scans run, in what
# order of work, and what is shown.
NOT_RESULT_FLAGS = {"i", *OUTPUT_FLAGS, "engine", "threads", "profile", "debug", "models", "synthseg_home",
                    "device_check", "resume", "shard", "snapshot", "bids_suffix", "no_overlap"}


def parse_engine_args(argv: list[str]) -> Options:
    """The engine's own options for ``argv`` (normalised as the engine does: "--robust" and "--robust --fast"
    are the same run, and ``--backend auto`` is the backend it picks here); refused unless they describe one
    input image and one segmentation file."""
    opts = parse(argv).normalised()
    if not opts.i or not opts.o or image_extension(opts.i) is None or image_extension(opts.o) is None:
        raise ProvenanceError("provenance covers one input image and one segmentation file (--i, --o)")
    return replace(opts, backend="tf" if opts.engine == "upstream" else resolve_backend(opts))


def sidecar_path(args: Options) -> Path:
    return Path(os.path.abspath(args.o) + SIDECAR_SUFFIX)


def output_paths(args: Options, shared: Collection[str] = ()) -> list[str]:
    """The run's own output files; ``shared`` ones (tables other scans write too) are left out."""
    paths = [os.path.abspath(getattr(args, f)) for f in OUTPUT_FLAGS if getattr(args, f)]
    return [p for p in paths if p not in {os.path.abspath(x) for x in shared}]


def weight_files(args: Options) -> list[Path]:
    """The weight files this run reads (the engine's rule: engine.weights.model_files)."""
    return list(model_files(args.model_keys, args.models, args.model, ModelSpec.of(args).freesurfer_first).values())


def toolkit() -> dict[str, str]:
    """The version, plus a digest of every module of the package (subpackages included): a development tree
    changes between releases."""
    h = hashlib.sha256()
    for src in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(src.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + src.read_bytes())
    return {"version": __version__, "sources_sha256": h.hexdigest()}


def upstream_checkout(args: Options) -> dict[str, str] | None:
    if args.engine != "upstream":
        return None
    try:
        home = find_synthseg_home(args.synthseg_home)
    except UpstreamError as exc:
        return {"error": str(exc)}
    return {"home": str(home), "predict_sha256": file_sha256(home / PREDICT_FILE)}


def weight_digests(args: Options) -> dict[str, str]:
    """Content digests of the weight files, by name (a batch computes them once for all its scans)."""
    return {p.name: file_sha256(p) for p in weight_files(args)}


def fingerprint(args: Options, input_sha256: str | None = None,
                weights: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything that decides the outputs' content; two runs with equal fingerprints give equal files."""
    path = os.path.abspath(args.i)
    st = os.stat(path)
    return {
        "input": {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                  "sha256": input_sha256 or file_sha256(path)},
        "flags": {k: v for k, v in sorted(asdict(args).items()) if k not in NOT_RESULT_FLAGS},
        "engine": args.engine,
        "weights": weights if weights is not None else weight_digests(args),  # content, not location
        "upstream": upstream_checkout(args),
        "toolkit": toolkit(),
    }


def stale_reason(args: Options, shared: Collection[str] = (),
                 weights: dict[str, str] | None = None) -> str | None:
    """Why the recorded run cannot stand in for a new one, or None when it can.

    ``shared`` tables must be among the record's shared tables (their rows are the caller's to check).
    """
    side = sidecar_path(args)
    if not side.is_file():
        return f"no provenance record {side.name}"
    try:
        rec = json.loads(side.read_text())
        outputs, rec_input = dict(rec["outputs"]), dict(rec["input"])
    except (OSError, ValueError, KeyError, TypeError):
        rec = {}
    if rec.get("schema") != SCHEMA:
        return f"provenance record {side.name} is unreadable or from another version"
    if set(outputs) != set(output_paths(args, shared)):
        return "the requested outputs differ from the recorded run's"
    if not {os.path.abspath(p) for p in shared} <= set(rec.get("shared_outputs", [])):
        return "the requested tables differ from the recorded run's"
    missing = [p for p in outputs if not os.path.isfile(p)]
    if missing:
        return f"output missing: {missing[0]}"
    path = os.path.abspath(args.i)
    if rec_input.get("path") != path:
        return f"input path changed (was {rec_input.get('path')})"
    if rec_input.get("size") != os.path.getsize(path):
        return "input changed (size differs)"
    try:
        now = fingerprint(args, weights=weights)
    except WeightsError as exc:
        return f"weights not found ({exc})"
    if now["input"]["sha256"] != rec_input.get("sha256"):
        return "input changed (content differs)"
    for key in ("flags", "engine", "weights", "upstream", "toolkit"):
        if now[key] != rec.get(key):
            return f"{key} changed{_diff_keys(rec.get(key), now[key])}"
    changed = [p for p, sha in outputs.items() if file_sha256(p) != sha]
    if changed:
        return f"output modified since the recorded run: {changed[0]}"
    return None


def _diff_keys(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f" ({', '.join(map(str, keys))})" if keys else ""
    return f" ({old} -> {new})"


def check(args: Options, force: bool = False) -> int:
    side = sidecar_path(args)
    reason = "FORCE=1" if force else stale_reason(args)
    if reason is None:
        logger.log(SKIP, f"{args.o} is up to date ({side.name} matches input, flags, weights, toolkit; "
                    "FORCE=1 re-runs)")
        return EXIT_CURRENT
    side.unlink(missing_ok=True)  # from here on, until `write`, the outputs are untrusted
    logger.info(f"cache: running because {reason}")
    return EXIT_STALE


def write(args: Options, shared: Collection[str] = (), weights: dict[str, str] | None = None) -> Path:
    """Record a finished run. Output digests are taken now, so a later edit of an output shows."""
    own = output_paths(args, shared)
    missing = [p for p in own + [os.path.abspath(p) for p in shared] if not os.path.isfile(p)]
    if missing:
        raise ProvenanceError(f"run did not produce {missing[0]}; no provenance written")
    record = {"schema": SCHEMA, **fingerprint(args, weights=weights),
              "outputs": {p: file_sha256(p) for p in own},
              "shared_outputs": sorted(os.path.abspath(p) for p in shared),
              "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    side = sidecar_path(args)
    write_text(side, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return side
