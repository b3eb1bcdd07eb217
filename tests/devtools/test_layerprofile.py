"""make profile-layers (devtools/layerprofile.py): every piece of the staged U-Net timed, FLOPs that add up to the
network's, the bare-conv comparison, and a timer that changes no value."""

from __future__ import annotations

import json

import numpy as np
import pytest

from devtools import layerprofile


def test_timed_pieces_compute_the_same_bits_and_count_every_call(weights):
    from synthseg_native.api import Segmenter

    with Segmenter(models=str(weights.need("seg2")), threads=2, backend="tf") as seg:
        staged = seg.predictor.seg
        image = np.random.default_rng(3).random((1, 64, 32, 32, 1), dtype=np.float32)
        plain = staged.predict(image)
        assert all(p.calls == 0 for p in staged.pieces)  # off by default: nothing counted
        for piece in staged.pieces:
            piece.timing = True
        timed = staged.predict(image)
        assert np.array_equal(plain, timed)
        assert all(p.calls > 0 and p.seconds > 0 for p in staged.pieces)
        by_label = {p.label: p for p in staged.pieces}
        first = by_label["unet encoder 0 conv 0"]
        assert first.calls == 64 // staged.slab and first.voxels == 64 * 32 * 32
        assert len(by_label) == len(staged.pieces)  # labels name the pieces apart


def test_profile_rows_add_up_to_the_network_flops_and_compare_with_bare_convs(weights, inputs, tmp_path, capsys):
    from synthseg_native.api import Segmenter

    models = str(weights.need("seg2"))
    out = tmp_path / "layers.json"
    rc = layerprofile.main(["--i", str(inputs["ras"]), "--models", models, "--threads", "2", "--crop", "64",
                            "--repeats", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["grid"] == [64, 64, 64] and report["cpu"]["model"]
    assert rows[-1]["piece"].startswith("rest of the network stage") and rows[-1]["seconds"] >= 0
    conv = [r for r in rows if r["gflop"]]
    assert len(conv) == 9  # 2 fine levels x (2 encoder + 2 decoder convs) + the core
    with Segmenter(models=models, threads=2, backend="tf") as seg:
        expected = seg.predictor.network_flop((64, 64, 64, 1))  # both passes, as --profile counts
    assert sum(r["gflop"] for r in conv) == pytest.approx(expected / 1e9, rel=1e-9)
    assert all(r["bare_seconds"] > 0 and r["shapes"] for r in conv)
    assert sum(r["seconds"] for r in rows) == pytest.approx(report["network_seconds"], rel=1e-6)
    assert report["network_vs_bare"] == pytest.approx(report["bare_conv_seconds"] / report["network_seconds"])
    printed = capsys.readouterr().out
    assert "| unet core (levels 2-4, whole volume) |" in printed and "% of the per-shape roofline" in printed



def test_command_line_prints_only_tagged_lines_and_the_table(weights, inputs):
    """Run as a program, TensorFlow's own start-up chatter must not reach the terminal (prepare_tensorflow first)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}  # as a user's shell: not this session's
    r = subprocess.run([sys.executable, "-m", "devtools.layerprofile", "--i", str(inputs["ras"]),
                        "--models", str(weights.need("seg2")), "--threads", "1", "--crop", "64", "--no-bare"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(line.startswith("[") for line in r.stderr.splitlines() if line.strip()), r.stderr[-3000:]
    assert "| unet encoder 0 conv 0 |" in r.stdout and "[DONE] network stage" in r.stdout


def test_bf16_profile_holds_the_network_to_bare_convs_of_its_own_precision(weights, inputs, tmp_path, capfd):
    """A bf16 network compared with fp32 bare convs would look twice as efficient as it is: the bare convs follow
    the precision the run was granted (bf16 where the CPU has it, else the fp32 it fell back to)."""
    from synthseg_native.engine.machine import cpu_has_bf16

    out = tmp_path / "layers.json"
    rc = layerprofile.main(["--i", str(inputs["ras"]), "--models", str(weights.need("seg2")), "--threads", "2",
                            "--crop", "64", "--repeats", "1", "--precision", "bf16", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    granted = "bf16" if cpu_has_bf16() else "fp32"
    assert report["precision"] == granted
    captured = capfd.readouterr()
    assert f"bare {layerprofile.BARE_DTYPES[granted]} conv 3^3 24->24" in captured.out + captured.err
    assert f"thread(s), {granted}," in captured.out  # the table's heading names the precision
    assert all(r["bare_seconds"] > 0 for r in report["rows"] if r["gflop"])
