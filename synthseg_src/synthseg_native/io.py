"""Reading and writing MRI volumes (.nii, .nii.gz, .mgz) the way upstream SynthSeg does.

Outputs must be byte-identical to upstream's, so images are built with the same nibabel calls
(input header reused, data rounded and cast like upstream), but every file is first written to a
temporary name in the target directory and renamed into place: a crash never leaves a partial file
that a cache could mistake for a finished result. :class:`StagedOutputs` extends this to all the
files of one image, which appear together or not at all.

Reading checks what nibabel would otherwise turn into a silent wrong answer (complex data read as its
real part) or an obscure exception (truncated files, headers promising more voxels than the file
holds), so that a bad file in a batch costs one clear ``[ERR]`` line.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import re
import signal
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mgz")
TEMP_TAG = ".tmp"  # temporary files are ".<target name>.<8 random chars>.tmp<ext>" beside the target


class InputError(Exception):
    """A problem with one input image; the message names the file and the cause."""


class OutputError(OSError):
    """An output could not be written; the message names the output and the cause (errno kept)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror)


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


def _open(path: str):
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
    both are refused here, before any memory is spent on the voxels.
    """
    return _checked(str(path))[1]


def _checked(path: str):
    img = _open(path)
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields is not None:
        raise InputError(f"{path}: RGB/structured voxel type {dtype} is not supported (convert to a grey-level "
                         "image, e.g. one channel or the luminance)")
    if dtype.kind == "c":
        raise InputError(f"{path}: complex-valued voxels ({dtype}) are not supported (use the magnitude image)")
    if dtype.kind not in "biuf":
        raise InputError(f"{path}: voxel type {dtype} is not supported")
    shape = tuple(int(s) for s in img.shape)
    if image_extension(path) == ".nii" and isinstance(img, nib.Nifti1Image):
        need = int(img.header.get_data_offset()) + int(np.prod(shape)) * dtype.itemsize
        have = os.path.getsize(path)
        if have < need:
            raise InputError(f"{path}: header/data size mismatch: the header describes {need} bytes "
                             f"(offset + {'x'.join(map(str, shape))} voxels of {dtype}), the file holds {have} "
                             "(truncated, or a wrong header)")
    return img, ImageInfo(shape, tuple(float(z) for z in img.header.get_zooms()), dtype)


def load_image(path: str | os.PathLike) -> LoadedImage:
    path = str(path)
    img = _checked(path)[0]
    try:
        data = np.squeeze(img.get_fdata())
    except Exception as exc:  # nibabel raises many types for corrupt or truncated files
        raise InputError(f"{path}: cannot read image ({_cause(exc)})") from exc
    if data.ndim == 0 or data.size == 0:
        raise InputError(f"{path}: image has no voxels")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: affine is singular or not finite (voxel-to-world matrix {affine[:3].tolist()}); "
                         "fix the header (sform/qform) first")
    n_dims, n_channels = _dims(data.shape) if data.ndim > 1 else (1, 1)
    header = img.header
    # Voxel sizes of the spatial axes. Upstream takes as many as its channel guess leaves (two for a scan
    # with <= 10 slices, four for a 4D series with > 10 frames: both then crash its resampling check);
    # three is what such scans need.
    if image_extension(path) == ".mgz":
        res = np.array(header["delta"])
    else:
        res = np.array(header["pixdim"][1:min(max(n_dims, min(3, data.ndim)), 3) + 1])
    if not np.all(np.isfinite(res)):
        raise InputError(f"{path}: voxel sizes in the header are not finite ({res.tolist()})")
    return LoadedImage(data, affine, header, n_dims, n_channels, res)


_DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP back for a few system calls that must not be split: creating a
    file and recording it for clean-up, taking a lock, renaming an image's outputs into place. A signal
    that arrives meanwhile is acted on (and cleans up as usual) right after the block.

    Blocking the signal in the kernel is not enough: Python runs its handlers later, at any bytecode, so
    a signal delivered just before the block would still raise inside it. The handlers themselves are
    swapped for a recorder instead (main thread only; elsewhere signals never reach Python code).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, object] = {}
    try:
        for sig in _DEFERRED:
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_path(path: Path) -> Path:
    """A unique temporary name beside ``path`` that keeps its extension, so nibabel picks the format."""
    ext = image_extension(path) or path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{TEMP_TAG}{ext}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def stale_temps(path: str | os.PathLike) -> list[Path]:
    """Temporary files a killed run (SIGKILL, power loss) left for ``path``; only ever hidden names."""
    target = Path(path)
    ext = image_extension(target) or target.suffix
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}{re.escape(TEMP_TAG + ext)}")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [target.parent / n for n in names if pattern.fullmatch(n)]


def check_writable(path: str | os.PathLike) -> None:
    """Fail before the work, not after it: ``path`` must be creatable as a file in a writable folder."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(errno.EISDIR, f"{target}: output path is an existing directory")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(exc.errno, f"{target}: cannot create the output folder {parent} ({exc.strerror or exc})"
                          ) from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(errno.EACCES, f"{target}: output folder {parent} is not writable")


def _write_temp(target: Path, writer: Callable[[Path], None], temps: set[Path]) -> Path:
    """Run ``writer`` on a fresh temporary beside ``target``, recorded in ``temps`` from the moment it
    exists (whoever owns ``temps`` removes what is left there); on failure it is removed at once."""
    check_writable(target)
    try:
        with deferred_signals():  # no interrupt between creating the file and recording it
            tmp = _temp_path(target)
            temps.add(tmp)
    except OSError as exc:
        raise OutputError(exc.errno, f"{target}: cannot write ({exc.strerror or exc})") from exc
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs follow the umask like any file
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        temps.discard(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(exc.errno, f"{target}: cannot write ({exc.strerror or exc})") from exc
        raise
    return tmp


def _rename(tmp: Path, target: Path, temps: set[Path]) -> None:
    try:
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(exc.errno, f"{target}: cannot rename into place ({exc.strerror or exc})") from exc
    temps.discard(tmp)


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and rename the result onto ``path`` only if it succeeded."""
    target = Path(path)
    temps: set[Path] = set()
    try:
        tmp = _write_temp(target, writer, temps)
        with deferred_signals():
            _rename(tmp, target, temps)
    finally:
        for left in temps:
            left.unlink(missing_ok=True)


class StagedOutputs:
    """All the files of one image, written to temporaries and renamed into place only by :meth:`commit`.

    A failure or an interrupt anywhere before the commit (a later output hitting a full disk, Ctrl-C
    in the post-processing) removes every temporary and leaves each target as it was: an image's
    outputs are never half new, half missing. Signals are held back during the renames; a SIGKILL
    among them is what the provenance sidecar, written after them, guards against.
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}  # target -> its latest temporary
        self._temps: set[Path] = set()       # every temporary not yet renamed or removed

    def write(self, path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
        target = Path(path)
        tmp = _write_temp(target, writer, self._temps)
        old = self._staged.get(target)
        self._staged[target] = tmp
        if old is not None:  # staged twice (an .mgz rewritten with its colour table): the first one is spent
            old.unlink(missing_ok=True)
            self._temps.discard(old)

    def source(self, path: str | os.PathLike) -> Path:
        """Where the staged content of ``path`` can be read before the commit (or ``path`` itself)."""
        return self._staged.get(Path(path), Path(path))

    def commit(self) -> None:
        """Rename everything into place; signals wait until the last rename, so Ctrl-C never splits a set."""
        with deferred_signals():
            try:
                for target, tmp in self._staged.items():
                    _rename(tmp, target, self._temps)
            finally:
                self._staged.clear()
                self.abort()

    def abort(self) -> None:
        with deferred_signals():  # a second Ctrl-C must not stop the clean-up half-way
            for tmp in self._temps:
                tmp.unlink(missing_ok=True)
            self._temps.clear()
            self._staged.clear()

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def save_image(volume: np.ndarray, affine: np.ndarray, header, path: str | os.PathLike,
               dtype: str | None = None, stage: StagedOutputs | None = None) -> None:
    """Write like upstream's ``save_volume``: input header reused, ints rounded, dtype forced."""
    if dtype is not None:
        if "int" in dtype:
            volume = np.round(volume)
        volume = volume.astype(dtype=dtype)
        img = nib.Nifti1Image(volume, affine, header)
        img.set_data_dtype(dtype)
    else:
        img = nib.Nifti1Image(volume, affine, header)
    (stage.write if stage is not None else atomic_write)(path, lambda tmp: nib.save(img, str(tmp)))


def write_text(path: str | os.PathLike, text: str, stage: StagedOutputs | None = None) -> None:
    """Atomically replace a small text file (CSV, JSON sidecar).

    UTF-8; a file name that is not valid UTF-8 (a subject column) keeps its original bytes.
    """
    def _write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(text)
    (stage.write if stage is not None else atomic_write)(path, _write)
