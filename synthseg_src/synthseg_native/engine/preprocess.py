"""Image → network input: dimension checks, 1 mm resampling, RAS alignment, crop, rescale, pad.

The order and arithmetic follow upstream's ``predict_synthseg.preprocess``; intensities stay
float64 until the very end, as upstream's do, so that the float32 network input is the same bits.

Before that, images on which upstream would silently produce garbage are stopped with a reason
(see docs/reliability.md): a field of view too small to hold a head, a constant image, infinite
values or an intensity range that overflows. NaN voxels, which masking tools write outside the
brain, are set to 0 with a warning instead of poisoning the percentile rescale. None of these
checks changes a single bit for an image that passes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..config import round_up
from ..errors import InputError
from ..io.images import LoadedImage
from . import geometry

logger = logging.getLogger(__name__)
TARGET_RES = 1.0
MIN_FOV_MM = 20.0  # a scan narrower than this along any axis cannot hold a brain (often: wrong voxel sizes)


@dataclass
class Prepared:
    """The network input and what post-processing needs to put the result back in place."""

    image: np.ndarray            # (1, X, Y, Z, 1) float32, RAS, padded
    affine: np.ndarray           # affine of the (possibly resampled) input grid
    header: object
    resolution: np.ndarray       # voxel size used for volumes (1 mm after resampling)
    shape: list[int]             # RAS-aligned shape before crop/pad
    pad_idx: np.ndarray
    crop_idx: np.ndarray | None
    resampled: np.ndarray | None  # the resampled image, when resampling happened


def _check_extent(img: LoadedImage, path: str) -> None:
    """Refuse a field of view smaller than a head: a 5x5x5 test volume, or a header in metres."""
    if img.data.ndim < 3:
        return
    sizes = np.linalg.norm(img.affine[:3, :3], axis=0)
    extent = np.array(img.data.shape[:3]) * sizes
    if np.any(extent < MIN_FOV_MM):
        shape = "x".join(map(str, img.data.shape[:3]))
        fov = " x ".join(f"{e:.3g}" for e in extent)
        raise InputError(f"{path}: image is {shape} voxels, a field of view of only {fov} mm; too small for a "
                         f"head scan (every axis needs >= {MIN_FOV_MM:g} mm; check the voxel sizes in the header)")


def _check_intensities(data: np.ndarray, path: str) -> np.ndarray:
    """Infinite values and an overflowing or empty intensity range would give NaN or an all-zero network
    input; NaN voxels (masked background in SPM/FSL outputs) are set to 0 with a warning."""
    nan = np.isnan(data)
    if np.any(np.isinf(data)):
        raise InputError(f"{path}: image contains {int(np.isinf(data).sum())} infinite voxel(s); "
                         "fix the scaling (scl_slope) or the data")
    if np.any(nan):
        count = int(nan.sum())
        logger.warning(f"{path}: {count} NaN voxel(s) ({100 * count / data.size:.2g} %) set to 0")
        data = np.where(nan, 0.0, data)
    lo, hi = np.min(data), np.max(data)
    if lo == hi:
        raise InputError(f"{path}: image is constant (every voxel is {lo:g}); nothing to segment")
    with np.errstate(over="ignore"):
        span = hi - lo
    if not np.isfinite(span):
        raise InputError(f"{path}: intensity range [{lo:g}, {hi:g}] overflows double precision; "
                         "rescale the image")
    return data


def _to_3d(img: LoadedImage, path: str, conventions: str = "upstream") -> tuple[np.ndarray, int]:
    """The 3-D volume to segment. Where the two programs differ, ``conventions`` decides: upstream keeps the first
    channel of a multi-channel image and segments a volume of 4-10 slices as 3-D; FreeSurfer's mri_synthseg
    averages the channels and refuses the thin volume."""
    _check_extent(img, path)
    data, n_dims, n_channels = img.data, img.n_dims, img.n_channels
    freesurfer = conventions == "freesurfer"
    if n_dims == 2 and 1 < n_channels < 4:
        raise InputError(f"{path}: either 2D with several channels or 3D with at most 3 slices "
                         f"(shape {data.shape}); results would be meaningless")
    if n_dims == 2 and 3 < n_channels < 11 and freesurfer:
        raise InputError(f"{path}: input should have 3 dimensions, has 2 (shape {data.shape}: a last axis of "
                         f"{n_channels} counts as channels, as FreeSurfer's mri_synthseg reads it)")
    if n_dims == 2 and 3 < n_channels < 11:
        logger.warning(f"{path}: input with very few slices (shape {data.shape})")
        return data, 3
    if n_dims < 3:
        raise InputError(f"{path}: input should have 3 dimensions, has {n_dims} (shape {data.shape})")
    if n_dims == 4 and n_channels == 1:
        logger.warning(f"{path}: 4D input with {data.shape[-1]} frames, segmenting the first frame only")
        return data[..., 0], 3
    if n_dims > 3:
        raise InputError(f"{path}: input should have 3 dimensions, has {n_dims} (shape {data.shape})")
    if n_channels > 1 and freesurfer:
        logger.warning(f"{path}: {n_channels} channels (or frames), segmenting their mean (as FreeSurfer's "
                       "mri_synthseg does)")
        return np.mean(data, axis=-1), 3
    if n_channels > 1:
        logger.warning(f"{path}: {n_channels} channels (or frames), segmenting the first only")
        return data[..., 0], 3
    return data, 3


def autocrop_box(volume: np.ndarray, path: str) -> np.ndarray:
    """FreeSurfer 8's ``--autocrop`` box on the rescaled volume: [lo..., hi...] voxel indices.

    The bounding box of the voxels above 0 (i.e. above the 0.5th percentile the rescale maps to 0), its extent
    plus one voxel rounded up to a multiple of 32, centred on it (the low edge moved down by half the excess,
    rounded down, and clamped at 0; the high edge then clamped at the image without moving the low edge back, so
    a box at the image's border can come out smaller than the multiple of 32). Padding to the network's grid
    follows as without it. FreeSurfer crashes on an image with nothing above 0; this is an :class:`InputError`.
    """
    found = np.argwhere(volume > 0)
    if found.size == 0:
        raise InputError(f"{path}: --autocrop finds no voxel above the background after the 0.5-99.5 percentile "
                         "rescale (the image is mostly one value); run without --autocrop")
    lo, hi = found.min(axis=0), found.max(axis=0)
    extent = hi - lo + 2
    shape = np.array([round_up(int(e)) for e in extent])
    start = np.maximum(lo - np.floor_divide(shape - extent, 2), 0)
    stop = np.minimum(start + shape, volume.shape[:3])
    return np.concatenate([start, stop])


def preprocess(img: LoadedImage, path: str, crop: list[int] | None = None, ct: bool = False,
               min_pad: list[int] | None = None, autocrop: bool = False, conventions: str = "upstream"
               ) -> Prepared:
    """The network input of ``img``: as upstream prepares it, and with FreeSurfer 8's ``autocrop`` (after the
    rescale, the box of :func:`autocrop_box`; ``crop`` and ``autocrop`` exclude each other)."""
    data, n_dims = _to_3d(img, path, conventions)
    data = _check_intensities(data, path)
    affine, res = img.affine, img.resolution
    target = np.squeeze(np.round(np.tile(np.array([TARGET_RES] * n_dims), (1, 1)), 3))
    resampled = None
    if np.any((res > target + 0.05) | (res < target - 0.05)):
        res = target
        data, affine = geometry.resample_to(data, affine, res)
        resampled = data
    data = geometry.align_to(data, affine, np.eye(4), n_dims)
    shape = list(data.shape[:n_dims])

    crop_idx = None
    if crop is not None:
        crop_shape = [round_up(s) for s in crop]
        data, crop_idx = geometry.centre_crop(data, crop_shape)

    if ct:
        data = np.clip(data, 0, 80)
    data = rescale(data)
    if autocrop and crop_idx is None:
        crop_idx = autocrop_box(data, path)
        data = geometry.crop_with_idx(data, crop_idx)

    pad_shape = [round_up(s) for s in data.shape[:n_dims]]
    min_pad = [round_up(s) for s in (min_pad or [128] * 3)]
    data, pad_idx = geometry.centre_pad(data, np.maximum(pad_shape, min_pad))
    image = data[np.newaxis, ..., np.newaxis].astype(np.float32)
    return Prepared(image, affine, img.header, res, shape, pad_idx, crop_idx, resampled)


def rescale(volume: np.ndarray) -> np.ndarray:
    """Map the 0.5–99.5 percentile range to [0, 1] after clipping, exactly as upstream's rescale."""
    flat = volume.flatten()
    lo = np.percentile(flat, 0.5)
    hi = np.percentile(flat, 99.5)
    clipped = np.clip(volume.copy(), lo, hi)
    if lo != hi:
        return 0.0 + (clipped - lo) / (hi - lo) * (1.0 - 0.0)
    return np.zeros_like(clipped)
