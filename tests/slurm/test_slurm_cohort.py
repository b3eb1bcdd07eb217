"""``make cohort PROFILE=profiles/slurm`` on a real SLURM cluster: jobs submitted with sbatch, queued, run side by
side, accounted by slurmdbd, a killed job retried, a failing scan reported, a shard past its time limit stopped
and finished by a second run.

The cluster is tests/slurm/cluster.sh's (munge, MariaDB, slurmdbd, slurmctld and one slurmd on this host, every
port on 127.0.0.1), started once for this module and stopped after it. It needs root and Debian's packages (.ci/run
installs them); elsewhere these tests skip, in CI they fail instead. docs/cohorts.md says what they prove.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import pytest

from engine_fixtures import crop_img

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct")
pytestmark = pytest.mark.slow


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root"
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"{', '.join(missing)} not installed: apt-get install slurm-wlm slurmdbd munge mariadb-server"
    if not (ROOT / ".venv-workflow" / "bin" / "snakemake").is_file():
        return "no .venv-workflow (make setup-workflow)"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    why = unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {why} (.ci/run installs the packages)")
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=180)
    env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"), USER="root")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def scans(scan_folder) -> Path:
    return scan_folder


def cohort(env: dict[str, str], src: Path, out: Path, models: Path, *extra: str, flags: str = "--crop 64",
           background: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
    argv = ["make", "--no-print-directory", "-C", str(ROOT), "cohort", f"IN={src}", f"OUT={out}", "THREADS=4",
            f"FLAGS=--models {models} {flags}".strip(), *extra]
    if background:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)


def jobs(env: dict[str, str]) -> list[dict[str, str]]:
    """Every job of the test cluster's accounting (slurmdbd), oldest first."""
    fields = ["JobIDRaw", "JobName", "State", "Start", "End", "AllocCPUS"]
    r = subprocess.run(["sacct", "-X", "-a", "--parsable2", "--noheader", f"--format={','.join(fields)}",
                        "--starttime", "now-1days"], capture_output=True, text=True, env=env, check=True)
    return [dict(zip(fields, line.split("|"))) for line in r.stdout.splitlines() if line.strip()]


def outputs(folder: Path) -> dict[str, bytes]:
    """What must be byte-identical between a SLURM and a local run: segmentations, the merged volume table and
    the snapshots (not the provenance records, which hold times, nor the logs)."""
    found = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
             if p.is_file() and ".cohort" not in p.parts and not p.name.endswith((".json", ".html"))}
    return found


def test_slurm_cohort_runs_shards_as_jobs_and_matches_a_local_run(slurm, weights, scans, tmp_path):
    models = weights.need("seg2")
    before = len(jobs(slurm))
    r = cohort(slurm, scans, tmp_path / "slurm", models, "PROFILE=profiles/slurm", "SHARDS=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    new = jobs(slurm)[before:]
    assert [j["State"] for j in new] == ["COMPLETED", "COMPLETED"], new  # one sbatch job per shard
    assert all(j["AllocCPUS"] == "4" for j in new)  # profiles/slurm's set-threads reached sbatch
    a, b = new
    assert a["Start"] < b["End"] and b["Start"] < a["End"], new  # side by side, not one after the other
    local = cohort(slurm, scans, tmp_path / "local", models, "CORES=2", "SHARDS=2")
    assert local.returncode == 0, local.stderr[-3000:]
    ours, theirs = outputs(tmp_path / "slurm"), outputs(tmp_path / "local")
    segs = [k for k in ours if "_synthseg." in k and "/" not in k]
    assert sorted(ours) == sorted(theirs) and len(segs) == 3, sorted(ours)
    assert ours == theirs  # byte for byte
    assert (tmp_path / "slurm" / "qc" / "index.html").is_file()


def test_killed_job_is_retried_and_the_cohort_completes(slurm, weights, scans, tmp_path):
    models = weights.need("seg2")
    before = len(jobs(slurm))
    proc = cohort(slurm, scans, tmp_path / "segs", models, "PROFILE=profiles/slurm", "SHARDS=2", background=True)
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        running = [j for j in jobs(slurm)[before:] if j["State"] == "RUNNING"]
        if running:
            victim = running[0]["JobIDRaw"]
            subprocess.run(["scancel", "--signal=KILL", "--full", victim], env=slurm, check=True)
        time.sleep(1)
    out, err = proc.communicate(timeout=900)
    assert victim is not None, out[-2000:] + err[-2000:]
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    states = {j["JobIDRaw"]: j["State"] for j in jobs(slurm)[before:]}
    assert states[victim].split()[0] in ("CANCELLED", "FAILED"), states  # accounted as killed ("CANCELLED by 0")
    assert list(states.values()).count("COMPLETED") == 2, states  # the other shard, and the retry
    segs = sorted(p.name for p in (tmp_path / "segs").glob("*_synthseg.*") if not p.name.endswith(".json"))
    assert len(segs) == 3 and (tmp_path / "segs" / "qc" / "index.html").is_file()


def test_failing_scan_in_a_job_is_one_err_and_the_rest_finish(slurm, weights, scans, tmp_path):
    (scans / "broken.nii.gz").write_bytes(b"not an image")
    r = cohort(slurm, scans, tmp_path / "segs", weights.need("seg2"), "PROFILE=profiles/slurm", "SHARDS=2")
    assert r.returncode != 0
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("[ERR]") and "broken" in line]
    assert errors and all("broken.nii.gz" in line for line in errors), r.stderr[-3000:]
    segs = [p for p in (tmp_path / "segs").glob("*_synthseg.*") if not p.name.endswith(".json")]
    assert len(segs) == 3  # the good scans finished and are recorded for the next run


def test_time_limit_stops_a_shard_and_a_second_run_finishes_the_rest(slurm, weights, mni_img, tmp_path):
    """A shard that outlasts its job's time limit (SLURM's minimum, 1 minute): SLURM stops it (TIMEOUT), the
    terminal says so and what to change; the scans finished before are kept, and a second make cohort with a
    sufficient runtime segments only the rest."""
    models = weights.need("seg2")
    src = tmp_path / "scans"
    src.mkdir()
    # SLURM stops the job 60-90 s in (its limit, then its next timer check). 16 scans take ~8-9 s each on the
    # fastest CPU seen here (Zen 5) and ~17-20 s on Zen 4/Sapphire Rapids: over 2 min of work on any of them, and
    # the first scan done well before the limit. Six scans finished inside the minute on Zen 5.
    count = 16
    for i in range(count):
        nib.save(crop_img(mni_img, (40 + 2 * i, 50, 40), (112, 120, 110)), src / f"sub{i:02d}.nii.gz")
    profile = tmp_path / "profile"
    shutil.copytree(ROOT / "profiles" / "slurm", profile)
    text = (profile / "config.yaml").read_text()
    tight = text.replace("retries: 1", "retries: 0").replace("runtime: 240", "runtime: 1")
    assert tight.count("retries: 0") == 1 and tight.count("runtime: 1 ") == 1, "profiles/slurm changed its layout"
    (profile / "config.yaml").write_text(tight)
    out = tmp_path / "segs"
    before = len(jobs(slurm))
    first = cohort(slurm, src, out, models, f"PROFILE={profile}", "SHARDS=1", flags="")
    assert first.returncode != 0, first.stderr[-3000:]
    assert [j["State"] for j in jobs(slurm)[before:]] == ["TIMEOUT"]
    err = first.stderr.splitlines()
    assert any(line.startswith("[ERR] interrupted (SIGTERM) while segmenting") for line in err), first.stderr[-3000:]
    assert any(line.startswith("[ERR] 1 shard job(s) reached SLURM's time limit") and "runtime" in line
               for line in err), first.stderr[-3000:]
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*_synthseg.nii.gz")}
    assert 1 <= len(kept) < count, sorted(kept)  # stopped half-way, what finished is in place
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.is_file()]  # no staged leftovers

    second = cohort(slurm, src, out, models, "PROFILE=profiles/slurm", "SHARDS=1", flags="")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    segs = {p.name: p.stat().st_mtime_ns for p in out.glob("*_synthseg.nii.gz")}
    assert len(segs) == count and all(segs[name] == mtime for name, mtime in kept.items())  # not re-run
    shard_log = (out / ".cohort" / "shard-1-of-1.log").read_text()
    assert shard_log.count("[SKIP]") == len(kept) and shard_log.count("[DONE]") == count - len(kept)
    rows = (out / "volumes.csv").read_text().splitlines()
    assert len(rows) == 1 + count and (out / "qc" / "index.html").is_file()
