"""Reading and writing MRI volumes (.nii, .nii.gz, .mgz) the way upstream SynthSeg does.

Outputs must be byte-identical to upstream's, so images are built with the same nibabel calls
(input header reused, data rounded and cast like upstream), but every file is first written to a
temporary name in the target directory and renamed into place: a crash never leaves a partial file
that a cache could mistake for a finished result.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mgz")


class InputError(Exception):
    """A problem with one input image; the message names the file and the cause."""


def image_extension(path: str | os.PathLike) -> str | None:
    name = os.path.basename(str(path)).lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


@dataclass
class LoadedImage:
    """An image as upstream's ``get_volume_info`` sees it (data squeezed, float64)."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.spatialimages.SpatialHeader
    n_dims: int
    n_channels: int
    resolution: np.ndarray


def _dims(shape: tuple[int, ...], max_channels: int = 10) -> tuple[int, int]:
    """Upstream treats a last axis of at most ``max_channels`` as channels, not space."""
    if shape[-1] <= max_channels:
        return len(shape) - 1, shape[-1]
    return len(shape), 1


def load_image(path: str | os.PathLike) -> LoadedImage:
    path = str(path)
    ext = image_extension(path)
    if ext is None:
        raise InputError(f"{path}: unsupported extension (use .nii, .nii.gz or .mgz)")
    try:
        img = nib.load(path)
        data = np.squeeze(img.get_fdata())
    except Exception as exc:  # nibabel raises many types for corrupt or truncated files
        raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 0 or data.size == 0:
        raise InputError(f"{path}: image has no voxels")
    if np.iscomplexobj(data):
        raise InputError(f"{path}: complex-valued data is not supported")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: affine is singular or not finite")
    n_dims, n_channels = _dims(data.shape) if data.ndim > 1 else (1, 1)
    header = img.header
    # Voxel sizes of the spatial axes. Upstream takes as many as its channel guess leaves (two for a scan
    # with <= 10 slices, which then crashes its resampling check); three is what such scans need.
    if ext == ".mgz":
        res = np.array(header["delta"])
    else:
        res = np.array(header["pixdim"][1:max(n_dims, min(3, data.ndim)) + 1])
    return LoadedImage(data, affine, header, n_dims, n_channels, res)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_path(path: Path) -> Path:
    """A unique temporary name beside ``path`` that keeps its extension, so nibabel picks the format."""
    ext = image_extension(path) or path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{ext}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_write(path: str | os.PathLike, writer) -> None:
    """Call ``writer(tmp_path)`` and rename the result onto ``path`` only if it succeeded."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        raise IsADirectoryError(f"{target}: output path is an existing directory")
    tmp = _temp_path(target)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs follow the umask like any file
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_image(volume: np.ndarray, affine: np.ndarray, header, path: str | os.PathLike,
               dtype: str | None = None) -> None:
    """Write like upstream's ``save_volume``: input header reused, ints rounded, dtype forced."""
    if dtype is not None:
        if "int" in dtype:
            volume = np.round(volume)
        volume = volume.astype(dtype=dtype)
        img = nib.Nifti1Image(volume, affine, header)
        img.set_data_dtype(dtype)
    else:
        img = nib.Nifti1Image(volume, affine, header)
    atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace a small text file (CSV, JSON sidecar)."""
    def _write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
    atomic_write(path, _write)
