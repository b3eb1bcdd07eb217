"""What had to be assumed about a header, and nibabel's own remarks, become [WARN] lines naming the file."""

from __future__ import annotations

import struct

import nibabel as nib
import numpy as np

from synthseg_native.io.images import from_nibabel, load_image, peek_image


def _no_orientation(path, zero_voxel: bool = False):
    img = nib.Nifti1Image(np.random.RandomState(0).rand(30, 30, 30).astype(np.float32), None)
    assert int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 0
    nib.save(img, str(path))
    if zero_voxel:  # nibabel refuses to write pixdim 0 itself: patch pixdim[1] in the file
        raw = bytearray(path.read_bytes())
        raw[80:84] = struct.pack("<f", 0.0)
        path.write_bytes(bytes(raw))
    return path


def test_no_orientation_is_one_warning_naming_the_file(tmp_path, capfd):
    path = _no_orientation(tmp_path / "scan.nii")
    load_image(path)
    captured = capfd.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[WARN] {path}: the header has no orientation"), lines
    assert "left and right may be swapped" in lines[0] and "LAS" in lines[0]
    assert captured.out == ""


def test_zero_voxel_size_is_explained_not_printed_raw(tmp_path, capfd):
    path = _no_orientation(tmp_path / "zero.nii", zero_voxel=True)
    peek_image(path)  # reads the same header: silent, the load reports it once
    assert capfd.readouterr().err == ""
    img = load_image(path)
    err = capfd.readouterr().err.splitlines()
    assert all(line.startswith(f"[WARN] {path}: ") for line in err), err
    assert any("voxel size 0 in the header (pixdim); assumed 1 mm" in line for line in err), err
    assert not any("pixdim[1,2,3] should be non-zero" in line for line in err)  # nibabel's words stay inside
    assert np.allclose(img.resolution, 1.0)


def test_a_normal_header_says_nothing(tmp_path, capfd):
    img = nib.Nifti1Image(np.ones((20, 20, 20), dtype=np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    nib.save(img, str(tmp_path / "ok.nii.gz"))
    load_image(tmp_path / "ok.nii.gz")
    from_nibabel(img, "in memory")
    assert capfd.readouterr().err == ""
