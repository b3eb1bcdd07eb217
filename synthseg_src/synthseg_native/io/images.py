"""Reading and writing MRI volumes (.nii, .nii.gz, .mgz) the way upstream SynthSeg does.

Outputs must be byte-identical to upstream's, so images are built with the same nibabel calls
(input header reused, data rounded and cast like upstream); every file goes through
:mod:`.atomic` (temporary name, then rename), so a crash never leaves a partial file.

Reading checks what nibabel would otherwise turn into a silent wrong answer (complex data read as its
real part) or an obscure exception (truncated files, headers promising more voxels than the file
holds), so that a bad file in a batch costs one clear ``[ERR]`` line. What had to be assumed about a
header (no orientation, voxel sizes of 0) and nibabel's own remarks become ``[WARN]`` lines that name
the file, instead of raw library output.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from ..errors import InputError
from .atomic import StagedOutputs, atomic_write, image_extension

logger = logging.getLogger(__name__)


@dataclass
class LoadedImage:
    """An image as upstream's ``get_volume_info`` sees it (data squeezed, float64)."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.spatialimages.SpatialHeader
    n_dims: int
    n_channels: int
    resolution: np.ndarray
    source: nib.spatialimages.SpatialImage | None = None  # the image as nibabel opened it (``--keepgeom``'s target)


@dataclass
class ImageInfo:
    """What the header says, read without touching the voxel data (cheap, for checks before loading)."""

    shape: tuple[int, ...]
    zooms: tuple[float, ...]
    dtype: np.dtype


def _dims(shape: tuple[int, ...], max_channels: int = 10) -> tuple[int, int]:
    """Upstream treats a last axis of at most ``max_channels`` as channels, not space."""
    if shape[-1] <= max_channels:
        return len(shape) - 1, shape[-1]
    return len(shape), 1


def _open(path: str) -> nib.spatialimages.SpatialImage:
    """nibabel's lazy image (header only), with the reasons it can fail put in words."""
    if not os.path.exists(path):
        raise InputError(f"{path}: input file does not exist")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a regular file")
    if image_extension(path) is None:
        raise InputError(f"{path}: unsupported extension (use .nii, .nii.gz or .mgz)")
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises many types for files that are not images
        raise InputError(f"{path}: cannot read image header ({_cause(exc)})") from exc


def _cause(exc: BaseException) -> str:
    """One line saying why nibabel could not read a file (its own messages span lines)."""
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        return f"truncated or corrupt compressed file: {exc}"
    text = " ".join(str(exc).split())
    m = re.search(r"Expected (\d+) bytes, got (\d+) bytes", text)
    if m:
        return (f"header/data size mismatch: the header describes {m.group(1)} bytes of voxels, "
                f"the file holds {m.group(2)} (truncated, or a wrong header)")
    return f"{type(exc).__name__}: {text}"


def peek_image(path: str | os.PathLike) -> ImageInfo:
    """Check an input from its header alone: exists, readable, a real-valued scalar type, and (for
    uncompressed NIfTI, where it is cheap) a file long enough for the voxels the header promises.

    nibabel would read complex data as its real part without an error and RGB data not at all, so
    both are refused here, before any memory is spent on the voxels. nibabel's remarks on the header
    are left to :func:`load_image`, which reads the same header again and reports them once.
    """
    with library_messages(str(path), report=False):
        return _checked(str(path))[1]


def _checked(path: str) -> tuple[nib.spatialimages.SpatialImage, ImageInfo]:
    img = _open(path)
    info = image_info(img, path)
    if image_extension(path) == ".nii" and isinstance(img, nib.Nifti1Image):
        need = int(img.header.get_data_offset()) + int(np.prod(info.shape)) * info.dtype.itemsize
        have = os.path.getsize(path)
        if have < need:
            raise InputError(f"{path}: header/data size mismatch: the header describes {need} bytes "
                             f"(offset + {'x'.join(map(str, info.shape))} voxels of {info.dtype}), the file holds "
                             f"{have} (truncated, or a wrong header)")
    return img, info


def image_info(img: nib.spatialimages.SpatialImage, name: str) -> ImageInfo:
    """:class:`ImageInfo` of a nibabel image, refusing voxel types that cannot be segmented."""
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields is not None:
        raise InputError(f"{name}: RGB/structured voxel type {dtype} is not supported (convert to a grey-level "
                         "image, e.g. one channel or the luminance)")
    if dtype.kind == "c":
        raise InputError(f"{name}: complex-valued voxels ({dtype}) are not supported (use the magnitude image)")
    if dtype.kind not in "biuf":
        raise InputError(f"{name}: voxel type {dtype} is not supported")
    shape = tuple(int(s) for s in img.shape)
    return ImageInfo(shape, tuple(float(z) for z in img.header.get_zooms()), dtype)


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Read an input file, with every check of :func:`peek_image` and :func:`from_nibabel`."""
    path = str(path)
    with library_messages(path):
        return from_nibabel(_checked(path)[0], path)


def from_nibabel(img: nib.spatialimages.SpatialImage, name: str) -> LoadedImage:
    """An image in memory (or just opened) as the engine reads it; ``name`` is what messages call it."""
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.MGHImage)):
        raise InputError(f"{name}: a {type(img).__name__} cannot be segmented; give a NIfTI or MGH image "
                         "(nibabel.Nifti1Image, MGHImage)")
    image_info(img, name)
    try:
        data = np.squeeze(img.get_fdata())
    except Exception as exc:  # nibabel raises many types for corrupt or truncated files
        raise InputError(f"{name}: cannot read image ({_cause(exc)})") from exc
    if data.ndim == 0 or data.size == 0:
        raise InputError(f"{name}: image has no voxels")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{name}: affine is singular or not finite (voxel-to-world matrix {affine[:3].tolist()}); "
                         "fix the header (sform/qform) first")
    n_dims, n_channels = _dims(data.shape) if data.ndim > 1 else (1, 1)
    header = img.header
    # Voxel sizes of the spatial axes. Upstream takes as many as its channel guess leaves (two for a scan
    # with <= 10 slices, four for a 4D series with > 10 frames: both then crash its resampling check);
    # three is what such scans need.
    if isinstance(img, nib.MGHImage):
        res = np.array(header["delta"])
    else:
        res = np.array(header["pixdim"][1:min(max(n_dims, min(3, data.ndim)), 3) + 1])
    if not np.all(np.isfinite(res)):
        raise InputError(f"{name}: voxel sizes in the header are not finite ({res.tolist()})")
    _warn_assumptions(img, name)
    return LoadedImage(data, affine, header, n_dims, n_channels, res, img)


def _warn_assumptions(img: nib.spatialimages.SpatialImage, name: str) -> None:
    """One [WARN] per thing that had to be assumed about the header, saying what it risks."""
    header = img.header
    if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) and int(header["qform_code"]) == 0 \
            and int(header["sform_code"]) == 0:
        axes = "".join(nib.aff2axcodes(img.affine))
        logger.warning(f"{name}: the header has no orientation (qform and sform codes 0); assumed nibabel's "
                       f"default (voxel axes towards {axes}, spacing from the voxel sizes): left and right may be "
                       "swapped in the outputs; set the header's sform/qform if the orientation is known")


@contextlib.contextmanager
def library_messages(name: str, report: bool = True) -> Iterator[None]:
    """nibabel's warnings and log records while reading ``name``, as [WARN] lines that name the file.

    nibabel reports header repairs on its own logger (``pixdim[1,2,3] should be non-zero; setting 0 dims
    to 1``) and oddities as Python warnings; either would reach the terminal raw, without the file it is
    about. ``report=False`` swallows them (the header is read again, and reported, later).
    """
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    nib_logger = logging.getLogger("nibabel.global")
    saved = nib_logger.handlers[:], nib_logger.propagate
    nib_logger.handlers[:] = [Collect()]
    nib_logger.propagate = False
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # type: ignore[assignment]
            warnings.simplefilter("always")
            yield
    finally:
        nib_logger.handlers[:], nib_logger.propagate = saved
        if report:
            for message in dict.fromkeys(" ".join(m.split()) for m in records + [str(w.message) for w in caught]):
                logger.warning(f"{name}: {_explain(message)}")


def _explain(message: str) -> str:
    """nibabel's remark in the toolkit's words where it changes what the engine assumes."""
    if message.startswith("pixdim[1,2,3] should be non-zero"):
        return ("voxel size 0 in the header (pixdim); assumed 1 mm along those axes, so resampling and volumes "
                "rest on that guess; fix the header's voxel sizes")
    return f"nibabel: {message}"


def as_nifti(volume: np.ndarray, affine: np.ndarray, header: nib.spatialimages.SpatialHeader,
             dtype: str | None = None) -> nib.Nifti1Image:
    """The image upstream's ``save_volume`` builds: input header reused, ints rounded, dtype forced."""
    if dtype is not None:
        if "int" in dtype:
            volume = np.round(volume)
        volume = volume.astype(dtype=dtype)
        img = nib.Nifti1Image(volume, affine, header)
        img.set_data_dtype(dtype)
        return img
    return nib.Nifti1Image(volume, affine, header)


def save_image(volume: np.ndarray, affine: np.ndarray, header: nib.spatialimages.SpatialHeader,
               path: str | os.PathLike, dtype: str | None = None, stage: StagedOutputs | None = None) -> None:
    """Write :func:`as_nifti` to ``path`` atomically (or into ``stage``)."""
    save_nifti(as_nifti(volume, affine, header, dtype), path, stage)


def save_nifti(img: nib.spatialimages.SpatialImage, path: str | os.PathLike,
               stage: StagedOutputs | None = None) -> None:
    """Write ``img`` atomically; the extension picks the format (.mgz converts, as nibabel does)."""
    (stage.write if stage is not None else atomic_write)(path, lambda tmp: nib.save(img, str(tmp)))
