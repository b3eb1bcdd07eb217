"""workflow/Snakefile end to end with real Snakemake: shards on 2 local cores, then a re-run that skips everything,
and the SLURM profile parsed by Snakemake's SLURM executor (dry run: no cluster needed).

Snakemake lives in .venv-workflow (make setup-workflow; make test builds it). Without it these tests skip,
except in CI, where a missing workflow environment is a failure.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SNAKEFILE = ROOT / "workflow" / "Snakefile"


def snakemake_bin() -> str:
    for candidate in (os.environ.get("SNAKEMAKE"), ROOT / ".venv-workflow" / "bin" / "snakemake",
                      shutil.which("snakemake")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    if os.environ.get("CI"):
        pytest.fail("snakemake not found in CI: make test builds .venv-workflow (scripts/setup_workflow_env.sh)")
    pytest.skip("snakemake not installed: make setup-workflow")


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE_")}
    return subprocess.run([snakemake_bin(), "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args],
                          capture_output=True, text=True, timeout=540, env=env)


def segs_in(folder: Path) -> list[Path]:
    """The segmentations in ``folder`` (not their provenance records)."""
    return sorted(p for p in folder.glob("*_synthseg.*") if not p.name.endswith(".json"))


@pytest.fixture
def cohort(inputs, tmp_path) -> dict[str, Path]:
    src = tmp_path / "scans with space"
    src.mkdir()
    for name in ("ras", "las", "lia"):
        shutil.copy(inputs[name], src / inputs[name].name)
    return {"in": src, "out": tmp_path / "segs", "work": tmp_path}


def test_snakemake_two_cores_three_scans(weights, cohort):
    out = cohort["out"]
    config = ["--config", f"input={cohort['in']}", f"output={out}", "shards=2", f"python={sys.executable}",
              f"flags=--models {weights.need('seg2')} --crop 64"]
    r = snakemake(cohort["work"], "--cores", "2", *config)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in segs_in(out)) == \
        ["mni_las_synthseg.nii", "mni_lia_synthseg.mgz", "mni_ras_synthseg.nii.gz"]
    assert len(list(out.glob("*.provenance.json"))) == 3
    with open(out / "volumes.csv", newline="") as fh:  # merged, in the folder's order, no shard files left
        assert [row[0] for row in csv.reader(fh)] == ["subject", "mni_las.nii", "mni_lia.mgz", "mni_ras"]
    assert not list(out.glob("*.shard-*.csv"))
    page = (out / "qc" / "index.html").read_text()
    for png in ("mni_las_synthseg.png", "mni_lia_synthseg.png", "mni_ras_synthseg.png"):
        assert (out / "qc" / png).is_file() and f'src="{png}"' in page
    logs = [(out / ".cohort" / f"shard-{i}-of-2.log").read_text() for i in (1, 2)]
    assert "shard 1/2: 2 of 3 scan(s)" in logs[0] and "shard 2/2: 1 of 3 scan(s)" in logs[1]
    assert [log.count("[DONE] ") for log in logs] == [2, 1]

    # everything again: every shard finds its scans current and loads no model
    r = snakemake(cohort["work"], "--cores", "2", "--forceall", *config)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [(out / ".cohort" / f"shard-{i}-of-2.log").read_text() for i in (1, 2)]
    assert [log.count("[SKIP] ") for log in logs] == [2, 1] and not any("[RUN ]" in log for log in logs)


def test_failed_scan_fails_its_shard_only(weights, cohort):
    (cohort["in"] / "broken.nii.gz").write_bytes(b"not an image")
    out = cohort["out"]
    r = snakemake(cohort["work"], "--cores", "2", "--keep-going", "--config", f"input={cohort['in']}",
                  f"output={out}", "shards=2", f"python={sys.executable}", "snapshot=",
                  f"flags=--models {weights.need('seg2')} --crop 64")
    assert r.returncode != 0
    assert "[ERR] " in r.stderr and "broken.nii.gz" in r.stderr
    assert len(list(segs_in(out))) == 3  # the other scans are done and recorded
    assert len(list(out.glob("*.provenance.json"))) == 3 and not (out / "qc").exists()


def test_slurm_profile_dry_run(cohort):
    """Shards are capped at the number of scans (5 asked, 3 scans: 3 jobs)."""
    r = snakemake(cohort["work"], "--profile", str(ROOT / "profiles" / "slurm"), "--dry-run", "--printshellcmds",
                  "--config", f"input={cohort['in']}", f"output={cohort['out']}", "shards=5",
                  f"python={sys.executable}")
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert text.count("rule shard:") == 3 and "threads: 4" in text and "mem_mb=16000" in text
    assert "--shard 2/3 --threads 4" in text and "--resume" in text


def test_bad_arguments_stop_the_workflow_before_any_job(cohort):
    r = snakemake(cohort["work"], "--cores", "1", "--config", f"input={cohort['work'] / 'nowhere'}",
                  f"output={cohort['out']}", f"python={sys.executable}")
    assert r.returncode != 0 and "[ERR] " in r.stderr and "input folder does not exist" in r.stderr
    assert not cohort["out"].exists()
