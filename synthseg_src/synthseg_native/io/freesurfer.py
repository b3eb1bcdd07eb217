"""FreeSurfer 8's ``--keepgeom`` / ``--addctab`` segmentation, written as surfa 0.6.3 writes it, without surfa.

``mri_synthseg`` first saves the segmentation with nibabel (the input's header reused, int32), then re-reads that
file with surfa, resamples it onto the input's grid (``--keepgeom``), attaches the whole FreeSurferColorLUT.txt
(``--addctab``) and saves it again through surfa's own writers. :func:`save_like_surfa` does those steps in memory
from the image nibabel would have written, with the same arithmetic (numpy float64 for geometry, float32 for the
sampling coordinates), so that the file agrees with FreeSurfer's in its voxels, header and embedded table.

What surfa sees when it loads a file (:func:`surfa_header`):

* NIfTI: the affine nibabel reports (sform if its code is set, else qform, else the pixdim fallback) and, as the
  voxel size, ``pixdim[1:4]`` itself (not the affine's column norms); rotation, shear and the world centre of voxel
  ``shape / 2`` come from a QR decomposition of that affine. Metres and microns are converted to mm by recomposing
  the affine from the new voxel size. TR (ms) is ``pixdim[4]`` times 1000 / 1 / 0.001 for s / ms / us, else 0.
* MGH: voxel size, direction cosines and centre as stored (float32); the affine is composed from them (no shear),
  not read from nibabel. Intent comes from the version word, tr/flip/te/ti from the footer.

:func:`resample_like` is surfa's ``resample_like(..., method='nearest', fill=0)``: identical geometries are kept as
they are; equal voxel size, rotation and shear (1e-5) with an origin shift within 1e-5 of whole voxels is a copy
into the target grid; anything else samples each target voxel at its source coordinate computed in float32
(``((m0*x + m1*y) + m2*z) + m3``), outside ``[0, shape)`` gives the fill value, inside rounds half away from zero
(C ``round``: exact .5 ties go up) and is clamped to ``shape - 1``.

What surfa writes: a NIfTI from a fresh header (nothing of the input's but the sform/qform codes read back; int32
little-endian), pixdim[4] = TR / 1000 whatever the time units, xyzt_units = mm | the time units read (unknown codes
become seconds), and extension 14 (:mod:`.fsheader`); an .mgz with the shear-less geometry, tr/flip/te/ti/fov and
its tags, gzip level 6. The geometry goes through the same numpy calls as surfa's (QR, inverse, products), so it is
bit-identical wherever numpy's LAPACK/BLAS computes those alike (checked with numpy 1.26 and 2.2).

One FreeSurfer output is not reproduced: a ``.nii`` file with ``--addctab`` and no ``--keepgeom``. surfa
memory-maps the file it re-reads and overwrites it in place, so FreeSurfer writes garbage voxels (the new file's
own bytes read back through the stale mapping) or dies of SIGBUS with only the header written; here that file gets
the segmentation, with the header and extension surfa would have written.
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import StagedOutputs, atomic_write, image_extension
from .fsheader import (
    FS_EXTENSION_CODE,
    MGH_HEADER_BYTES,
    FSMetadata,
    LabelEntry,
    LookupTable,
    fs_metadata,
    mgh_tags,
    nifti_extension_bytes,
    read_embedded_lut,
    read_lut,
)
from .images import save_nifti

__all__ = ["FSMetadata", "Geometry", "LabelEntry", "LookupTable", "SurfaVolume", "nifti_image", "read_embedded_lut",
           "read_lut", "resample_like", "save_like_surfa", "surfa_header", "surfa_load", "surfa_volume",
           "write_volume"]

_TIME_CODES = (0, 8, 16, 24, 32, 40, 48)  # NIfTI time units surfa knows; any other code is written back as seconds
_TR_FACTOR = {8: 1000.0, 16: 1.0, 24: 0.001}  # to ms, from s / ms / us; other units give a TR of 0
_LIA = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # surfa's default orientation
_MGH_TYPES = ((np.bool_, 0, ">u1"), (np.uint8, 0, ">u1"), (np.int32, 1, ">i4"), (np.floating, 3, ">f4"),
              (np.int16, 4, ">i2"), (np.uint16, 10, ">u2"))  # surfa's order: the first match wins
_TOL = 1e-5  # surfa's tolerance for "same voxel size, rotation, shear" and "whole-voxel shift"


@dataclass(frozen=True, eq=False)
class Geometry:
    """An image grid as surfa's ``ImageGeometry`` holds it (all float64): voxel size, rotation, world centre of
    voxel ``shape / 2``, shear (xy, xz, yz) and the voxel-to-world affine."""

    shape: tuple[int, int, int]
    voxsize: np.ndarray
    rotation: np.ndarray
    center: np.ndarray
    shear: np.ndarray
    vox2world: np.ndarray

    @classmethod
    def from_affine(cls, shape: tuple[int, int, int], vox2world: np.ndarray, voxsize: np.ndarray) -> Geometry:
        """The geometry of a NIfTI affine; ``voxsize`` (pixdim) is kept even where the affine's scale differs."""
        affine = np.ascontiguousarray(vox2world, dtype=np.float64)
        center = np.matmul(affine, np.append(np.asarray(shape) / 2, 1))[:3]
        q, r = np.linalg.qr(affine[:3, :3])
        diag = np.diag_indices(3)
        scale = np.abs(r[diag])
        p = np.eye(3)
        p[diag] = r[diag] / scale
        shear = (p @ r) / np.expand_dims(scale, -1)
        return cls(shape, np.array(voxsize, dtype=np.float64), q @ p, center,
                   np.array([shear[0, 1], shear[0, 2], shear[1, 2]]), affine.copy())

    @classmethod
    def from_components(cls, shape: tuple[int, int, int], voxsize: np.ndarray, rotation: np.ndarray,
                        center: np.ndarray, shear: np.ndarray | None = None) -> Geometry:
        """The geometry of an MGH header: the affine is composed around voxel ``shape / 2``."""
        voxsize = np.array(voxsize, dtype=np.float64)
        rotation = np.ascontiguousarray(np.array(rotation, dtype=np.float64))
        center = np.array(center, dtype=np.float64)
        shear = np.zeros(3) if shear is None else np.array(shear, dtype=np.float64)
        skew = np.eye(3)
        skew[0, 1], skew[0, 2], skew[1, 2] = shear
        affine = np.eye(4)
        affine[:3, :3] = rotation @ (np.diag(voxsize) @ skew)
        offset = affine @ np.append(np.asarray(shape) / 2, 1)
        affine[:3, 3] = center - offset[:3]
        return cls(shape, voxsize, rotation, center, shear, affine)

    def equals(self, other: Geometry) -> bool:
        """surfa's ``image_geometry_equal`` (tolerance 0): every parameter exactly the same."""
        pairs = ((self.shape, other.shape), (self.voxsize, other.voxsize), (self.center, other.center),
                 (self.rotation, other.rotation), (self.shear, other.shear), (self.vox2world, other.vox2world))
        return all(np.allclose(a, b, atol=0.0, rtol=0.0) for a, b in pairs)

    def shearless(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What an .mgz header stores (voxel size, rotation, centre). With a shear above 1e-5 (surfa tests the
        signed value: a negative shear is written as if there were none) they are re-derived from the affine."""
        if np.any(self.shear > _TOL):
            center = np.matmul(self.vox2world, np.append(np.asarray(self.shape) / 2, 1))[:3]
            voxsize = np.linalg.norm(self.vox2world[:, :3], axis=0)
            return voxsize, self.vox2world[:3, :3] / voxsize, center
        return self.voxsize, self.rotation, self.center


@dataclass
class SurfaVolume:
    """An image as surfa holds it after loading: voxels (3D), geometry, and the metadata its writers use."""

    data: np.ndarray | None
    geometry: Geometry
    meta: FSMetadata


def _shape3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    dims = [int(s) for s in shape[:3]] + [1] * max(0, 3 - len(shape))
    return dims[0], dims[1], dims[2]


def _nifti_header(img: nib.Nifti1Image) -> SurfaVolume:
    """Geometry and metadata of a NIfTI image, from its header as it would be read back from disk."""
    clone = img.__class__(img.dataobj, img.affine, img.header, extra=img.extra)
    clone.update_header()  # what nibabel does before writing: the affine into the sform/qform if it changed
    header = clone.header.copy()
    header["vox_offset"] = 0  # let the header place its extensions
    buffer = io.BytesIO()
    header.write_to(buffer)
    buffer.seek(0)
    header = header.__class__.from_fileobj(buffer)  # float32 fields, and the repairs nibabel makes on reading
    pixdim = header["pixdim"]
    geometry = Geometry.from_affine(_shape3(header.get_data_shape()), header.get_best_affine(), pixdim[1:4])
    xyzt = int(header["xyzt_units"])
    scale = {1: 1000.0, 3: 0.001}.get(xyzt & 7)  # metres, microns -> mm: surfa recomposes the affine
    if scale is not None:
        geometry = Geometry.from_components(geometry.shape, geometry.voxsize * scale, geometry.rotation,
                                            geometry.center, geometry.shear)
    meta = fs_metadata(header) or FSMetadata()
    time = xyzt & 56
    meta.sform_code, meta.qform_code = int(header["sform_code"]), int(header["qform_code"])
    meta.time_units = time if time in _TIME_CODES else 8
    meta.tr = float(pixdim[4]) * _TR_FACTOR.get(time, 0.0)
    return SurfaVolume(None, geometry, meta)


def _mgh_header(img: nib.MGHImage) -> SurfaVolume:
    """Geometry and metadata of an MGH image: the stored float32 components, surfa's defaults if flagged invalid."""
    clone = img.__class__(img.dataobj, img.affine, img.header, extra=img.extra)
    clone.update_header()
    header = clone.header
    shape = _shape3(tuple(int(d) for d in header["dims"][:3]))
    if int(header["goodRASFlag"]):
        geometry = Geometry.from_components(shape, header["delta"], np.asarray(header["Mdc"]).T, header["Pxyz_c"])
    else:
        geometry = Geometry.from_components(shape, np.ones(3), _LIA, np.zeros(3))
    meta = FSMetadata(intent=(int(header["version"]) >> 8) & 0xFFFF, tr=float(header["tr"]),
                      flip_angle=float(header["flip_angle"]), te=float(header["te"]), ti=float(header["ti"]))
    return SurfaVolume(None, geometry, meta)


def surfa_header(img: nib.spatialimages.SpatialImage) -> SurfaVolume:
    """What ``sf.load_volume`` would see of the file ``img`` is (or would be written as): geometry and metadata,
    without the voxels (``data`` is None). NIfTI-1/2 and MGH images; header-only, nothing is read or copied."""
    if isinstance(img, nib.MGHImage):
        return _mgh_header(img)
    if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return _nifti_header(img)
    raise TypeError(f"surfa geometry of a {type(img).__name__} is not supported (NIfTI or MGH images only)")


def surfa_load(img: nib.spatialimages.SpatialImage, path: str | os.PathLike) -> SurfaVolume:
    """What ``sf.load_volume(path)`` returns right after ``nib.save(img, path)``: the image is serialised as
    nibabel would write it there (an .mgz path converts to MGH, as ``nib.save`` does) and read back."""
    ext = image_extension(path)
    if ext == ".mgz":
        written = nib.MGHImage.from_bytes(nib.MGHImage.from_image(img).to_bytes())
    elif ext in (".nii", ".nii.gz") and isinstance(img, nib.Nifti1Image):
        written = nib.Nifti1Image.from_bytes(img.to_bytes())
    else:
        raise ValueError(f"{path}: surfa's writers are reproduced for .nii, .nii.gz and .mgz (NIfTI-1) only")
    volume = surfa_header(written)
    volume.data = np.asanyarray(written.dataobj)
    if volume.data.ndim != 3:
        raise ValueError(f"{path}: a 3D volume is expected, got shape {volume.data.shape}")
    return volume


def _sample_nearest(data: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray, fill: float) -> np.ndarray:
    """surfa's compiled nearest-neighbour sampler: float32 coordinates, C ``round``, clamp, fill outside."""
    m = np.asarray(affine, dtype=np.float64).astype(np.float32)
    out = np.full(shape, fill, dtype=data.dtype.newbyteorder("="), order="F")
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    y, z = axes[1][:, None], axes[2][None, :]
    step = max(1, (1 << 22) // max(1, shape[1] * shape[2]))  # a few million voxels at a time
    for x0 in range(0, shape[0], step):
        x = axes[0][x0:x0 + step, None, None]
        inside = np.ones((len(x), shape[1], shape[2]), dtype=bool)
        index = []
        for row in range(3):
            s = m[row, 0] * x  # the same float32 operations, in the same order, as the C loop
            s = s + m[row, 1] * y
            s = s + m[row, 2] * z
            s = s + m[row, 3]
            inside &= (s >= 0) & (s < np.float32(data.shape[row]))
            # round half away from zero = floor(s + 0.5) for s >= 0, exact in float64 for any float32 s
            index.append(np.minimum(np.floor(s.astype(np.float64) + 0.5), data.shape[row] - 1))
        picks = [np.broadcast_to(i, inside.shape)[inside].astype(np.intp) for i in index]
        block = out[x0:x0 + step]
        block[inside] = data[picks[0], picks[1], picks[2]]
    return out


def resample_like(data: np.ndarray, source: Geometry, target: Geometry, method: str = "nearest",
                  fill: float = 0) -> np.ndarray:
    """``data`` (on ``source``) on the ``target`` grid, as surfa 0.6.3's ``resample_like`` computes it.

    The result lies on ``target`` (where the geometries are equal, ``source`` is ``target``): the equality shortcut
    returns a copy; the whole-voxel shift keeps the dtype (byte order included); sampling returns the native-endian
    dtype. Only ``nearest`` is implemented (FreeSurfer's ``--keepgeom`` uses nothing else).
    """
    if method != "nearest":
        raise ValueError(f"only nearest-neighbour resampling is reproduced, not {method!r}")
    if data.shape != source.shape:
        raise ValueError(f"data shape {data.shape} does not match its geometry {source.shape}")
    if source.equals(target):
        return data.copy()
    vox2vox = np.matmul(np.linalg.inv(source.vox2world), target.vox2world)  # target voxel -> source voxel
    if np.allclose(source.voxsize, target.voxsize, atol=_TOL, rtol=0.0) and \
            np.allclose(source.rotation, target.rotation, atol=_TOL, rtol=0.0) and \
            np.allclose(source.shear, target.shear, atol=_TOL, rtol=0.0):
        origin = np.dot(np.linalg.inv(vox2vox), np.array([[0.0], [0.0], [0.0], [1.0]])).T[0, :3]
        rounded = origin.round()
        if np.allclose(origin, rounded, atol=_TOL, rtol=0.0):
            target_start, source_start = rounded.astype(np.int64), np.zeros(3, dtype=np.int64)
            target_stop, source_stop = target_start + source.shape, source_start + source.shape
            cut = np.clip(-target_start, 0, None)
            target_start, source_start = target_start + cut, source_start + cut
            cut = np.clip(target_stop - np.array(target.shape), 0, None)
            target_stop, source_stop = target_stop - cut, source_stop - cut
            out = np.full(target.shape, fill, dtype=data.dtype)
            out[tuple(map(slice, target_start, target_stop))] = data[tuple(map(slice, source_start, source_stop))]
            return out
    return _sample_nearest(data, target.shape, vox2vox, fill)


def nifti_image(volume: SurfaVolume) -> nib.Nifti1Image:
    """surfa's NIfTI writer: a fresh header (identity affine), pixdim 1, pixdim[4] = TR in s, mm + the time
    units, sform/qform with the codes read back, pixdim[1:4] = voxel size, and the code-14 extension."""
    data = volume.data.astype(np.uint8) if volume.data.dtype == np.bool_ else volume.data
    img = nib.Nifti1Image(data, np.eye(4))
    header = img.header
    header["pixdim"][:] = 1
    header["pixdim"][4] = 1.0 if volume.meta.tr is None else volume.meta.tr / 1000.0
    header["xyzt_units"] = 2 | volume.meta.time_units
    img.set_sform(volume.geometry.vox2world, volume.meta.sform_code)
    img.set_qform(volume.geometry.vox2world, volume.meta.qform_code)
    header["pixdim"][1:4] = volume.geometry.voxsize.astype(np.float32)
    header.extensions.append(nib.nifti1.Nifti1Extension(FS_EXTENSION_CODE, nifti_extension_bytes(volume.meta)))
    return img


def _f4(*values: float) -> bytes:
    return np.asarray(values, dtype=np.float64).astype(">f4").tobytes()


def _mgh_bytes(volume: SurfaVolume) -> bytes:
    """surfa's .mgz writer, uncompressed: header (version with intent, shape, type, DOF 1, geometry without
    shear), voxels in Fortran order, tr/flip/te/ti/fov, then its tags."""
    data, geometry, meta = volume.data, volume.geometry, volume.meta
    if data.dtype == np.int64:
        if data.size and (data.max() > np.iinfo(np.int32).max or data.min() < np.iinfo(np.int32).min):
            raise ValueError("MGH files hold int32 at most: the labels do not fit")
        data = data.astype(np.int32)
    found = next(((code, dtype) for kind, code, dtype in _MGH_TYPES if np.issubdtype(data.dtype, kind)), None)
    if found is None:
        raise ValueError(f"writing {data.dtype} to MGH is not supported")
    code, dtype = found
    voxsize, rotation, center = geometry.shearless()
    header = np.array([((meta.intent & 0xFFFF) << 8) | 1, *geometry.shape, 1, code, 1], dtype=">u4").tobytes()
    header += np.array(1, dtype=">u2").tobytes() + _f4(*voxsize, *np.ravel(rotation, order="F"), *center)
    header = header.ljust(MGH_HEADER_BYTES, b"\0")
    fov = max(geometry.voxsize * np.asarray(geometry.shape))
    footer = _f4(meta.tr or 0.0, meta.flip_angle, meta.te, meta.ti, fov)
    return header + np.ravel(data, order="F").astype(dtype).tobytes() + footer + mgh_tags(meta)


def surfa_volume(written: nib.Nifti1Image, path: str | os.PathLike, input_image: nib.spatialimages.SpatialImage,
                 keepgeom: bool, lut: LookupTable | None) -> SurfaVolume:
    """The segmentation as surfa holds it just before FreeSurfer 8's ``save_volume`` writes it to ``path`` with
    ``--keepgeom`` and/or ``--addctab``: ``written`` (the image FreeSurfer's nibabel step saves there,
    ``nib.Nifti1Image(seg, aff, input_header)`` with ``set_data_dtype('int32')``) read back as surfa reads it,
    resampled onto ``input_image``'s grid (``keepgeom``), ``lut`` attached. The intermediate file is never written:
    surfa's re-read is reproduced in memory."""
    volume = surfa_load(written, path)
    if keepgeom:
        target = surfa_header(input_image).geometry
        volume = SurfaVolume(resample_like(volume.data, volume.geometry, target), target, volume.meta)
    if lut is not None:
        volume.meta = replace(volume.meta, labels=lut)
    return volume


def write_volume(path: str | os.PathLike, volume: SurfaVolume, stage: StagedOutputs | None = None) -> None:
    """Write ``volume`` as surfa's writers do (the extension picks NIfTI or .mgz), through
    :func:`~.atomic.atomic_write` (or ``stage``). A .nii/.nii.gz file is written by nibabel exactly as surfa has it
    written (deterministic gzip); an .mgz file is gzip level 6 like surfa's, its header naming the target file, with
    a modification time of 0 where surfa records the current time."""
    write = stage.write if stage is not None else atomic_write
    if image_extension(path) == ".mgz":
        raw = _mgh_bytes(volume)
        name = Path(path).name

        def _write_mgz(tmp: Path) -> None:
            with open(tmp, "wb") as fh, gzip.GzipFile(name, "wb", compresslevel=6, fileobj=fh, mtime=0) as gz:
                gz.write(raw)

        write(path, _write_mgz)
    else:
        img = nifti_image(volume)
        write(path, lambda tmp: nib.save(img, str(tmp)))


def save_like_surfa(path: str | os.PathLike, written: nib.Nifti1Image, input_image: nib.spatialimages.SpatialImage,
                    keepgeom: bool, lut: LookupTable | None, stage: StagedOutputs | None = None) -> SurfaVolume | None:
    """Write ``path`` as FreeSurfer 8's ``save_volume`` leaves it with ``--keepgeom`` and/or ``--addctab``
    (:func:`surfa_volume`, then :func:`write_volume`); with neither, FreeSurfer does not call surfa and nibabel's
    file is written as it is. Returns the volume written (its geometry is the input's with ``keepgeom``), or None
    without surfa's part.

    One case differs from FreeSurfer's own result on purpose: a ``.nii`` (uncompressed) output with ``--addctab``
    and without ``--keepgeom``. surfa memory-maps the file nibabel just wrote and overwrites it while reading, which
    leaves garbage voxels or dies with SIGBUS (exit 135); here the file surfa meant to write is written.
    """
    if not keepgeom and lut is None:
        save_nifti(written, path, stage)
        return None
    volume = surfa_volume(written, path, input_image, keepgeom, lut)
    write_volume(path, volume, stage)
    return volume
