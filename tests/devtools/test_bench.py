"""``make bench`` end to end on a tiny input (one run, no warm-up), and the FLOP counter by hand.

No timing is asserted anywhere: the tests check that every engine that can run here is benchmarked
under hyperfine, that the ones that cannot are reported as skipped, and that every report file exists
and holds what it claims (rows, peak memory, stage breakdown, roofline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from devtools import bench, benchgate, benchreport, benchtiming
from engine_fixtures import ROOT
from fake_synthseg import make_checkout
from synthseg_native.engine import architecture as arch


def test_flop_count_of_a_one_level_unet_by_hand():
    """One level: conv 1→24 (3³), conv 24→24 (3³), BatchNorm, likelihood 24→5 (1³), softmax."""
    voxels = 8 * 6 * 4
    by_hand = voxels * (24 * (2 * 27 * 1 + 1) + 24 * (2 * 27 * 24 + 1) + 5 * (2 * 24 + 1))
    assert arch.conv_flops(arch.UNet("unet", 1, 5, n_levels=1), (8, 6, 4)) == by_hand


def test_flop_count_of_the_synthseg_unet_per_voxel():
    """The 5-level SynthSeg U-Net: 311,004 FLOPs of multiply-adds plus 160.6875 bias adds per input voxel
    (levels shrink by 8 in voxel count; summed by hand over the 19 convolutions)."""
    per_voxel = arch.conv_flops(arch.UNet("unet", 1, 33), (32, 32, 32)) / 32 ** 3
    assert per_voxel == pytest.approx(311004 + 160.6875, abs=1e-9)


def test_parse_profile_lines():
    text = ("[INFO] profile /a.nii.gz: network input 96x96x96, 1.000 s\n"
            "[INFO] profile load_weights: 0.500 s (peak RSS so far 0.70 GB)\n"
            "[INFO] profile network: 12.250 s (peak RSS so far 4.90 GB)\n"
            "[INFO] profile network throughput: 1305.4 GFLOP (convolutions) in 12.250 s = 106.6 GFLOP/s\n")
    got = bench.parse_profile(text)
    assert got["stages"]["network"] == {"seconds": 12.25, "peak_rss_gb": 4.9}
    assert got["network_gflops"] == 106.6 and got["network_input"] == "96x96x96"


@pytest.fixture
def tiny(tmp_path, mni_img) -> Path:
    import nibabel as nib

    from engine_fixtures import crop_img

    path = tmp_path / "tiny scan.nii.gz"  # a space on purpose: commands go through hyperfine's shell
    nib.save(crop_img(mni_img, (74, 90, 66), (40, 44, 40)), path)
    return path


@pytest.mark.skipif(shutil.which("hyperfine") is None, reason="hyperfine (the CLI tool) is not installed; CI has it")
def test_bench_end_to_end(tmp_path, tiny, weights):
    models = weights.need("seg2")
    home = make_checkout(tmp_path / "upstream")  # a stand-in upstream checkout: the reference row runs
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (fake / "docker").chmod(0o755)
    res = tmp_path / "report"
    env = dict(os.environ, SYNTHSEG_HOME=str(home), FAKE_RECORD=str(tmp_path / "fake.json"), FAKE_WRITE="1",
               PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "devtools.bench", "--in", str(tiny), "--runs", "1",
                           "--warmup", "0", "--threads", "1", "--models", str(models), "--results", str(res),
                           "--work", str(tmp_path / "work"), "--roofline-size", "0.12", "--roofline-repeats", "1",
                           # the gate: one criterion that holds, two that cannot (the fake reference is tiny)
                           "--max-time-ratio", "1e6", "--max-rss-ratio", "1e-9", "--min-agreement", "99"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("[ERR]")]
    assert len(errors) == 2 and "gate UNMET: native MAX_RSS_RATIO" in errors[0], proc.stderr
    assert "gate UNMET: native MIN_AGREEMENT n/a" in errors[1] and "cannot compare" in errors[1], errors
    assert "[INFO] gate held: native MAX_TIME_RATIO" in proc.stdout and "gate: 1 of 3 criteria held" in proc.stdout
    assert "[SKIP] baseline: the Docker daemon is not reachable" in proc.stdout
    for name in ("hyperfine.json", "hyperfine.md", "machine.json", "profile.json", "roofline.json", "summary.json",
                 "summary.md", "chart.png"):
        assert (res / name).is_file() and (res / name).stat().st_size > 0, name
    hf = json.loads((res / "hyperfine.json").read_text())
    assert [r["command"] for r in hf["results"]] == ["native", "reference"]
    assert all(len(r["times"]) == 1 for r in hf["results"])
    assert hf["interleaved"] and [r["order"] for r in hf["rounds"]] == [["native", "reference"]]
    assert (res / "rounds" / "round-01.json").is_file()
    summary = json.loads((res / "summary.json").read_text())
    rows = {r["engine"]: r for r in summary["rows"]}
    assert rows["native"]["peak_rss_kb"] > 100_000  # TensorFlow alone is more than 100 MB
    assert rows["native"]["speedup_vs_reference"] > 0
    assert summary["skipped"]["baseline"].startswith("the Docker daemon is not reachable")
    assert {"load_weights", "preprocess", "network", "postprocess", "write"} <= set(summary["profile"]["stages"])
    assert summary["profile"]["network_gflops"] > 0
    assert [(g["criterion"], g["held"]) for g in summary["gate"]] == [
        ("MAX_TIME_RATIO", True), ("MAX_RSS_RATIO", False), ("MIN_AGREEMENT", False)]
    table = (res / "summary.md").read_text()
    assert rows["native"]["paired_ratio_vs_reference"] == pytest.approx(1 / rows["native"]["speedup_vs_reference"])
    for needle in ("| native |", "| reference |", "| baseline | skipped", "Native stage breakdown", "GFLOP/s",
                   "## Rounds", "native / reference", "in rounds",
                   "float32", "Conv3D roofline", "tensorflow: 2.15.1", "## Gate", "1 of 3 criteria held."):
        assert needle in table, needle
    assert json.loads((res / "roofline.json").read_text())["best_gflops"]["float32"] > 0
    assert (res / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the reference engine really ran through the runner: the fake upstream recorded its arguments
    assert json.loads((tmp_path / "fake.json").read_text())["path_images"] == str(tiny)
    assert not (tmp_path / "work" / "runs").exists()  # outputs of the runs are scratch


def test_bench_without_hyperfine_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert bench.main(["--results", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "[ERR] hyperfine not found" in err and "apt-get install hyperfine" in err and "never 'pip" in err


def test_one_native_engine_per_backend_and_precision(tmp_path, monkeypatch):
    """PRECISIONS="fp32 bf16" times the exact and the bf16 engine in the same run as the reference (ratios from
    different runs are not comparable on these machines); fp32 keeps the plain names the gate and reports use."""
    monkeypatch.delenv("SYNTHSEG_HOME", raising=False)
    monkeypatch.setattr(bench, "docker_unavailable", lambda: "no docker here")
    todo, skipped = bench.engines(tmp_path / "t1.nii.gz", ["--fast"], 2, "w", tmp_path, "py",
                                  ("tf", "torch"), ("fp32", "bf16"))
    names = [e.name for e in todo] + [n for n in skipped if n.startswith("native")]
    assert sorted(names) == ["native", "native-bf16", "native-torch", "native-torch-bf16"]
    by_name = {e.name: e for e in todo}
    assert "--precision" not in by_name["native"].argv
    bf16 = by_name["native-bf16"].argv
    assert bf16[bf16.index("--precision") + 1] == "bf16" and "--fast" in bf16 and "--backend" not in bf16
    assert len({e.out for e in todo}) == len(todo)  # each engine its own output folder


@pytest.mark.parametrize("extra, message", [
    (["--precisions", "fp32 fp8"], "PRECISIONS takes fp32, bf16"),
    (["--flags", "--precision bf16"], "give the precision as PRECISIONS"),
])
def test_bench_refuses_precisions_it_cannot_run(extra, message, tmp_path, tiny, capsys):
    if shutil.which("hyperfine") is None:
        pytest.skip("hyperfine (the CLI tool) is not installed; CI has it")
    rc = bench.main(["--in", str(tiny), "--results", str(tmp_path / "r"), "--work", str(tmp_path / "w"),
                     "--models", str(tmp_path), *extra])
    assert rc == 1
    assert message in capsys.readouterr().err


def test_rss_wrapper_records_the_child(tmp_path):
    record = tmp_path / "rss.jsonl"
    code = "import numpy as np; a = np.ones(60_000_000); print(a.sum())"  # ~480 MB
    rc = bench.rss_main(["--record", str(record), "--", sys.executable, "-c", code])
    assert rc == 0
    (line,) = record.read_text().splitlines()
    assert json.loads(line)["peak_rss_kb"] > 400_000


def fake_round(times: dict[str, float]) -> dict:
    return {"results": [{"command": n, "mean": t, "stddev": None, "median": t, "min": t, "max": t, "user": t / 2,
                         "system": 0.1, "times": [t], "exit_codes": [0]} for n, t in times.items()]}


def test_rounds_merge_into_hyperfines_layout_and_pair_each_run_with_its_rounds_reference():
    rounds = [fake_round({"native": 10.0, "reference": 20.0}), fake_round({"reference": 40.0, "native": 14.0}),
              fake_round({"native": 12.0, "reference": 30.0})]
    hf = benchtiming.merge_rounds(rounds, ["native", "reference"])
    native, reference = hf["results"]
    assert native["command"] == "native" and native["times"] == [10.0, 14.0, 12.0]
    assert native["mean"] == 12.0 and native["median"] == 12.0 and native["min"] == 10.0 and native["max"] == 14.0
    assert native["stddev"] == pytest.approx(2.0) and native["user"] == pytest.approx(6.0)
    assert reference["mean"] == 30.0 and hf["rounds"][1]["order"] == ["reference", "native"]
    rows = benchreport.summarise(hf, {})
    assert rows[0]["speedup_vs_reference"] == 2.5  # means: 30 / 12
    assert rows[0]["paired_ratio_vs_reference"] == 0.4  # median of 0.5, 0.35, 0.4
    assert "paired_ratio_vs_reference" not in rows[1]
    table = "\n".join(benchreport.rounds_markdown(hf))
    assert "| 2 | reference, native | 14.00 | 40.00 | 0.350 |" in table
    assert "| `native` | 12.000 ± 2.000 | 10.000 | 14.000 | 1.00 |" in benchtiming.markdown(hf)
    assert benchtiming.merge_rounds(rounds[:1], ["native", "reference"])["results"][0]["stddev"] is None


def test_rounds_rotate_the_order_and_drop_the_warm_up_rounds(tmp_path, monkeypatch):
    calls = []

    def fake_hyperfine(argv, out):
        names = [argv[i + 1] for i, a in enumerate(argv) if a == "--command-name"]
        assert argv[argv.index("--runs") + 1] == "1" and argv[argv.index("--warmup") + 1] == "0"
        calls.append(names)
        got = fake_round({n: float(len(calls)) for n in names})
        out.write_text(json.dumps(got))
        return got

    monkeypatch.setattr(benchtiming, "hyperfine", fake_hyperfine)
    cmds = [(n, f"run {n}", tmp_path / n) for n in ("a", "b", "c")]
    hf = benchtiming.run_rounds(cmds, runs=3, warmup=1, res=tmp_path)
    assert calls == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert [r["times"] for r in hf["results"]] == [[2.0, 3.0, 4.0]] * 3  # round 1 was the warm-up
    assert json.loads((tmp_path / "hyperfine.json").read_text()) == hf
    assert len(list((tmp_path / "rounds").glob("round-*.json"))) == 4 and (tmp_path / "hyperfine.md").is_file()


def test_summary_speedups_and_markdown():
    hf = {"results": [{"command": "native", "mean": 10.0, "stddev": 1.0, "min": 9.0, "max": 11.0, "times": [9, 11]},
                      {"command": "reference", "mean": 25.0, "stddev": 2.0, "min": 23.0, "max": 27.0,
                       "times": [23, 27]}]}
    rows = benchreport.summarise(hf, {"native": [2 * 1024 ** 2, 3 * 1024 ** 2], "reference": [9 * 1024 ** 2]})
    assert rows[0]["speedup_vs_reference"] == 2.5 and rows[0]["peak_rss_kb"] == 3 * 1024 ** 2
    md = benchreport.summary_markdown(rows, {"baseline": "no docker"}, {"cpu": "x"}, {}, None,
                                {"date": "d", "input": "i", "flags": [], "threads": 2, "runs": 2, "warmup": 0,
                                 "test_weights": True, "commands": []})
    assert "| native | 10.00 ± 1.00 | 9.00 | 11.00 | 2.50× | — | 3.00 GiB |" in md
    assert "| baseline | skipped: no docker" in md and "seeded random test weights" in md
    assert np.isfinite(rows[1]["mean_s"])


# -- the gate -----------------------------------------------------------------------------------------------------
def gate_rows(native_s: float = 40.0, native_rss: int = 5 * 2**20) -> list[dict]:
    return [{"engine": "native", "mean_s": native_s, "peak_rss_kb": native_rss},
            {"engine": "native-torch", "mean_s": 60.0, "peak_rss_kb": 7 * 2**20},
            {"engine": "reference", "mean_s": 100.0, "peak_rss_kb": 20 * 2**20}]


def segs(tmp_path: Path, flipped: int) -> dict[str, Path]:
    import nibabel as nib

    ref = np.zeros((10, 10, 10), dtype=np.int16)
    ref[2:8, 2:8, 2:8] = 17
    out = {}
    for name, n in (("reference", 0), ("native", 0), ("native-torch", flipped)):
        data = ref.copy()
        data.reshape(-1)[:n] = 99
        out[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.eye(4)), out[name])
    return out


def test_gate_verdicts_per_engine_and_criterion(tmp_path):
    criteria = benchgate.Criteria(max_time_ratio=0.5, max_rss_ratio=0.3, min_agreement=99.5)
    verdicts = benchgate.evaluate(criteria, gate_rows(), segs(tmp_path, flipped=10), {})
    found = {(v.engine, v.criterion): (round(v.value, 4), v.held) for v in verdicts}
    assert found == {("native", "MAX_TIME_RATIO"): (0.4, True), ("native", "MAX_RSS_RATIO"): (0.25, True),
                     ("native", "MIN_AGREEMENT"): (100.0, True),
                     ("native-torch", "MAX_TIME_RATIO"): (0.6, False), ("native-torch", "MAX_RSS_RATIO"): (0.35, False),
                     ("native-torch", "MIN_AGREEMENT"): (99.0, False)}
    line = next(v for v in verdicts if v.engine == "native-torch" and v.criterion == "MIN_AGREEMENT").line()
    assert line == "gate UNMET: native-torch MIN_AGREEMENT 99 (limit >= 99.5; voxels labelled as the reference, %)"
    md = benchgate.markdown(verdicts)
    assert "| native-torch | MAX_TIME_RATIO | 0.6 | ≤ 0.5 | **unmet** |" in md and "3 of 6 criteria held." in md


def test_gate_without_a_reference_is_unmet_not_skipped(tmp_path):
    rows = [r for r in gate_rows() if r["engine"] == "native"]
    criteria = benchgate.Criteria(max_time_ratio=0.4, max_rss_ratio=0.3, min_agreement=100)
    verdicts = benchgate.evaluate(criteria, rows, {}, {"reference": "SYNTHSEG_HOME is not set"})
    assert [v.held for v in verdicts] == [False, False, False]
    assert all("no reference in this run: SYNTHSEG_HOME is not set" in v.line() for v in verdicts)
    assert benchgate.evaluate(benchgate.Criteria(), rows, {}, {}) == []


@pytest.mark.parametrize("criteria, message", [
    (benchgate.Criteria(max_time_ratio=0), "MAX_TIME_RATIO must be > 0, not 0"),
    (benchgate.Criteria(min_agreement=101), "MIN_AGREEMENT is a percentage (at most 100), not 101"),
])
def test_gate_criteria_are_checked(criteria, message, tmp_path, capsys):
    assert criteria.check() == message
    assert bench.main(["--results", str(tmp_path), *(
        ["--max-time-ratio", "0"] if criteria.max_time_ratio is not None else ["--min-agreement", "101"])]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"[ERR] {message}"]
