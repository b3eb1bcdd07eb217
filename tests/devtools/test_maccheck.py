"""make mac-check on Linux, the CPU standing in for the Apple GPU: doctor, each backend on "CPU" and "GPU", the
agreement of the two (here exact), the machine's facts, one folder to send back."""

from __future__ import annotations

import json

from devtools import maccheck


def test_mac_check_end_to_end_with_the_cpu_standing_in(weights, tmp_path, monkeypatch):
    from synthseg_native.engine import selfcheck

    monkeypatch.setenv(selfcheck.ENV_CACHE, str(tmp_path / "checks.json"))
    out = tmp_path / "mac-check"
    models = weights.need("seg2")
    assert maccheck.main(["--device", "cpu", "--modes", "default", "--crop", "64", "--threads", "2", "--out",
                          str(out), "--models", str(models)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert [(r["backend"], r["role"]) for r in runs] == [("tf", "cpu"), ("tf", "gpu"), ("torch", "cpu"),
                                                         ("torch", "gpu")]
    assert all(r["ok"] and r["wall_s"] > 0 and r["peak_rss_bytes"] > 1e8 for r in runs)
    for r in runs[1::2]:
        assert r["agreement"]["voxels_differ"] == 0 and r["agreement"]["max_abs_posterior_diff"] == 0.0
    assert summary["doctor_exit"] == 0 and "self-check against the CPU" in (out / "doctor.txt").read_text()
    assert summary["machine"]["torch"].startswith("2.") and summary["machine"]["os"]
    table = (out / "summary.md").read_text()
    assert "| tf | GPU | CPU (x86_64) | default |" in table or "| tf | GPU | CPU (" in table
    sent = [f for f in out.rglob("*") if f.is_file()]  # the folder to send back: numbers and logs, no arrays
    assert not [f for f in sent if f.suffix in (".npz", ".h5", ".gz")], sent
    assert sum(f.stat().st_size for f in sent) < 2_000_000
