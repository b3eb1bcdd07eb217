"""--autocrop (FreeSurfer 8): the box around the foreground, checked against boxes recorded from FreeSurfer's own
``preprocess()`` (its script, commit 0edd010, run outside the project on the same arrays, 2026-12-07)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from synthseg_native.config import Options
from synthseg_native.engine.preprocess import autocrop_box, preprocess
from synthseg_native.errors import InputError, UsageError
from synthseg_native.io.images import from_nibabel

# name: (image shape, block start, block size) -> (crop_idx, network grid, pad_idx, sum of the network input)
RECORDED = {
    "centre": (((100, 120, 90), (30, 40, 20), (32, 20, 45)),
               ([15, 35, 11, 79, 67, 75], [128, 128, 128], [32, 48, 32, 96, 80, 96], 17300.00195107136)),
    "low_edge": (((100, 120, 90), (0, 2, 1), (40, 33, 31)),
                 ([0, 0, 1, 64, 64, 33], [128, 128, 128], [32, 32, 48, 96, 96, 80], 23382.22908407683)),
    "high_edge": (((100, 120, 90), (70, 100, 60), (30, 20, 30)),
                  ([70, 95, 60, 100, 120, 90], [128, 128, 128], [49, 51, 49, 79, 76, 79], 11797.802816106685)),
    "exact32": (((200, 150, 160), (50, 50, 50), (31, 63, 95)),
                ([50, 50, 50, 82, 114, 146], [128, 128, 128], [48, 32, 16, 80, 96, 112], 105637.89302863227)),
    "big": (((260, 300, 250), (40, 45, 35), (180, 210, 170)),
            ([35, 39, 25, 227, 263, 217], [192, 224, 192], [0, 0, 0, 192, 224, 192], 3293310.9047993426)),
}


def recorded_arrays() -> dict[str, np.ndarray]:
    """The arrays the boxes were recorded on: noise blocks in zeros, drawn in this order from one generator."""
    rng = np.random.default_rng(0)
    arrays = {}
    for name, ((shape, lo, size), _) in RECORDED.items():
        v = np.zeros(shape)
        v[tuple(slice(a, a + b) for a, b in zip(lo, size))] = rng.uniform(1, 100, size)
        arrays[name] = v.astype(np.float32)
    return arrays


@pytest.mark.parametrize("name", list(RECORDED))
def test_autocrop_box_and_network_input_match_freesurfer(name):
    volume = recorded_arrays()[name]
    crop_idx, grid, pad_idx, total = RECORDED[name][1]
    prep = preprocess(from_nibabel(nib.Nifti1Image(volume, np.eye(4)), name), name, autocrop=True)
    assert prep.crop_idx.tolist() == crop_idx
    assert list(prep.image.shape[1:4]) == grid
    assert prep.pad_idx.tolist() == pad_idx
    assert float(prep.image.astype(np.float64).sum()) == pytest.approx(total, rel=1e-6)


def test_autocrop_box_clamps_without_shifting_back():
    """At the high edge the box is cut, not moved: FreeSurfer's box there is smaller than a multiple of 32."""
    v = np.zeros((100, 120, 90))
    v[70:100, 100:120, 60:90] = 1.0
    box = autocrop_box(v, "x")
    assert box.tolist() == [70, 95, 60, 100, 120, 90]  # 31 voxels + 1 rounds to 32, starting 0-1 below: clamped


def test_without_autocrop_the_whole_image_is_analysed():
    volume = recorded_arrays()["centre"]
    prep = preprocess(from_nibabel(nib.Nifti1Image(volume, np.eye(4)), "x"), "x")
    assert prep.crop_idx is None and list(prep.image.shape[1:4]) == [128, 128, 96 + 32]


def test_an_image_with_nothing_above_the_background_is_one_clear_error():
    """FreeSurfer's script dies in numpy (a zero-size array); here one message names the image and the way out."""
    v = np.zeros((60, 60, 60), dtype=np.float32)
    v[0, 0, 0] = 5.0  # not constant (that is refused earlier) but all of it at the 0.5th percentile after rescale
    with pytest.raises(InputError, match=r"mostly\.nii: --autocrop finds no voxel above the background"):
        preprocess(from_nibabel(nib.Nifti1Image(v, np.eye(4)), "mostly.nii"), "mostly.nii", autocrop=True)


def test_autocrop_with_crop_is_refused():
    with pytest.raises(UsageError, match="--autocrop cannot be used with --crop"):
        Options(i="a.nii", o="b.nii", autocrop=True, crop=[160]).check()
