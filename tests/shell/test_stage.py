"""Pipeline step 40 as the pipeline calls it: .env and positional modes, output naming, the
provenance cache ([SKIP], re-run on any change, FORCE=1), clear [ERR] lines, and paths with spaces
and non-ASCII characters. The native engine runs for real on a 40×48×40 MNI crop (five runs in all);
the engine wiring of ENGINE=upstream uses the fake checkout, and failures need no engine at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from engine_fixtures import crop_img
from fake_synthseg import make_checkout

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "scripts" / "40_synthseg_native.sh"
KNOBS = ("DATA_ROOT", "SID", "THREADS", "SYNTHSEG_FLAGS", "SYNTHSEG_MODELS", "DEVICE", "ENGINE", "BACKEND",
         "SYNTHSEG_HOME", "FORCE", "POSTERIORS", "ENV_FILE", "PYTHON", "VENV", "FAKE_WRITE", "FAKE_RECORD",
         "SYNTHSEG_NATIVE")


def stage(*args: object, tmp_path: Path, **env: object) -> subprocess.CompletedProcess:
    """Runs the stage of this checkout with only the given knobs (and no developer .env) in force."""
    base = {k: v for k, v in os.environ.items() if k not in KNOBS}
    base.update(SYNTHSEG_NATIVE=str(ROOT), PYTHON=sys.executable, ENV_FILE=str(tmp_path / "no.env"),
                TF_CPP_MIN_LOG_LEVEL="3")
    base.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", str(STAGE), *map(str, args)], env=base, capture_output=True, text=True,
                          timeout=600, check=False)


def lines(proc: subprocess.CompletedProcess, tag: str) -> list[str]:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(tag)]


@pytest.fixture(scope="session")
def t1(tmp_path_factory, mni_img) -> nib.Nifti1Image:
    return crop_img(mni_img, (70, 80, 60), (40, 48, 40))


@pytest.fixture
def real(weights) -> dict[str, str]:
    """Knobs for a quick real run: seeded seg2 weights, a 32³ crop, CPU, 2 threads."""
    return {"SYNTHSEG_MODELS": weights.need("seg2"), "SYNTHSEG_FLAGS": "--crop 32", "DEVICE": "cpu",
            "THREADS": 2}


def test_env_mode_runs_skips_and_force_reruns(tmp_path, t1, real):
    data = tmp_path / "da ta é"
    seg_dir = data / "derivatives" / "S 01" / "synthseg"
    src = data / "derivatives" / "S 01" / "synthsr" / "S 01_synthsr.nii.gz"
    src.parent.mkdir(parents=True)
    nib.save(t1, str(src))
    env_file = tmp_path / "pipeline.env"
    env_file.write_text(f'# pipeline settings\r\nexport DATA_ROOT="{data}"\r\nSID=\'S 01\'  \r\n'
                        "PATH=/nowhere\r\nTHREADS=1 # a comment\r\n")
    first = stage(tmp_path=tmp_path, **{**real, "ENV_FILE": env_file})
    assert first.returncode == 0, first.stdout + first.stderr
    seg, vol = seg_dir / "S 01_synthseg.nii.gz", seg_dir / "S 01_synthseg_vols.csv"
    assert lines(first, "[INFO] input:") == [f"[INFO] input:   {src}"]
    assert lines(first, "[INFO] outputs:") == [f"[INFO] outputs: {seg}, {vol}"]
    assert lines(first, "[INFO] engine:") == ["[INFO] engine:  native, device: cpu, flags: --crop 32"]
    assert lines(first, "[RUN ] SynthSeg step 40") and lines(first, "[DONE] ")[-1].endswith(" s")
    assert "2 thread(s)" in first.stdout  # THREADS=2 from the environment wins over the file's 1
    assert sorted(p.name for p in seg_dir.iterdir()) == [seg.name, seg.name + ".provenance.json", vol.name]
    stamp = seg.stat().st_mtime_ns

    second = stage(tmp_path=tmp_path, **{**real, "ENV_FILE": env_file})
    assert second.returncode == 0 and not lines(second, "[RUN ]")
    assert lines(second, "[SKIP]") and seg.stat().st_mtime_ns == stamp

    forced = stage(tmp_path=tmp_path, **{**real, "ENV_FILE": env_file, "FORCE": 1})
    assert forced.returncode == 0 and "cache: running because FORCE=1" in forced.stdout
    assert lines(forced, "[DONE] ") and (seg_dir / (seg.name + ".provenance.json")).is_file()

    other = stage(tmp_path=tmp_path, **{**real, "ENV_FILE": env_file, "SID": "S02"})
    assert other.returncode == 1
    missing = data / "derivatives" / "S02" / "synthsr" / "S02_synthsr.nii.gz"
    hint = "(run step 30 first, or pass an image)"
    assert lines(other, "[ERR] ") == [f"[ERR] input not found: {missing} {hint}"]


def test_positional_mode_writes_beside_input_and_reruns_on_flag_change(tmp_path, t1, real):
    src = tmp_path / "scans ü" / "sub 'ject' ä.nii.gz"
    src.parent.mkdir()
    nib.save(t1, str(src))
    first = stage(src, tmp_path=tmp_path, **real)
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(p.name for p in src.parent.iterdir()) == [
        "sub 'ject' ä.nii.gz", "sub 'ject' ä_synthseg.nii.gz", "sub 'ject' ä_synthseg.nii.gz.provenance.json",
        "sub 'ject' ä_synthseg_vols.csv"]
    assert lines(stage(src, tmp_path=tmp_path, **real), "[SKIP]")
    again = stage(src, tmp_path=tmp_path, **{**real, "SYNTHSEG_FLAGS": "--crop 32 --fast"})
    assert again.returncode == 0 and "[INFO] cache: running because flags changed (fast)" in again.stdout
    assert lines(again, "[DONE] ")


def test_explicit_output_file_names_the_csv(tmp_path, t1, real):
    src = tmp_path / "t1.mgz"
    nib.save(nib.MGHImage(t1.get_fdata(dtype="float32"), t1.affine), str(src))
    out = tmp_path / "out dir" / "seg ment.nii.gz"
    proc = stage(src, out, tmp_path=tmp_path, **real)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "seg ment.nii.gz", "seg ment.nii.gz.provenance.json", "seg ment_vols.csv"]
    assert nib.load(str(out)).shape == t1.shape


@pytest.mark.parametrize("out, seg", [
    (None, "in put_synthseg.nii.gz"),
    ("res ults", "res ults/in put_synthseg.nii.gz"),
    ("res ults/", "res ults/in put_synthseg.nii.gz"),
    ("x/s.mgz", "x/s.mgz"),
])
def test_output_naming(tmp_path, out, seg):
    """Names are printed before the input is checked, so naming needs no run."""
    src = tmp_path / "in put.nii"
    proc = stage(src, *([tmp_path / out] if out else []), tmp_path=tmp_path, POSTERIORS=1)
    seg_path = tmp_path / seg
    stem = str(seg_path)[: -len(".nii.gz" if seg.endswith(".gz") else ".mgz")]
    expected = f"[INFO] outputs: {seg_path}, {stem}_vols.csv, {stem}_posteriors.nii.gz"
    assert lines(proc, "[INFO] outputs:") == [expected]
    assert proc.returncode == 1 and lines(proc, "[ERR] input not found:")


@pytest.mark.parametrize("env, message", [
    ({}, "[ERR] no input given and DATA_ROOT/SID are not set"),
    ({"ENGINE": "dock"}, "[ERR] ENGINE must be native, upstream or docker, not 'dock'"),
    ({"DEVICE": "tpu"}, "[ERR] DEVICE must be auto, cpu, cuda, mps or gpu, not 'tpu'"),
    ({"BACKEND": "jax"}, "[ERR] BACKEND must be tf, torch or auto, not 'jax'"),
    ({"SYNTHSEG_FLAGS": "--models 'a b"}, "[ERR] SYNTHSEG_FLAGS cannot be split into flags (No closing quotation)"),
])
def test_bad_settings_are_one_err_line(tmp_path, env, message):
    proc = stage(*([] if not env else [tmp_path / "x.nii.gz"]), tmp_path=tmp_path, **env)
    assert proc.returncode == 1
    assert lines(proc, "[ERR] ")[0].startswith(message) and len(lines(proc, "[ERR] ")) == 1


def test_failed_run_leaves_no_trusted_record(tmp_path, t1):
    src = tmp_path / "t1.nii.gz"
    nib.save(t1, str(src))
    seg = tmp_path / "t1_synthseg.nii.gz"
    seg.write_bytes(b"left over from an old run")
    side = tmp_path / "t1_synthseg.nii.gz.provenance.json"
    side.write_text("{}")
    proc = stage(src, tmp_path=tmp_path, SYNTHSEG_MODELS=tmp_path / "no weights", FORCE=1)
    assert proc.returncode == 1 and not side.exists()
    errors = lines(proc, "[ERR] ")
    assert len(errors) == 1 and "no weights: no such folder" in errors[0], proc.stderr


@pytest.fixture
def upstream(tmp_path) -> dict[str, object]:
    """Knobs for ENGINE=upstream with the fake checkout, which records its arguments and writes outputs."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "synthseg_2.0.h5").write_bytes(b"")
    return {"ENGINE": "upstream", "SYNTHSEG_HOME": make_checkout(tmp_path / "Synth Seg"),
            "SYNTHSEG_MODELS": models, "FAKE_WRITE": 1, "FAKE_RECORD": tmp_path / "record.json"}


def test_upstream_engine_wiring_and_cache(tmp_path, t1, upstream):
    src = tmp_path / "in dir" / "t1.nii.gz"
    src.parent.mkdir()
    nib.save(t1, str(src))
    out = tmp_path / "ref out"
    knobs = {**upstream, "DEVICE": "cpu", "THREADS": 1, "POSTERIORS": 1}
    proc = stage(src, f"{out}/", tmp_path=tmp_path, **knobs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kw = json.loads(Path(upstream["FAKE_RECORD"]).read_text())
    assert kw["path_images"] == str(src) and kw["path_segmentations"] == str(out / "t1_synthseg.nii.gz")
    assert kw["path_volumes"] == str(out / "t1_synthseg_vols.csv")
    assert kw["path_posteriors"] == str(out / "t1_synthseg_posteriors.nii.gz")
    assert kw["path_model_segmentation"] == str(Path(upstream["SYNTHSEG_MODELS"]) / "synthseg_2.0.h5")
    assert kw["_bn_patch"] is False and kw["_cuda"] == "-1" and kw["_threads"] == [1, 1]
    assert "[INFO] engine:  upstream, device: cpu" in proc.stdout
    assert lines(stage(src, f"{out}/", tmp_path=tmp_path, **knobs), "[SKIP]")

    unfused = stage(src, f"{out}/", tmp_path=tmp_path, **{**knobs, "SYNTHSEG_FLAGS": "--bn unfused"})
    assert unfused.returncode == 0 and "cache: running because flags changed (bn)" in unfused.stdout
    assert json.loads(Path(upstream["FAKE_RECORD"]).read_text())["_bn_patch"] is True


def test_upstream_engine_without_checkout(tmp_path, t1, upstream):
    src = tmp_path / "t1.nii.gz"
    nib.save(t1, str(src))
    proc = stage(src, tmp_path=tmp_path, **{**upstream, "SYNTHSEG_HOME": ""})
    assert proc.returncode == 1
    assert "[ERR] SYNTHSEG_HOME is not set" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t1_synthseg.nii.gz").exists()
