"""Shared fixtures for the engine tests: seeded test weights and small real MRI inputs.

Weights are generated once per session into a temp dir (never committed). Inputs are crops of the
MNI152 T1 template that ships inside nilearn and nibabel's own test image, so every test sees
real anatomy while the networks run on small grids.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def reference(name: str) -> np.ndarray:
    """One of upstream's label tables from ../shared (CI has it; a plain clone may not: then skip)."""
    path = SHARED / "reference" / "labels" / f"{name}.npy"
    if not path.is_file():
        pytest.skip(f"upstream reference table {path.name} not found in {path.parent}")
    return np.load(path)


class WeightStore:
    """Generates each model file on first use; all land in one folder usable as --models."""

    def __init__(self, folder: Path):
        self.folder = folder

    def need(self, *keys: str) -> Path:
        from synthseg_native.engine.weights import MODEL_FILES
        from synthseg_native.tools.testweights import generate

        missing = [k for k in keys if not (self.folder / MODEL_FILES[k]).is_file()]
        if missing:
            generate(self.folder, only=missing)
        return self.folder


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> WeightStore:
    cache = os.environ.get("SYNTHSEG_TEST_WEIGHTS")  # lets a developer reuse weights between sessions
    folder = Path(cache) if cache else tmp_path_factory.mktemp("weights")
    folder.mkdir(parents=True, exist_ok=True)
    return WeightStore(folder)


@pytest.fixture(scope="session")
def mni_img() -> nib.Nifti1Image:
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=1)


def crop_img(img: nib.Nifti1Image, lo: tuple[int, int, int], shape: tuple[int, int, int]) -> nib.Nifti1Image:
    """A sub-block of ``img`` with its affine moved so it stays at the same place in the world."""
    data = np.asarray(img.dataobj)[lo[0]:lo[0] + shape[0], lo[1]:lo[1] + shape[1], lo[2]:lo[2] + shape[2]]
    aff = img.affine.copy()
    aff[:3, 3] = aff[:3, :3] @ np.array(lo) + aff[:3, 3]
    return nib.Nifti1Image(data.astype(np.float32), aff)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory, mni_img) -> dict[str, Path]:
    """Small real inputs in several orientations, resolutions and formats."""
    d = tmp_path_factory.mktemp("inputs")
    small = crop_img(mni_img, (60, 70, 55), (72, 88, 76))
    data, aff = np.asarray(small.dataobj), small.affine
    paths = {"ras": d / "mni_ras.nii.gz"}
    nib.save(small, paths["ras"])
    for codes, name, ext in ((("L", "A", "S"), "las", ".nii"), (("L", "I", "A"), "lia", ".mgz")):
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(aff),
                                               nib.orientations.axcodes2ornt(codes))
        re = small.as_reoriented(ornt)
        paths[name] = d / f"mni_{name}{ext}"
        klass = nib.MGHImage if ext == ".mgz" else nib.Nifti1Image
        nib.save(klass(np.asarray(re.dataobj).astype(np.float32), re.affine), paths[name])
    paths["4d"] = d / "mni_4d.nii.gz"
    nib.save(nib.Nifti1Image(data[..., None], aff), paths["4d"])
    aniso = aff.copy()
    aniso[:3, 2] *= 3
    paths["aniso"] = d / "mni_1x1x3.nii.gz"
    nib.save(nib.Nifti1Image(data[:, :, ::3], aniso), paths["aniso"])
    t = np.deg2rad(10)
    rot = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    paths["oblique"] = d / "mni_oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, rot @ aff), paths["oblique"])
    anat = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    paths["anatomical"] = d / "anatomical.nii"
    shutil.copy(anat, paths["anatomical"])
    return paths


@pytest.fixture
def scan_folder(inputs, tmp_path) -> Path:
    """Three small real scans in three formats (.nii.gz RAS, .nii LAS, .mgz LIA) in one folder: a tiny cohort."""
    src = tmp_path / "scans"
    src.mkdir()
    for name in ("ras", "las", "lia"):
        shutil.copy(inputs[name], src / inputs[name].name)
    return src


def photo_test_models(folder: Path, seg2_file: Path) -> Path:
    """Photo-SynthSeg's files as FreeSurfer installs them (``synthseg_photo_{both,single}_1.0.h5`` and their label,
    name and topology lists), made for tests from the 2.0 test weights: FreeSurfer's own lists and weights are not
    available here. "both": 2.0's layout with 5 neutral entries instead of 19 (so the same 33 labels and flip
    pairs), the 2.0 weights as they are; "single": the neutral and left entries only, the 2.0 weights with the
    likelihood layer cut to those 19 labels."""
    from synthseg_native.engine import labels as L
    from synthseg_native.engine.weights import read_weights, write_weights

    raw = L.raw_segmentation_labels(False)
    names, topology = L.raw_segmentation_names(False), L.raw_topology_classes(False)
    neutral, sided = slice(0, L.PHOTO_NEUTRAL), slice(L.n_neutral(False), None)
    n_left = (len(raw) - L.n_neutral(False)) // 2
    left = slice(L.n_neutral(False), L.n_neutral(False) + n_left)
    folder.mkdir(parents=True, exist_ok=True)
    layers = read_weights(seg2_file)
    for variant, part in (("both", sided), ("single", left)):
        lists = {"synthseg_segmentation_labels": np.concatenate([raw[neutral], raw[part]]),
                 "synthseg_segmentation_names": np.concatenate([names[neutral], names[part]]),
                 "synthseg_topological_classes": np.concatenate([topology[neutral], topology[part]])}
        for stem, values in lists.items():
            np.save(folder / f"{stem}_photo_{variant}_1.0.npy", values)
        keep = np.isin(np.unique(raw), lists["synthseg_segmentation_labels"])
        cut = dict(layers)
        cut["unet_likelihood"] = {"kernel": layers["unet_likelihood"]["kernel"][..., keep],
                                  "bias": layers["unet_likelihood"]["bias"][keep]}
        write_weights(folder / f"synthseg_photo_{variant}_1.0.h5", cut, test_seed=0)
    return folder
