"""Issue 8: every failure is one [ERR] line naming the file and the cause, a non-zero exit, no partial
output, and nothing else in the batch lost. One test (or one batch) per case of docs/reliability.md.

The network runs for real with seeded test weights on a 40x48x40 MNI crop (``--crop 32 --fast``: a
second or two per image). Exit codes, signals and resource limits are checked in subprocesses; the
rest runs in-process through ``cli.main`` to keep the suite fast.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine_fixtures import crop_img
from synthseg_native.cli import main
from synthseg_native.engine import memory
from synthseg_native.engine.preprocess import preprocess
from synthseg_native.engine.weights import MODEL_FILES, read_weights, write_weights
from synthseg_native.errors import LockedError
from synthseg_native.io.atomic import stale_temps
from synthseg_native.io.images import load_image, peek_image
from synthseg_native.io.locking import OutputLock, lock_path

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--crop", "32", "--fast", "--threads", "2"]


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def t1(mni_img) -> nib.Nifti1Image:
    return crop_img(mni_img, (70, 80, 60), (40, 48, 40))


@pytest.fixture
def models(weights) -> Path:
    return weights.need("seg2")


def engine(*args: object, env: dict | None = None, limit_fsize: int | None = None, **kw) -> subprocess.Popen:
    """``python -m synthseg_native`` in a subprocess (stdout/stderr as bytes: file names need not be UTF-8)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "synthseg_src"), str(ROOT / "tests")])

    def limits() -> None:
        if limit_fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

    return subprocess.Popen([sys.executable, *map(str, args)], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=limits, **kw)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="backslashreplace"), err.decode(errors="backslashreplace")


def err_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("[ERR] ")]


def files_in(folder: Path) -> list[str]:
    """Everything in ``folder``, hidden temporaries and lock files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def save(img: nib.Nifti1Image | np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    if isinstance(img, np.ndarray):
        img = nib.Nifti1Image(img, affine)
    nib.save(img, str(path))
    return path


def raw_nifti(path: Path, data: np.ndarray, affine: np.ndarray, **fields: object) -> Path:
    """A .nii written byte by byte, so that header fields nibabel would correct (an affine with NaN or
    zeros) end up in the file as given."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    hdr.set_sform(affine, 1)
    hdr.set_qform(affine, 1)
    for key, value in fields.items():
        hdr[key] = value
    hdr["vox_offset"] = 352
    buf = io.BytesIO()
    hdr.write_to(buf)
    buf.write(b"\0" * (352 - buf.tell()))
    buf.write(data.tobytes(order="F"))
    path.write_bytes(buf.getvalue())
    return path


def make_unwritable(folder: Path) -> None:
    """chmod 555; as root (which ignores modes) the immutable attribute; skip where neither works."""
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    probe = folder / "probe"
    try:
        probe.touch()
    except OSError:
        return
    probe.unlink()
    make_writable(folder)
    pytest.skip("cannot make a folder unwritable here (root without chattr on this file system)")


def make_writable(folder: Path) -> None:
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True, check=False)
    folder.chmod(0o755)


# ------------------------------------------------------------------------------ usage errors (exit 2)


@pytest.mark.parametrize("case, argv, message", [
    ("input missing", ["--i", "{d}/missing.nii.gz", "--o", "{d}/s.nii.gz"], "input file does not exist"),
    ("folder without images", ["--i", "{d}/empty", "--o", "{d}/out"], "no .nii, .nii.gz or .mgz image found"),
    ("unsupported extension", ["--i", "{d}/scan.img", "--o", "{d}/s.nii.gz"], "unsupported extension"),
    ("crop count", ["--i", "{d}/t1.nii.gz", "--o", "{d}/s.nii.gz", "--crop", "64", "64"], "--crop takes 1 or 3"),
    ("crop not positive", ["--i", "{d}/t1.nii.gz", "--o", "{d}/s.nii.gz", "--crop", "0"], "must be positive"),
    ("crop not a number", ["--i", "{d}/t1.nii.gz", "--o", "{d}/s.nii.gz", "--crop", "1e2"], "invalid int value"),
    ("unknown flag", ["--i", "{d}/t1.nii.gz", "--o", "{d}/s.nii.gz", "--fastest"], "unrecognized arguments"),
    ("threads", ["--i", "{d}/t1.nii.gz", "--o", "{d}/s.nii.gz", "--threads", "0"], "--threads must be >= 1"),
    ("conflicting flags", ["--i", "{d}/t1.nii.gz", "--o", "{d}/s.nii.gz", "--robust", "--v1"],
     "--robust cannot be used with --v1"),
    ("keepgeom upstream", ["--i", "{d}/t1.nii.gz", "--o", "{d}/s.nii.gz", "--engine", "upstream", "--keepgeom"],
     "the upstream engine runs upstream SynthSeg, which has none of them"),
    ("folder in, file out", ["--i", "{d}/in", "--o", "{d}/s.nii.gz"], "must be a folder when --i is a folder"),
    ("file in, list out", ["--i", "{d}/t1.nii.gz", "--o", "{d}/o.txt"], "can only be a .txt list"),
    ("list in, file out", ["--i", "{d}/in.txt", "--o", "{d}/s.nii.gz"], "must be a .txt list"),
    ("list lengths", ["--i", "{d}/in.txt", "--o", "{d}/one.txt"], "has 1 entries, --i has 2"),
    ("output is the input", ["--i", "{d}/t1.nii.gz", "--o", "{d}/t1.nii.gz"], "would overwrite an input image"),
    ("two outputs one file", ["--i", "{d}/t1.nii.gz", "--o", "{d}/s.nii.gz", "--post", "{d}/s.nii.gz"],
     "is both the --o of"),
])
def test_usage_errors(tmp_path, t1, case, argv, message):
    save(t1, tmp_path / "t1.nii.gz")
    (tmp_path / "empty").mkdir()
    (tmp_path / "in").mkdir()
    save(t1, tmp_path / "in" / "a.nii.gz")
    (tmp_path / "scan.img").write_bytes(b"x")
    (tmp_path / "in.txt").write_text(f"{tmp_path}/t1.nii.gz\n{tmp_path}/t1.nii.gz\n")
    (tmp_path / "one.txt").write_text(f"{tmp_path}/s.nii.gz\n")
    before = files_in(tmp_path)
    rc, out, err = finish(engine("-m", "synthseg_native", *[a.format(d=tmp_path) for a in argv]))
    assert rc == 2, (case, err)
    assert len(err_lines(err)) == 1 and message in err_lines(err)[0], (case, err)
    assert "Traceback" not in err and "usage:" not in err
    assert files_in(tmp_path) == before


# --------------------------------------------------------------------- bad images in one folder batch


def test_bad_images_fail_one_by_one_and_the_batch_goes_on(models, t1, tmp_path, capsys):
    data, aff = np.asarray(t1.dataobj), t1.affine
    src = tmp_path / "in"
    src.mkdir()
    good = save(t1, src / "good.nii.gz")
    raw = good.read_bytes()
    (src / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (src / "not_an_image.nii.gz").write_bytes(b"this is a text file")
    save(t1, src / "mismatch.nii")
    (src / "mismatch.nii").write_bytes((src / "mismatch.nii").read_bytes()[:-4000])
    gz_mismatch = raw_nifti(tmp_path / "gz_mismatch.nii", data, aff)
    hdr = nib.Nifti1Header.from_fileobj(open(gz_mismatch, "rb"))
    hdr.set_data_shape((40, 48, 41))  # one slice more than the data holds
    body = io.BytesIO()
    hdr.write_to(body)  # 348 bytes and the 4-byte extension flag
    assert body.tell() == 352
    (src / "gz_mismatch.nii.gz").write_bytes(gzip.compress(body.getvalue() + gz_mismatch.read_bytes()[352:]))
    raw_nifti(src / "nan_voxel_size.nii", data, aff, pixdim=[1, 1, np.nan, 1, 1, 0, 0, 0])
    save(data[:, :, 20], src / "flat_2d.nii.gz", aff)
    thick = aff.copy()
    thick[:3, 2] *= 10
    save(data[:, :, 10:40:10], src / "three_slices.nii.gz", thick)  # 3 slices of 10 mm
    save(data[:5, :5, :5], src / "tiny_5x5x5.nii.gz", aff)
    save(np.zeros_like(data), src / "all_zero.nii.gz", aff)
    inf = data.copy()
    inf[3, 4, 5] = np.inf
    save(inf, src / "inf.nii.gz", aff)
    huge = data.astype(np.float64) / data.max() * 1.5e308
    huge[0, 0, 0] = -1.5e308
    save(huge, src / "overflow.nii.gz", aff)
    save((data + 1j * data).astype(np.complex64), src / "complex.nii.gz", aff)
    rgb = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    save(rgb, src / "rgb.nii.gz", aff)
    raw_nifti(src / "singular_affine.nii", data, aff, srow_x=[0, 0, 0, 0], srow_y=[0, 0, 0, 0],
              srow_z=[0, 0, 0, 0], qform_code=0)
    raw_nifti(src / "nan_affine.nii", data, aff, srow_x=[np.nan, 0, 0, 0], qform_code=0)
    # these are segmented, with a warning where the input is not what SynthSeg expects
    nan = data.copy()
    nan[:4] = np.nan
    save(nan, src / "nan_voxels.nii.gz", aff)
    save(np.stack([data] * 12, axis=-1), src / "multiframe_4d.nii.gz", aff)
    save(data.astype(np.float64) * 1e30, src / "extreme.nii.gz", aff)

    out, vol = tmp_path / "out", tmp_path / "vols.csv"
    rc = main(["--i", str(src), "--o", str(out), "--vol", str(vol), "--models", str(models), *QUICK])
    err = capsys.readouterr().err
    assert rc == 1
    expected = {
        "truncated.nii.gz": "truncated or corrupt compressed file",
        "not_an_image.nii.gz": "cannot read image",
        "mismatch.nii": "header/data size mismatch",
        "gz_mismatch.nii.gz": "header/data size mismatch: the header describes 314880 bytes of voxels, the file "
                              "holds 307200",
        "nan_voxel_size.nii": "voxel sizes in the header are not finite",
        "flat_2d.nii.gz": "input should have 3 dimensions, has 2",
        "three_slices.nii.gz": "3D with at most 3 slices",
        "tiny_5x5x5.nii.gz": "too small for a head scan",
        "all_zero.nii.gz": "image is constant (every voxel is 0)",
        "inf.nii.gz": "1 infinite voxel(s)",
        "overflow.nii.gz": "overflows double precision",
        "complex.nii.gz": "complex-valued voxels (complex64) are not supported",
        "rgb.nii.gz": "RGB/structured voxel type",
        "singular_affine.nii": "affine is singular or not finite",
        "nan_affine.nii": "affine is singular or not finite",
    }
    per_file = [ln for ln in err_lines(err) if "image(s) failed" not in ln]
    for name, message in expected.items():
        mine = [ln for ln in per_file if ln.startswith(f"[ERR] {src / name}: ")]
        assert len(mine) == 1 and message in mine[0], (name, mine, err)
    assert len(per_file) == len(expected), err
    assert "Traceback" not in err
    assert "[WARN] " in err and "NaN voxel(s)" in err and "4D input with 12 frames" in err
    done = ["extreme", "good", "multiframe_4d", "nan_voxels"]
    assert files_in(out) == [f"{n}_synthseg.nii.gz" for n in done]
    rows = list(csv.reader(open(vol)))
    assert [r[0] for r in rows[1:]] == done
    # intensities are only ever seen through the 0.5-99.5 percentile rescale: a 1e30 scale is the same scan
    seg_good = np.asanyarray(nib.load(str(out / "good_synthseg.nii.gz")).dataobj)
    seg_extreme = np.asanyarray(nib.load(str(out / "extreme_synthseg.nii.gz")).dataobj)
    assert np.mean(seg_good == seg_extreme) > 0.99


def test_anisotropic_1x1x10_mm_is_resampled(models, mni_img, tmp_path):
    block = crop_img(mni_img, (70, 80, 30), (40, 48, 120))
    aff = block.affine.copy()
    aff[:3, 2] *= 10
    src = save(np.asarray(block.dataobj)[:, :, ::10], tmp_path / "thick.nii.gz", aff)  # 12 slices of 10 mm
    out = tmp_path / "seg.nii.gz"
    assert main(["--i", str(src), "--o", str(out), "--models", str(models), *QUICK]) == 0
    seg = nib.load(str(out))
    assert seg.shape == (40, 48, 120)
    assert np.allclose(np.linalg.norm(seg.affine[:3, :3], axis=0), 1.0)


def test_txt_list_with_blank_lines_missing_and_unsupported_entries(models, t1, tmp_path, capsys):
    good = save(t1, tmp_path / "good.nii.gz")
    (tmp_path / "notes.txt.img").write_bytes(b"x")
    ins, outs = tmp_path / "in.txt", tmp_path / "out.txt"
    ins.write_text(f"\n{tmp_path}/missing.nii.gz\n\n{good}\n   \n{tmp_path}/notes.txt.img\n")
    outs.write_text(f"{tmp_path}/a.nii.gz\n{tmp_path}/b.nii.gz\n\n{tmp_path}/c.nii.gz\n")
    assert main(["--i", str(ins), "--o", str(outs), "--models", str(models), *QUICK]) == 1
    err = err_lines(capsys.readouterr().err)
    assert err[0] == f"[ERR] {tmp_path}/missing.nii.gz: input file does not exist"
    assert err[1].startswith(f"[ERR] {tmp_path}/notes.txt.img: unsupported extension")
    assert "2 of 3 image(s) failed" in err[2] and len(err) == 3
    assert (tmp_path / "b.nii.gz").is_file()
    assert not (tmp_path / "a.nii.gz").exists() and not (tmp_path / "c.nii.gz").exists()


# ------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("damage, message", [
    ("missing", "weights file synthseg_2.0.h5 not found"),
    ("layer", "layer 'unet_conv_uparm_6_0' is missing from the weights file"),
    ("shape", "layer 'unet_conv_downarm_0_0' kernel has shape (3, 3, 3, 1, 7), the network expects"),
    ("nan", "layer 'unet_bn_up_1' moving_variance has NaN or infinite values"),
    ("truncated", "not a readable HDF5 weights file"),
    ("garbled", "corrupt HDF5 weights file"),
])
def test_bad_weights_fail_before_any_image(models, t1, tmp_path, capsys, monkeypatch, damage, message):
    for var in ("SYNTHSEG_MODELS", "FREESURFER_HOME", "SYNTHSEG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models"
    folder.mkdir()
    target = folder / MODEL_FILES["seg2"]
    good = (models / MODEL_FILES["seg2"]).read_bytes()
    if damage in ("layer", "shape", "nan"):
        arrays = read_weights(models / MODEL_FILES["seg2"])
        if damage == "layer":
            del arrays["unet_conv_uparm_6_0"]
        elif damage == "shape":
            arrays["unet_conv_downarm_0_0"]["kernel"] = np.zeros((3, 3, 3, 1, 7), np.float32)
        else:
            arrays["unet_bn_up_1"]["moving_variance"][3] = np.nan
        write_weights(target, arrays)
    elif damage == "truncated":
        target.write_bytes(good[:100_000])
    elif damage == "garbled":  # the superblock survives, object headers do not
        garbled = bytearray(good)
        for offset in range(20_000, len(garbled), 50_000):
            garbled[offset:offset + 64] = b"\xff" * 64
        target.write_bytes(bytes(garbled))
    src, out = save(t1, tmp_path / "t1.nii.gz"), tmp_path / "out"
    assert main(["--i", str(src), "--o", str(out), "--models", str(folder), *QUICK]) == 1
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0], err
    assert damage == "missing" or str(target) in err[0]
    assert files_in(out) == []


# -------------------------------------------------------------------------------------------- outputs


def test_unwritable_output_folder_fails_before_the_work(models, t1, tmp_path, capsys):
    src = save(t1, tmp_path / "t1.nii.gz")
    locked, free = tmp_path / "locked", tmp_path / "free"
    locked.mkdir()
    ins, outs = tmp_path / "in.txt", tmp_path / "out.txt"
    ins.write_text(f"{src}\n{src}\n")
    outs.write_text(f"{locked}/a.nii.gz\n{free}/b.nii.gz\n")
    make_unwritable(locked)
    try:
        rc = main(["--i", str(ins), "--o", str(outs), "--models", str(models), *QUICK])
    finally:
        make_writable(locked)
    captured = capsys.readouterr()
    assert rc == 1
    err = err_lines(captured.err)
    assert err[0] == f"[ERR] {src}: {locked}/a.nii.gz: output folder {locked} is not writable"
    assert files_in(locked) == [] and files_in(free) == ["b.nii.gz"]
    assert captured.out.count("[DONE]") == 1


def test_output_path_that_is_a_directory(models, t1, tmp_path, capsys):
    src = save(t1, tmp_path / "t1.nii.gz")
    (tmp_path / "seg.nii.gz").mkdir()
    assert main(["--i", str(src), "--o", str(tmp_path / "seg.nii.gz"), "--models", str(models), *QUICK]) == 1
    err = err_lines(capsys.readouterr().err)
    assert err == [f"[ERR] {src}: {tmp_path}/seg.nii.gz: output path is an existing directory"]
    assert files_in(tmp_path / "seg.nii.gz") == []
    (tmp_path / "vols.csv").mkdir()
    rc = main(["--i", str(src), "--o", str(tmp_path / "s.nii.gz"), "--vol", str(tmp_path / "vols.csv"),
               "--models", str(models), *QUICK])
    assert rc == 1 and not (tmp_path / "s.nii.gz").exists()
    assert err_lines(capsys.readouterr().err) == [f"[ERR] {tmp_path}/vols.csv: output path is an existing directory"]


def test_disk_full_leaves_nothing_behind(models, t1, tmp_path):
    """RLIMIT_FSIZE (ulimit -f) makes writes past 1 MB fail (EFBIG) like a full disk (ENOSPC) would: the
    segmentation (small, staged first) must not appear without the posteriors (10 MB, uncompressed) that
    could not be written."""
    src = save(t1, tmp_path / "t1.nii.gz")
    out = tmp_path / "out"
    proc = engine("-m", "synthseg_native", "--i", src, "--o", out / "seg.nii.gz", "--post", out / "post.nii",
                  "--vol", out / "vols.csv", "--models", models, *QUICK, limit_fsize=1 << 20)
    rc, _, err = finish(proc)
    assert rc == 1
    assert err_lines(err) == [f"[ERR] {src}: {out}/post.nii: cannot write (File too large)"], err
    assert files_in(out) == []


def test_crop_not_a_multiple_of_32_is_rounded_up_like_upstream(models, t1, tmp_path, capsys):
    src = save(t1, tmp_path / "t1.nii.gz")
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    assert main(["--i", str(src), "--o", str(a), "--models", str(models), "--fast", "--crop", "20", "40", "33"]) == 0
    assert "[INFO] --crop 20 40 33 is rounded up to 32 64 64" in capsys.readouterr().out
    assert main(["--i", str(src), "--o", str(b), "--models", str(models), "--fast", "--crop", "32", "64", "64"]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_paths_with_spaces_quotes_dollars_newlines_and_non_ascii(models, t1, tmp_path):
    src = tmp_path / "in $HOME 'q' \"dq\" é"
    src.mkdir()
    names = ["with space.nii.gz", "it's \"quoted\".nii.gz", "$HOME`id`.nii.gz", "new\nline.nii.gz",
             "hippocampe_été_脑.nii.gz", os.fsdecode(b"latin1_\xe9.nii.gz")]
    for name in names:
        save(t1, src / name)
    out = tmp_path / "out dir $x"
    rc, stdout, err = finish(engine("-m", "synthseg_native", "--i", src, "--o", out, "--vol", out / "v.csv",
                                    "--models", models, *QUICK))
    assert rc == 0, err
    assert all(ln.startswith("[") for ln in (stdout + err).splitlines()), "every log line is one line"
    assert stdout.count("[DONE] ") == len(names)
    assert "new\\nline.nii.gz" in stdout
    assert sorted(os.listdir(out)) == sorted([n.replace(".nii.gz", "_synthseg.nii.gz") for n in names] + ["v.csv"])


def test_stage_script_with_quotes_and_dollars_in_paths(models, t1, tmp_path):
    src = tmp_path / "sub $1 'a' \"b\" ü" / "t1 x.nii.gz"
    src.parent.mkdir()
    save(t1, src)
    env = {k: v for k, v in os.environ.items() if k not in ("SYNTHSEG_FLAGS", "FORCE", "DATA_ROOT", "SID")}
    env.update(PYTHON=sys.executable, ENV_FILE=str(tmp_path / "no.env"), SYNTHSEG_MODELS=str(models),
               SYNTHSEG_FLAGS="--crop 32 --fast", DEVICE="cpu", THREADS="2", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "40_synthseg_native.sh"), str(src)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (src.parent / "t1 x_synthseg.nii.gz").is_file()
    assert (src.parent / "t1 x_synthseg.nii.gz.provenance.json").is_file()


# ------------------------------------------------------------------------------ interrupts and kills


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupt_cleans_up_and_exits_128_plus_signal(models, inputs, tmp_path, sig):
    """Ctrl-C, a scheduler's SIGTERM or a closed terminal's SIGHUP while an image is processed: one [ERR] line,
    no traceback, and no file at all in the output folder (no output, no temporary, no lock)."""
    out = tmp_path / "out"
    proc = engine("-m", "synthseg_native", "--i", inputs["anatomical"], "--o", out / "seg.nii.gz",
                  "--post", out / "post.nii.gz", "--vol", out / "vols.csv", "--models", models, "--threads", "2")
    for line in proc.stdout:  # the default (flip + topology) run on the 2 mm scan takes several seconds
        if line.startswith(b"[RUN ]"):
            break
    proc.send_signal(sig)
    rc, _, err = finish(proc)
    assert rc == 128 + sig
    assert err_lines(err) == [f"[ERR] interrupted ({sig.name}) while segmenting {inputs['anatomical']}: no "
                              "partial output left; 0 of 1 image(s) had finished"], err
    assert "Traceback" not in err
    assert files_in(out) == []


def test_interrupt_while_writing_removes_the_staged_files(models, t1, tmp_path, monkeypatch, capsys):
    """Deterministic version of the above: Ctrl-C arrives inside the write of the posteriors, after the
    segmentation was staged and while the posteriors' temporary is half written."""
    real_save = nib.save

    def save_then_interrupt(img, filename):
        if "post" in os.path.basename(filename):
            Path(filename).write_bytes(b"half a file")
            raise KeyboardInterrupt
        real_save(img, filename)

    monkeypatch.setattr(nib, "save", save_then_interrupt)
    src, out = save(t1, tmp_path / "t1.nii.gz"), tmp_path / "out"
    rc = main(["--i", str(src), "--o", str(out / "seg.nii.gz"), "--post", str(out / "post.nii.gz"),
               "--vol", str(out / "v.csv"), "--models", str(models), *QUICK])
    assert rc == 130
    assert "[ERR] interrupted (SIGINT) while segmenting" in capsys.readouterr().err
    assert files_in(out) == []


@pytest.mark.parametrize("where", ["taking a lock", "creating a temporary"])
def test_signal_at_the_worst_moment_leaves_nothing(models, t1, tmp_path, monkeypatch, capsys, where):
    """A SIGTERM delivered inside the few system calls that create a lock file or a temporary (found as a
    flaky leftover lock file) is held back until they are recorded for clean-up, then cleans up."""
    from synthseg_native.io import atomic as sio
    from synthseg_native.io import locking

    def kill_then(real):
        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler at the next bytecode
            return result
        return wrapper

    if where == "taking a lock":
        monkeypatch.setattr(locking.fcntl, "flock", kill_then(locking.fcntl.flock))
    else:
        monkeypatch.setattr(sio.tempfile, "mkstemp", kill_then(sio.tempfile.mkstemp))
    src, out = save(t1, tmp_path / "t1.nii.gz"), tmp_path / "out"
    rc = main(["--i", str(src), "--o", str(out / "seg.nii.gz"), "--post", str(out / "post.nii.gz"),
               "--models", str(models), *QUICK])
    assert rc == 128 + signal.SIGTERM
    assert "[ERR] interrupted (SIGTERM)" in capsys.readouterr().err
    assert files_in(out) == []


def test_deferred_signals_hold_a_signal_until_the_block_ends():
    from synthseg_native.io.atomic import deferred_signals

    seen: list[str] = []

    def handler(signum, frame):
        seen.append("handler")
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # many bytecodes: the handler would have run by now
                    pass
                seen.append("block done")
        assert seen == ["block done", "handler"]
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, previous)


BLOCK_IN_SAVE = """
import sys, time
import nibabel
real_save = nibabel.save
def save_and_hang(img, filename):
    real_save(img, filename)
    print("STAGED", filename, flush=True)
    time.sleep(600)
nibabel.save = save_and_hang
from synthseg_native.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_blocked_writer(src: Path, seg: Path, models: Path) -> tuple[subprocess.Popen, Path]:
    """A run that stops for good right after writing its segmentation's temporary (holding its locks)."""
    proc = engine("-c", BLOCK_IN_SAVE, "--i", src, "--o", seg, "--models", models, *QUICK)
    for line in proc.stdout:
        if line.startswith(b"STAGED "):
            return proc, Path(os.fsdecode(line[7:].rstrip(b"\n")))
    proc.kill()
    raise AssertionError(finish(proc)[2])


def test_sigkill_while_writing_leaves_no_trusted_output(models, t1, tmp_path):
    src, seg = save(t1, tmp_path / "t1.nii.gz"), tmp_path / "out" / "t1_synthseg.nii.gz"
    proc, tmp = start_blocked_writer(src, seg, models)
    assert tmp.parent == seg.parent and tmp.name.startswith(".t1_synthseg.nii.gz.") and tmp.is_file()
    proc.kill()
    proc.wait()
    # what the kill leaves: a hidden temporary and a lock file, never a file under the output's name
    assert not seg.exists() and stale_temps(seg) == [tmp] and lock_path(seg).exists()
    # the stage's cache does not trust it ...
    args = ["--i", str(src), "--o", str(seg), "--models", str(models), *QUICK]
    check = subprocess.run([sys.executable, "-m", "synthseg_native", "provenance", "check", "--", *args],
                           capture_output=True, text=True, check=False,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "synthseg_src")})
    assert check.returncode == 3, check.stderr
    # ... and the next run takes the dead run's lock, sweeps its temporary and writes the output
    assert main(args) == 0
    assert files_in(seg.parent) == ["t1_synthseg.nii.gz"]


def test_second_run_on_the_same_output_fails_clearly(models, t1, tmp_path):
    src, seg = save(t1, tmp_path / "t1.nii.gz"), tmp_path / "out" / "seg.nii.gz"
    first, tmp = start_blocked_writer(src, seg, models)
    try:
        rc, out, err = finish(engine("-m", "synthseg_native", "--i", src, "--o", seg, "--models", models, *QUICK))
    finally:
        first.kill()
        first.wait()
    assert rc == 1
    lines = err_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"[ERR] {src}: {seg}: another run (pid {first.pid} on "), err
    assert lines[0].endswith("is writing this output; not touched (wait for it to finish, or stop it)")
    assert not seg.exists() and tmp.exists(), "the second run must not touch the first run's files"


def test_output_lock_is_exclusive_and_released(tmp_path, models, t1, capsys):
    target = tmp_path / "seg.nii.gz"
    with OutputLock(target):
        assert "pid" in lock_path(target).read_text()
        with pytest.raises(LockedError, match="another run .* is writing this output"):
            OutputLock(target).acquire()
        # a batch sharing one volume table with a running batch stops before any work
        src = save(t1, tmp_path / "t1.nii.gz")
        vol = tmp_path / "vols.csv"
        with OutputLock(vol):
            rc = main(["--i", str(src), "--o", str(tmp_path / "other.nii.gz"), "--vol", str(vol),
                       "--models", str(models), *QUICK])
        assert rc == 1 and "is writing this output" in capsys.readouterr().err
        assert not (tmp_path / "other.nii.gz").exists()
    assert not lock_path(target).exists()
    with OutputLock(target):
        pass


# -------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("shape, zooms, crop", [
    ((72, 88, 76), (1.0, 1.0, 1.0), None),
    ((72, 88, 26), (1.0, 1.0, 3.0), None),
    ((150, 170, 140), (1.0, 1.0, 1.0), None),
    ((60, 60, 40), (1.5, 1.5, 2.2), None),
    ((150, 170, 140), (1.0, 1.0, 1.0), [64, 64, 64]),
    ((150, 170, 140), (0.9, 0.9, 1.2), [50, 70, 200]),
])
def test_memory_estimate_uses_the_grid_preprocessing_produces(tmp_path, shape, zooms, crop):
    aff = np.diag([*zooms, 1.0])
    path = save(np.random.RandomState(0).rand(*shape).astype(np.float32), tmp_path / "x.nii.gz", aff)
    prep = preprocess(load_image(path), str(path), crop=crop, min_pad=crop)
    assert memory.network_grid(peek_image(path), crop) == prep.image.shape[1:4]


def test_memory_too_small_is_refused_with_a_crop_hint(models, t1, tmp_path, capsys, monkeypatch):
    src, seg = save(t1, tmp_path / "t1.nii.gz"), tmp_path / "out" / "seg.nii.gz"
    monkeypatch.setenv(memory.ENV_OVERRIDE, "0.5")
    assert main(["--i", str(src), "--o", str(seg), "--models", str(models), "--threads", "2"]) == 1
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"[ERR] {src}: needs about ")
    assert "network grid 128x128x128" in err[0] and "only 0.5 GB is available" in err[0] and "--crop" in err[0]
    assert files_in(seg.parent) == []
    monkeypatch.setenv(memory.ENV_OVERRIDE, "0")  # 0 turns the check off
    assert main(["--i", str(src), "--o", str(seg), "--models", str(models), *QUICK]) == 0


def test_available_memory_is_read_from_the_system(monkeypatch):
    monkeypatch.delenv(memory.ENV_OVERRIDE, raising=False)
    room, where = memory.available()
    assert room is not None and room > 1e8, where
    from synthseg_native.config import Options
    from synthseg_native.engine.spec import ModelSpec

    est = memory.estimate(memory.ImageInfo((512, 512, 400), (0.5, 0.5, 0.5), np.dtype("f4")),
                          ModelSpec.of(Options(backend="tf")))
    assert est.grid == (256, 256, 224) and est.need > 5e9


@pytest.mark.parametrize("proc, files, room", [
    ("0::/job\n", {"job/memory.max": "4000000000\n", "job/memory.current": "1000000000\n"}, 3e9),
    ("0::/job\n", {"job/memory.max": "max\n", "job/memory.current": "1000000000\n"}, None),
    ("5:cpu:/\n4:memory:/slurm/job_7\n", {"memory/slurm/job_7/memory.limit_in_bytes": "2000000000",
                                            "memory/slurm/job_7/memory.usage_in_bytes": "500000000"}, 1.5e9),
    ("4:memory:/\n", {"memory/memory.limit_in_bytes": str(2 ** 63 - 4096), "memory/memory.usage_in_bytes": "1"},
     None),
])
def test_cgroup_limits_of_containers_and_batch_jobs_are_read(tmp_path, proc, files, room):
    (tmp_path / "cgroup").write_text(proc)
    for rel, text in files.items():
        (tmp_path / "sys" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys" / rel).write_text(text)
    assert memory.cgroup_room(tmp_path / "cgroup", tmp_path / "sys") == room


@pytest.mark.parametrize("oom", ["numpy", "tensorflow"])
def test_out_of_memory_in_the_network_suggests_crop(models, t1, tmp_path, capsys, monkeypatch, oom):
    """numpy's MemoryError and the framework's own out-of-memory (the backend turns TensorFlow's
    ResourceExhaustedError into a MemoryShortage) give the same one line with the way out."""
    import tensorflow as tf

    from synthseg_native.engine.backends.tf.backend import TFBackend

    def no_memory(self, net, x):
        if oom == "numpy":
            raise MemoryError("Unable to allocate 12.0 GiB for an array")
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[1,24,224,256,192]")

    monkeypatch.setattr(TFBackend, "run", no_memory)
    src, seg = save(t1, tmp_path / "t1.nii.gz"), tmp_path / "out" / "seg.nii.gz"
    assert main(["--i", str(src), "--o", str(seg), "--models", str(models), *QUICK]) == 1
    err = err_lines(capsys.readouterr().err)
    cause = ("Unable to allocate 12.0 GiB for an array" if oom == "numpy" else
             "OOM when allocating tensor with shape[1,24,224,256,192]")
    assert err == [f"[ERR] {src}: out of memory ({cause}); use --crop (e.g. --crop 160) to segment a smaller "
                   "centred patch, or --max-memory below what the machine has (e.g. --max-memory 8G) for smaller "
                   "tiles"]
    assert files_in(seg.parent) == []
