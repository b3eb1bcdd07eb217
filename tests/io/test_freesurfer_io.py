"""FreeSurfer 8's ``--keepgeom`` / ``--addctab`` segmentation files, as surfa 0.6.3 writes them (io/freesurfer.py).

Two kinds of checks. Always: values recorded from surfa 0.6.3 (its ``resample_like``, NIfTI and MGZ writers, colour
table) on inputs built here, compared with what :func:`save_like_surfa` writes (sha256 of the decompressed file, so
voxels, header, extension and tags all count), plus the rules those values follow spelled out (tie rounding, the
whole-voxel fast path, what surfa keeps of the header). Opt-in: with ``SYNTHSEG_SURFA_PYTHON`` naming a Python that
has surfa, surfa itself runs on the same inputs (the MNI152 and versions of it as well) and the files must agree
byte for byte; the real FreeSurferColorLUT.txt is embedded where one is found ($FREESURFER_HOME, or /work/fs where
this was developed), else the small table below. Example::

    SYNTHSEG_SURFA_PYTHON=/path/to/fsvenv/bin/python python -m pytest tests/io/test_freesurfer_io.py -k surfa
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synthseg_native.io.atomic import StagedOutputs
from synthseg_native.io.freesurfer import (
    Geometry,
    LabelEntry,
    read_embedded_lut,
    read_lut,
    resample_like,
    save_like_surfa,
    surfa_header,
    surfa_load,
)
from synthseg_native.io.fsheader import lut_bytes

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"  # big-endian, LAS, 2 mm
SMALL_LUT = """\
#No. Label Name:                R   G   B   A

0   Unknown                     0   0   0   0
  2 Left-Cerebral-White-Matter  245 245 245 0
3   Left-Cerebral-Cortex        205 62  78  1
17  Left-Hippocampus            220 216 20  255  extra-word
# a comment
41  Right-Cerebral-White-Matter 300 -4  245 2
2   Repeated-Two                1   2   3   0
1000 ctx-lh-unknown             25  5   25  0
"""


# ------------------------------------------------------------------------------------------------ inputs

def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def fs_grid(img: nib.spatialimages.SpatialImage) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid FreeSurfer's mri_synthseg writes its segmentation on: the input's, or, when a voxel size is outside
    0.95-1.05 mm, resample_volume's 1 mm grid (mri_synthseg L589-592, L2141-2184)."""
    aff = img.affine.copy()
    shape = np.array(img.shape[:3])
    res = np.array(img.header["delta"] if isinstance(img, nib.MGHImage) else img.header["pixdim"][1:4])
    if np.any((res > 1.05) | (res < 0.95)):
        factor = np.sqrt(np.sum(aff * aff, axis=0))[:-1]
        start, step = -(factor - 1) / (2 * factor), 1.0 / factor
        stop = start + step * np.ceil(shape * factor)
        shape = np.array([len(np.arange(start[c], stop[c], step[c])) for c in range(3)])
        for c in range(3):
            aff[:-1, c] = aff[:-1, c] / factor[c]
        aff[:-1, -1] = aff[:-1, -1] - aff[:-1, :-1] @ (0.5 * (factor - 1))
    return (int(shape[0]), int(shape[1]), int(shape[2])), aff


def labels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60, size=shape).astype(np.int32)


def pattern(shape: tuple[int, ...]) -> np.ndarray:
    """Labels in which every voxel differs from its neighbours (an index off by one shows), and that compress."""
    i, j, k = np.indices(shape, sparse=True)
    return ((i * 7 + j * 13 + k * 29) % 61).astype(np.int32)


def fs_written(img: nib.spatialimages.SpatialImage, seg: np.ndarray | None = None,
               affine: np.ndarray | None = None) -> nib.Nifti1Image:
    """The image FreeSurfer's nibabel step saves (save_volume L1470-1481): the input header reused, int32."""
    shape, aff = fs_grid(img)
    out = nib.Nifti1Image(labels(shape) if seg is None else seg, aff if affine is None else affine, img.header)
    out.set_data_dtype("int32")
    return out


def patterned(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    return fs_written(img, pattern(fs_grid(img)[0]))


def fs_extension() -> bytes:
    """A FreeSurfer header extension (code 14) as FreeSurfer tools write it, built here byte by byte."""
    table = struct.pack(">iiii", -2, 8, 0, 2) + struct.pack(">ii", 0, 8) + b"Unknown\0" + struct.pack(">4i", 0, 0, 0, 0)
    table += struct.pack(">ii", 7, 6) + b"Seven\0" + struct.pack(">4i", 10, 20, 30, 128)
    history = b"mri_convert in.mgz out.nii.gz"
    scan = struct.pack(">ffdf", 3.1, 900.0, 8.0, 3.0) + b"ROW"
    return (b">\0\0\1" + struct.pack(">iq", 1, len(table)) + table + struct.pack(">iq", 3, len(history))
            + history + struct.pack(">iqi", 7, 4, 1) + struct.pack(">iq", 45, len(scan)) + scan
            + struct.pack(">iq", -1, 1) + b"*")


def _nifti(shape: tuple[int, int, int], affine: np.ndarray, seed: int) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.random.default_rng(seed).normal(size=shape).astype(np.float32), affine)


def make_case(name: str) -> tuple[nib.spatialimages.SpatialImage, nib.Nifti1Image]:
    """(input image, the image FreeSurfer's nibabel step writes for it) for each reproduced situation."""
    ras1 = np.eye(4)
    ras1[:3, 3] = [-8.0, -9.5, -10.0]
    if name == "anatomical":  # 2 mm -> 1 mm grid -> back: sampling with exact .5 ties
        img = nib.load(ANATOMICAL)
        return img, fs_written(img)
    if name == "oblique":  # rotated 12 and 8 degrees, 1.6 mm
        aff = rotation(2, 12) @ rotation(0, 8) @ np.diag([1.6, 1.6, 1.6, 1.0])
        aff[:3, 3] = [-14.2, 20.7, -9.1]
        img = _nifti((20, 24, 18), aff, 1)
    elif name == "thick":  # 1 x 1 x 3 mm
        aff = np.diag([1.0, 1.0, 3.0, 1.0])
        aff[:3, 3] = [-10.0, -12.0, -12.0]
        img = _nifti((20, 24, 8), aff, 2)
    elif name == "lia_mgz":  # FreeSurfer's conformed orientation, 1.25 mm, MGH geometry
        aff = np.array([[-1.25, 0, 0, 11.0], [0, 0, 1.25, -13.0], [0, -1.25, 0, 14.0], [0, 0, 0, 1]])
        img = nib.MGHImage(np.random.default_rng(3).normal(size=(18, 20, 22)).astype(np.float32), aff)
    elif name in ("offset", "shifted", "equal", "msec", "time56"):
        img = _nifti((16, 18, 20), ras1, 4)
        if name == "offset":  # half a voxel and fractions: no whole-voxel shift, sampling
            aff = ras1.copy()
            aff[:3, 3] += [0.3, -0.5, -1.25]
            return img, fs_written(img, labels((16, 18, 20), 5), aff)
        if name == "shifted":  # whole-voxel shift, partial overlap: surfa copies instead of sampling
            aff = ras1.copy()
            aff[:3, 3] += [-3.0, 2.0, 5.0]
            return img, fs_written(img, labels((14, 22, 17), 6), aff)
        if name in ("msec", "time56"):  # time units surfa reads (ms: TR kept) and one it does not know
            img.header["xyzt_units"] = 2 | (16 if name == "msec" else 56)
            img.header["pixdim"][4] = 2300.0 if name == "msec" else 2.5
    elif name in ("shear_pos", "shear_neg"):  # an .mgz stores no shear: surfa re-derives its fields if shear > 1e-5
        aff = np.diag([1.6, 1.6, 1.6, 1.0])
        aff[0, 1] = 0.48 if name == "shear_pos" else -0.48
        aff[:3, 3] = [-12.0, -15.0, -11.0]
        img = _nifti((14, 16, 12), aff, 8)
    elif name == "withext":  # a FreeSurfer-written input: its extension rides along in the reused header
        img = _nifti((12, 14, 10), ras1, 7)
        img.header.extensions.append(nib.nifti1.Nifti1Extension(14, fs_extension()))
    else:
        raise KeyError(name)
    return img, fs_written(img)


CASES = ("anatomical", "oblique", "thick", "lia_mgz", "offset", "shifted", "equal", "msec", "time56", "withext",
         "shear_pos", "shear_neg")
INPUT_EXT = {"anatomical": ".nii", "lia_mgz": ".mgz"}  # the others are .nii.gz


def saved_input(name: str, folder: Path) -> Path:
    """The case's input as a file (what FreeSurfer reads twice: once for the network, once for --keepgeom)."""
    img, _ = make_case(name)
    path = folder / f"in_{name}{INPUT_EXT.get(name, '.nii.gz')}"
    nib.save(img, str(path))
    return path


def small_lut(tmp_path: Path) -> Path:
    path = tmp_path / "lut.txt"
    path.write_text(SMALL_LUT)
    return path


def decompressed(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.name.endswith("gz") else raw


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------- recorded values

# sha256 of the decompressed file surfa 0.6.3 writes (nibabel 5.2.1, numpy 1.26), with SMALL_LUT as the table:
# (case, extension, keepgeom, addctab) -> digest. Time units only matter to NIfTI (an .mgz has no such field).
RECORDED: dict[tuple[str, str, bool, bool], str] = {
    ("anatomical", ".nii.gz", True, True): "00106cd327c5e3e642edb2366cc76d18e8b65043c32a5b8b59eeaeb6decadbb2",
    ("anatomical", ".mgz", True, True): "bb96d24c75857221fd40d3d410a74fc1115617188c8dd5a601dcffdfe7549799",
    ("anatomical", ".nii", True, True): "00106cd327c5e3e642edb2366cc76d18e8b65043c32a5b8b59eeaeb6decadbb2",
    ("anatomical", ".nii.gz", True, False): "5615ec9cc70506a9b451f458193adfae5caed83990ee9028b2f2862a3ae1e803",
    ("anatomical", ".nii.gz", False, True): "8912879dbdc99ceb9af1672717bb0c5697e9979e72862d63517e73415c253f0e",
    ("anatomical", ".mgz", True, False): "fe8a097e092815e845d6e3a8609b6c51459df6995c28a58cf63f48c86b5a0db6",
    ("anatomical", ".mgz", False, True): "505fbe4a15e00dbc78df0abcce35bf24c1c620686d2b00834de70fee3007a99e",
    ("oblique", ".nii.gz", True, True): "3cae6af304e88f53856c218a7b93588752fa3c7a5007c79fee5876c8d8091669",
    ("oblique", ".mgz", True, True): "7f1683d62f2fc09934feafb79a50884d07ca4f34fefcbaa4e6115e1adcb8ef82",
    ("thick", ".nii.gz", True, True): "83115d5849f20efa2592d27f7e1c3180b46d0683b6daabe46e0bfadb47774b3e",
    ("thick", ".mgz", True, True): "073a12e3cd1e2cb760a78d005a0a7ffa15be3cc896551b60d59174d1ed0aaf14",
    ("lia_mgz", ".nii.gz", True, True): "58600638cd4c61ae287d2a2dfad5e1a3f6e142f5f1a07b008bbf9271b3b50530",
    ("lia_mgz", ".mgz", True, True): "97ae83e7040ceb0cd09dc548fbe58194e286617767c8d92c176ff9812b6fd1b1",
    ("offset", ".nii.gz", True, True): "fae8595b0fe3d27fb7fc091a560e4c58ce14a4f57303750d3dc3be4270126116",
    ("offset", ".mgz", True, True): "a5c58f515253432c011d62e586c1beacb25aa6b98120087a1fb678bff554453a",
    ("shifted", ".nii.gz", True, True): "7cdc75b39ee4c564890cf3cb122d0db20c206cb13af0156597655016a3cb7165",
    ("shifted", ".mgz", True, True): "dc4da347ac97319637b72b21a856caccbb5b31efb55e7b811150976984b05e64",
    ("equal", ".nii.gz", True, True): "e880a565c4315ecc8e56cec0f040c866a0dbe047257c834c9bab4a69cb57673e",
    ("equal", ".mgz", True, True): "ba50fed2cf50a6e7df75b4aa78642247c762fa32c6a7e387dff8db199df6e926",
    ("msec", ".nii.gz", True, True): "0ad5e2be73d0a40b776aa72199d23656882849401536e9153d56c6f21e4a80d1",
    ("time56", ".nii.gz", True, True): "4b215e4149c4f5250001cee4616dad5cd6d2441d065f511e2bdb0772ed98f282",
    ("withext", ".nii.gz", True, True): "d8e559f7c59f310671c90654ad8bd09c8362dabc8388ddbb5830b97f139abfc5",
    ("withext", ".mgz", True, True): "77a6b7feb0a2b51980e7511c8b9bcae48542343904d18355593d6fb4bd8c466d",
    ("withext", ".nii.gz", True, False): "564b339dd17a8183838568fee46aa20d90330a414b5fe485e954c72fde5a25db",
    ("shear_pos", ".nii.gz", True, True): "c22c63401c44623dc7db8b6869718e4f35feaf304809752248acfae043c6dab9",
    ("shear_pos", ".mgz", True, True): "19bfbfa758dd081acde6d468f9bb257056409c2cc6d25cd7ca708b989afba233",
    ("shear_neg", ".nii.gz", True, True): "17f6e5c061d7a786671e26ca20ce1db2f5ec7e170db1a0bd102bd799ad2b3aaf",
    ("shear_neg", ".mgz", True, True): "b26238316380683f82a1e44ffd5e8c657aac8855e267d70f53955ee026d8599f",
}
SMALL_LUT_BYTES = "b094e757ac4609b3a6e82009daa16783f9d3343d92a6f80040dbb62f0d210267"  # surfa's binary table, 262 bytes
FULL_LUT_BYTES = "ca2de6780b229937656fa644ffea4fe62cb27948bbdad976db00e22abfcb86e8"  # FreeSurferColorLUT.txt (FS 8)


def write_ours(tmp_path: Path, case: str, ext: str, keepgeom: bool, addctab: bool, lut: Path | None = None) -> Path:
    """save_like_surfa on a case, the input read back from its file as the command line would read it."""
    inp = nib.load(str(saved_input(case, tmp_path)))
    out = tmp_path / "ours" / f"seg{ext}"
    out.parent.mkdir(exist_ok=True)
    table = read_lut(lut or small_lut(tmp_path)) if addctab else None
    save_like_surfa(out, make_case(case)[1], inp, keepgeom, table)
    return out


@pytest.mark.parametrize("case,ext,keepgeom,addctab", sorted(RECORDED))
def test_file_is_surfas(tmp_path, case, ext, keepgeom, addctab):
    out = write_ours(tmp_path, case, ext, keepgeom, addctab)
    assert sha(decompressed(out)) == RECORDED[(case, ext, keepgeom, addctab)]


def test_lookup_table_is_read_and_encoded_as_surfa_does(tmp_path):
    table = read_lut(small_lut(tmp_path))
    # file order kept; a repeated index keeps its first place and takes the last line's values
    assert list(table) == [0, 2, 3, 17, 41, 1000]
    assert table[2].name == "Repeated-Two" and table[2].rgb == (1, 2, 3)
    assert table[41].rgb == (255, 0, 245)  # clipped to 0-255
    assert table[3].alpha == (255 - 1) / 255 and table[17].alpha == 0.0
    # surfa writes int(255 * (1 - alpha)) back: A = 1 comes out 0, A = 2 comes out 1, A = 255 stays
    assert [table[i].written_alpha for i in (0, 3, 17, 41)] == [0, 0, 255, 1]
    blob = lut_bytes(table)
    assert len(blob) == 262 and sha(blob) == SMALL_LUT_BYTES
    assert blob[:16] == struct.pack(">iiii", -2, 1001, 0, 6)
    (tmp_path / "bad.txt").write_text("0 Unknown 0 0 0\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_lut(tmp_path / "bad.txt")


def test_freesurfer_colour_table_if_present():
    path = Path(os.environ.get("FREESURFER_HOME", "/nonexistent")) / "FreeSurferColorLUT.txt"
    path = path if path.exists() else Path("/work/fs/FreeSurferColorLUT.txt")
    if not path.exists():
        pytest.skip("no FreeSurferColorLUT.txt here")
    table = read_lut(path)
    assert len(table) == 1475 and max(table) == 14175
    assert sha(lut_bytes(table)) == FULL_LUT_BYTES


def test_anatomical_header_as_surfa_writes_it(tmp_path):
    """Nothing of the input header survives but the form codes; the data turns little-endian; the extension
    holds the table, DOF, scan parameters (NaN field strength) and the end marker."""
    out = write_ours(tmp_path, "anatomical", ".nii.gz", True, True)
    raw = decompressed(out)
    img = nib.load(str(out))
    h = img.header
    assert img.shape == (33, 41, 25) and img.get_data_dtype().str == "<i4" and h.endianness == "<"
    assert h["pixdim"].tolist() == [-1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    assert int(h["xyzt_units"]) == 10 and int(h["sform_code"]) == 2 and int(h["qform_code"]) == 0
    assert [float(h[k]) for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x")] == [0.0, 1.0, 0.0, 32.0]
    assert np.array_equal(img.affine, [[-2, 0, 0, 32], [0, 2, 0, -40], [0, 0, 2, -16], [0, 0, 0, 1]])
    assert h["descrip"].item() == b"" and struct.unpack_from("<f", raw, 108)[0] == 720.0
    assert struct.unpack_from("<4sii", raw, 348) == (b"\x01\0\0\0", 368, 14)
    content = h.extensions[0].get_content()
    assert len(content) == 346 and content[:4] == b">\0\0\1"
    assert sha(content) == "8eb5d4150cbbd94571f5c1e3814fc45f0ec739283763f594d18986a3145a122f"
    assert content[-13:] == struct.pack(">iq", -1, 1) + b"*"
    assert content[-52:-13] == struct.pack(">iq", 45, 27) + struct.pack(">ffdf", 0, 0, 0, np.nan) + b"UNKNOWN"
    table, embedded = read_lut(small_lut(tmp_path)), read_embedded_lut(out)
    assert list(embedded) == list(table) and all(embedded[i] == table[i] for i in (0, 2, 17, 1000))
    # what surfa's alpha round trip leaves: A = 1 is written 0 (alpha 1.0), A = 2 is written 1
    assert embedded[3] == LabelEntry("Left-Cerebral-Cortex", (205, 62, 78), 1.0)
    assert embedded[41] == LabelEntry("Right-Cerebral-White-Matter", (255, 0, 245), (255 - 1) / 255)


def test_anatomical_mgz_footer_and_tags(tmp_path):
    out = write_ours(tmp_path, "anatomical", ".mgz", True, True)
    raw = decompressed(out)
    assert struct.unpack_from(">i4iiih", raw, 0) == (1, 33, 41, 25, 1, 3, 1, 1)  # float32: nibabel's .mgz step
    end = 284 + 33 * 41 * 25 * 4
    assert struct.unpack_from(">5f", raw, end) == (0.0, 0.0, 0.0, 0.0, 82.0)  # tr, flip, te, ti, fov
    assert raw[end + 20:end + 24] == struct.pack(">i", 1) and len(raw) == end + 20 + 301
    assert sha(raw[end + 20:]) == "2f688a2b918592ee260482bdaa1f245ce85a38f6d9aa42df824b5deb4f85ecb1"
    assert raw[-35:] == struct.pack(">iq", 41, 7) + b"UNKNOWN" + struct.pack(">iqf", 43, 4, 0.0)
    assert set(read_embedded_lut(out)) == set(read_lut(small_lut(tmp_path)))
    compressed = out.read_bytes()
    assert compressed[3] == 8 and compressed[10:18] == b"seg.mgz\0"  # gzip header names the target, as surfa's


# ---------------------------------------------------------------------------------------- the rules


def test_surfa_geometry_of_nifti_and_mgh():
    g = surfa_header(nib.load(ANATOMICAL)).geometry
    assert g.shape == (33, 41, 25) and g.voxsize.tolist() == [2.0, 2.0, 2.0]
    assert g.rotation.tolist() == [[-1, 0, 0], [0, 1, 0], [0, 0, 1]] and g.shear.tolist() == [0, 0, 0]
    assert g.center.tolist() == [-1.0, 1.0, 9.0]  # world position of voxel shape / 2
    lia = surfa_header(make_case("lia_mgz")[0])
    assert lia.geometry.shape == (18, 20, 22) and lia.geometry.voxsize.tolist() == [1.25] * 3
    lia_affine = [[-1.25, 0, 0, 11], [0, 0, 1.25, -13], [0, -1.25, 0, 14], [0, 0, 0, 1]]
    assert np.array_equal(lia.geometry.vox2world, lia_affine)
    # the voxel size is pixdim, not the affine's scale
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header["pixdim"][1:4] = [1.5, 1.5, 1.5]
    assert surfa_header(img).geometry.voxsize.tolist() == [1.5, 1.5, 1.5]
    assert surfa_header(img).geometry.vox2world[0, 0] == 2.0


def test_in_memory_image_gives_the_geometry_of_its_file(tmp_path):
    """The seg's float64 affine is stored in float32: the geometry must be the file's, not the array's."""
    _, written = make_case("oblique")
    path = tmp_path / "w.nii.gz"
    nib.save(written, str(path))
    mem, disk = surfa_load(make_case("oblique")[1], path), surfa_header(nib.load(str(path)))
    assert mem.geometry.equals(disk.geometry)
    assert not np.array_equal(mem.geometry.vox2world, make_case("oblique")[1].affine)


def test_metadata_surfa_reads_back():
    msec, t56 = surfa_header(make_case("msec")[1]).meta, surfa_header(make_case("time56")[1]).meta
    assert (msec.time_units, msec.tr) == (16, 2300.0)  # pixdim[4] in ms; written back as 2.3 with ms units
    assert (t56.time_units, t56.tr) == (8, 0.0)  # unknown time code: seconds, TR 0
    ext = surfa_header(make_case("withext")[1]).meta
    assert ext.history == ("mri_convert in.mgz out.nii.gz",) and ext.pedir == "ROW"
    assert (ext.te, ext.ti, ext.flip_angle, ext.field_strength) == (np.float32(3.1), 900.0, 8.0, 3.0)
    assert list(ext.labels) == [0, 7] and ext.labels[7].written_alpha == 128


def test_two_mm_input_samples_the_one_mm_seg_at_odd_voxels():
    """Each 2 mm voxel centre lies exactly between two 1 mm voxels: the .5 tie rounds up (C round)."""
    inp, written = make_case("anatomical")
    seg = surfa_load(written, "seg.nii.gz")
    out = resample_like(seg.data, seg.geometry, surfa_header(inp).geometry)
    assert out.dtype == np.dtype("int32")  # sampling: native byte order (the seg was big-endian)
    assert seg.data.dtype.str == ">i4" and np.array_equal(out, seg.data[1::2, 1::2, 1::2])


def test_fractional_offset_rounds_half_up_clamps_and_fills():
    inp, written = make_case("offset")  # source voxel of target voxel (x, y, z) is (x - 0.3, y + 0.5, z + 1.25)
    seg = surfa_load(written, "seg.nii.gz")
    out = resample_like(seg.data, seg.geometry, surfa_header(inp).geometry)
    src = seg.data
    expected = np.zeros_like(src)
    expected[1:, :, :-1] = src[1:, np.minimum(np.arange(1, 19), 17)][:, :, 1:]
    assert np.array_equal(out, expected)


def test_whole_voxel_shift_is_a_copy_that_keeps_the_dtype():
    inp, written = make_case("shifted")  # source starts 3 voxels before, 2 and 5 after the target's origin
    seg = surfa_load(written, "seg.nii.gz")
    data = seg.data.astype(">i4")
    out = resample_like(data, seg.geometry, surfa_header(inp).geometry)
    expected = np.zeros((16, 18, 20), dtype=">i4")
    expected[:11, 2:18, 5:20] = data[3:14, 0:16, 0:15]
    assert out.dtype.str == ">i4" and np.array_equal(out, expected)


def test_equal_geometry_is_a_copy():
    inp, written = make_case("equal")
    seg = surfa_load(written, "seg.nii.gz")
    target = surfa_header(inp).geometry
    assert seg.geometry.equals(target)
    out = resample_like(seg.data, seg.geometry, target)
    assert out is not seg.data and np.array_equal(out, seg.data)


def test_sampling_coordinates_are_float32():
    """0.3 * 4 + 0.3 is 1.4999999999999998 in float64 but 1.5000001 in float32: surfa samples voxel 2 there."""
    source = Geometry.from_affine((12, 2, 2), np.array([[1.0, 0, 0, -6], [0, 1, 0, -1], [0, 0, 1, -1], [0, 0, 0, 1]]),
                                  np.ones(3))
    target_affine = np.diag([0.3, 1.0, 1.0, 1.0])
    target_affine[:3, 3] = [-5.7, -1, -1]
    target = Geometry.from_affine((40, 2, 2), target_affine, np.array([0.3, 1.0, 1.0]))
    data = np.arange(12, dtype=np.int32)[:, None, None] * np.ones((1, 2, 2), np.int32)
    out = resample_like(data, source, target)
    assert out[:, 0, 0].tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8,
                                     8, 9, 9, 9, 10, 10, 10, 11, 11, 11, 11, 11, 0]  # recorded from surfa 0.6.3


def test_staged_write_appears_on_commit(tmp_path):
    inp, written = make_case("shifted")
    out = tmp_path / "seg.mgz"
    with StagedOutputs() as stage:
        save_like_surfa(out, written, inp, True, None, stage=stage)
        assert not out.exists() and stage.source(out).exists()
        stage.commit()
    assert out.exists() and [p.name for p in tmp_path.iterdir()] == ["seg.mgz"]
    save_like_surfa(tmp_path / "direct" / "seg.mgz", make_case("shifted")[1], inp, True, None)
    assert out.read_bytes() == (tmp_path / "direct" / "seg.mgz").read_bytes()
    assert read_embedded_lut(out) is None


def test_without_either_option_nibabel_file_is_kept(tmp_path):
    inp, written = make_case("oblique")
    save_like_surfa(tmp_path / "a.nii.gz", written, inp, False, None)
    nib.save(make_case("oblique")[1], str(tmp_path / "b.nii.gz"))
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert read_embedded_lut(tmp_path / "a.nii.gz") is None


# --------------------------------------------------------------------------------------- surfa itself

SURFA_PYTHON = os.environ.get("SYNTHSEG_SURFA_PYTHON")
# FreeSurfer's save_volume after nibabel's save (mri_synthseg L1490-1498), for a list of jobs read from stdin
SURFA_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
import surfa as sf
for job in json.load(sys.stdin):
    src = sf.load_volume(job["path"])
    out = src.resample_like(sf.load_volume(job["input"]), method="nearest") if job["keepgeom"] else src
    if job["lut"]:
        out.labels = sf.load_label_lookup(job["lut"])
    out.save(job["path"])
"""


def run_surfa(python: str, jobs: list[dict]) -> None:
    result = subprocess.run([python, "-c", SURFA_SCRIPT], input=json.dumps(jobs), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def surfa_job(folder: Path, input_path: Path, written: nib.Nifti1Image, ext: str, keepgeom: bool,
              lut: Path | None) -> tuple[dict, Path]:
    """FreeSurfer's nibabel step done for real, and the job that makes surfa finish the file.

    A ``.nii`` file with ``--addctab`` alone is the exception: surfa memory-maps the file it re-reads and then
    overwrites that very file, so FreeSurfer writes garbage voxels or dies of SIGBUS. surfa is run on a ``.nii.gz``
    instead, whose decompressed stream is the ``.nii`` file it means to write.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target_ext = ".nii.gz" if ext == ".nii" and not keepgeom else ext
    path = folder / f"seg{target_ext}"
    nib.save(written, str(path))
    return {"input": str(input_path), "path": str(path), "keepgeom": keepgeom, "lut": str(lut) if lut else ""}, path


def freesurfer_lut() -> Path | None:
    for folder in (os.environ.get("FREESURFER_HOME"), "/work/fs"):
        if folder and (Path(folder) / "FreeSurferColorLUT.txt").exists():
            return Path(folder) / "FreeSurferColorLUT.txt"
    return None


needs_surfa = pytest.mark.skipif(not SURFA_PYTHON, reason="SYNTHSEG_SURFA_PYTHON (a Python with surfa 0.6.3) not set")
COMBOS = [(ext, keep, ctab) for ext in (".nii.gz", ".nii", ".mgz") for keep, ctab in ((1, 1), (1, 0), (0, 1))]


def against_surfa(folder: Path, inputs: dict[str, tuple[Path, object]], lut: Path) -> None:
    """Every input x output format x option set, written by surfa (one subprocess) and by save_like_surfa:
    the decompressed files must be equal, and the compressed ones too except an .mgz's gzip time stamp."""
    table = read_lut(lut)
    jobs, pairs = [], []
    for name, (input_path, build) in inputs.items():
        for ext, keep, ctab in COMBOS:
            where = folder / f"{name}-{ext[1:]}-{keep}{ctab}"
            job, reference = surfa_job(where / "surfa", input_path, build(), ext, bool(keep), lut if ctab else None)
            ours = where / "ours" / f"seg{ext}"
            ours.parent.mkdir(parents=True)
            save_like_surfa(ours, build(), nib.load(str(input_path)), bool(keep), table if ctab else None)
            jobs.append(job)
            pairs.append((f"{name} {ext} keepgeom={keep} addctab={ctab}", reference, ours))
    run_surfa(SURFA_PYTHON, jobs)
    bad = []
    for label, reference, ours in pairs:
        if decompressed(reference) != decompressed(ours):
            bad.append(f"{label}: decompressed files differ")
        elif reference.name == ours.name:
            a, b = reference.read_bytes(), ours.read_bytes()
            if ours.suffix == ".mgz":
                a, b = a[:4] + a[8:], b[:4] + b[8:]  # gzip MTIME: surfa records the time of writing
            if a != b:
                bad.append(f"{label}: compressed files differ")
    assert not bad, "\n".join(bad)


@needs_surfa
def test_synthetic_cases_against_surfa(tmp_path):
    lut = freesurfer_lut() or small_lut(tmp_path)
    inputs = {name: (saved_input(name, tmp_path), lambda name=name: make_case(name)[1]) for name in CASES}
    against_surfa(tmp_path, inputs, lut)


@needs_surfa
def test_mni_and_versions_against_surfa(tmp_path, mni_img):
    """The MNI152 (1 mm: --keepgeom finds equal geometries), every third slice (1 x 1 x 3 mm), rotated 12 and 8
    degrees, and reoriented to LIA in an .mgz; and nibabel's anatomical.nii (2 mm, big-endian, LAS)."""
    data, aff = np.asarray(mni_img.dataobj, dtype=np.float32), mni_img.affine
    thick = aff.copy()
    thick[:3, 2] *= 3
    lia = mni_img.as_reoriented(nib.orientations.ornt_transform(nib.orientations.io_orientation(aff),
                                                                nib.orientations.axcodes2ornt("LIA")))
    images = {"mni": nib.Nifti1Image(data, aff, mni_img.header), "thick": nib.Nifti1Image(data[:, :, ::3], thick),
              "oblique": nib.Nifti1Image(data, rotation(2, 12) @ rotation(0, 8) @ aff),
              "lia": nib.MGHImage(np.asarray(lia.dataobj, dtype=np.float32), lia.affine)}
    inputs: dict[str, tuple[Path, object]] = {}
    for name, img in images.items():
        path = tmp_path / f"in_{name}{'.mgz' if name == 'lia' else '.nii.gz'}"
        nib.save(img, str(path))
        inputs[name] = (path, lambda path=path: patterned(nib.load(str(path))))
    inputs["anatomical"] = (ANATOMICAL, lambda: fs_written(nib.load(ANATOMICAL)))
    against_surfa(tmp_path, inputs, freesurfer_lut() or small_lut(tmp_path))
