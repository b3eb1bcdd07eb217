"""Voxel-grid operations: resampling to 1 mm, RAS alignment, centred crop and pad.

Each function reproduces the arithmetic of upstream's ``ext/lab2im/edit_volumes`` step for step
(same dtypes, same views instead of copies, same rounding) because the segmentation is compared
with upstream bit for bit; a mathematically equal but differently ordered computation would not be.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import RegularGridInterpolator
from scipy.ndimage import gaussian_filter


def resample_to(volume: np.ndarray, affine: np.ndarray, new_vox_size: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Blur (downsampled axes only) then linearly interpolate onto a grid of ``new_vox_size``.

    Voxel sizes come from the affine's column norms, as upstream does, even though the decision to
    resample is taken from the header; the output affine keeps the same physical centre of voxels.
    """
    pixdim = np.sqrt(np.sum(affine * affine, axis=0))[:-1]
    factor = pixdim / np.array(new_vox_size)
    sigmas = 0.25 / factor
    sigmas[factor > 1] = 0
    filtered = gaussian_filter(volume, sigmas)
    axes = tuple(np.arange(0, s) for s in filtered.shape[:3])
    interp = RegularGridInterpolator(axes, filtered, method="linear")
    start = -(factor - 1) / (2 * factor)
    step = 1.0 / factor
    stop = start + step * np.ceil(filtered.shape * factor)
    grids = []
    for d in range(3):
        g = np.arange(start=start[d], stop=stop[d], step=step[d])
        g[g < 0] = 0
        g[g > (filtered.shape[d] - 1)] = filtered.shape[d] - 1
        grids.append(g)
    mesh = np.meshgrid(*grids, indexing="ij", sparse=True)
    resampled = interp(tuple(mesh))
    new_aff = affine.copy()
    for c in range(3):
        new_aff[:-1, c] = new_aff[:-1, c] / factor[c]
    new_aff[:-1, -1] = new_aff[:-1, -1] - np.matmul(new_aff[:-1, :-1], 0.5 * (factor - 1))
    return resampled, new_aff


def ras_axes(affine: np.ndarray, n_dims: int = 3) -> np.ndarray:
    """Which voxel axis points most along each of R, A, S (ties broken so every axis is used once)."""
    inv = np.linalg.inv(affine)
    axes = np.argmax(np.absolute(inv[0:n_dims, 0:n_dims]), axis=0)
    for i in range(n_dims):
        if i not in axes:
            unique, counts = np.unique(axes, return_counts=True)
            wrong = unique[np.argmax(counts)]
            axes[np.where(axes == wrong)[0][-1]] = i
    return axes


def align_to(volume: np.ndarray, affine: np.ndarray, affine_ref: np.ndarray, n_dims: int = 3
             ) -> np.ndarray:
    """Reorient by axis swaps and flips only (no interpolation); returns a view when possible."""
    aff_flo = affine.copy()
    axes_ref = ras_axes(affine_ref, n_dims)
    axes_flo = ras_axes(aff_flo, n_dims)
    aff_flo[:, axes_ref] = aff_flo[:, axes_flo]
    for i in range(n_dims):
        if axes_flo[i] != axes_ref[i]:
            volume = np.swapaxes(volume, axes_flo[i], axes_ref[i])
            j = int(np.where(axes_flo == axes_ref[i])[0][0])
            axes_flo[j], axes_flo[i] = axes_flo[i], axes_flo[j]
    dots = np.sum(aff_flo[:3, :3] * affine_ref[:3, :3], axis=0)
    for i in range(n_dims):
        if dots[i] < 0:
            volume = np.flip(volume, axis=i)
            aff_flo[:, i] = -aff_flo[:, i]
            aff_flo[:3, 3] = aff_flo[:3, 3] - aff_flo[:3, i] * (volume.shape[i] - 1)
    return volume


def centre_crop(volume: np.ndarray, shape: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Central crop to at most ``shape``; returns the copy and [min..., max...] indices."""
    vol_shape = volume.shape
    lo = np.maximum([int((vol_shape[i] - shape[i]) / 2) for i in range(3)], 0)
    hi = np.minimum([lo[i] + shape[i] for i in range(3)], np.array(vol_shape)[:3])
    idx = np.concatenate([np.array(lo), np.array(hi)])
    out = volume.copy()[idx[0]:idx[3], idx[1]:idx[4], idx[2]:idx[5], ...]
    return out, idx


def crop_with_idx(volume: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return volume[idx[0]:idx[3], idx[1]:idx[4], idx[2]:idx[5], ...]


def centre_pad(volume: np.ndarray, shape: list[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad symmetrically (extra voxel after) to ``shape``; returns the array and crop-back indices."""
    vol_shape = np.array(volume.shape[:3])
    target = np.array([int(s) for s in shape], dtype="int32")
    if np.any(target > vol_shape.astype("int32")):
        lo = np.maximum(np.int32(np.floor((target - vol_shape) / 2)), 0)
        hi = np.maximum(np.int32(np.ceil((target - vol_shape) / 2)), 0)
        idx = np.concatenate([lo, lo + vol_shape])
        margins = tuple((lo[i], hi[i]) for i in range(3)) + ((0, 0),) * (volume.ndim - 3)
        return np.pad(volume, margins, mode="constant", constant_values=0), idx
    return volume.copy(), np.concatenate([np.zeros(3, dtype=int), vol_shape])
