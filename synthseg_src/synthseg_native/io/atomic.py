"""Atomic outputs: every file is written to a temporary name beside its target and renamed into place.

A crash never leaves a partial file that a cache could mistake for a finished result.
:class:`StagedOutputs` extends this to all the files of one image, which appear together or not at
all; :func:`deferred_signals` keeps Ctrl-C, SIGTERM and SIGHUP from splitting the few system calls
that must not be split.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

from ..errors import Cancelled, OutputError

TEMP_TAG = ".tmp"  # temporary files are ".<target name>.<8 random chars>.tmp<ext>" beside the target
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mgz")


def image_extension(path: str | os.PathLike) -> str | None:
    """The image extension of ``path`` (``.nii.gz``, ``.nii``, ``.mgz``), or None."""
    name = os.path.basename(str(path)).lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


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


def _write_temp(target: Path, writer: Callable[[Path], None], temps: set[Path],
                guard: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext) -> Path:
    """Run ``writer`` on a fresh temporary beside ``target``, recorded in ``temps`` from the moment it
    exists (whoever owns ``temps`` removes what is left there); on failure it is removed at once.
    ``guard`` is held while the temporary is created and recorded (a stage's lock, see :class:`StagedOutputs`)."""
    check_writable(target)
    try:
        with deferred_signals(), guard():  # no interrupt between creating the file and recording it
            tmp = _temp_path(target)
            temps.add(tmp)
    except OSError as exc:
        raise OutputError(exc.errno, f"{target}: cannot write ({exc.strerror or exc})") from exc
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs follow the umask like any file
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        with guard():
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

    A batch writes one scan's files in a worker thread while the main thread, which alone receives
    signals, may have to give up on it (``batch.pipeline``): :meth:`abort` may then be called from the
    main thread at any moment. A lock makes it exclusive with creating a temporary and with the renames,
    and after it the stage is closed: a later :meth:`write` or :meth:`commit` raises :class:`Cancelled`
    instead of leaving a file behind or committing half a set.
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}  # target -> its latest temporary
        self._temps: set[Path] = set()       # every temporary not yet renamed or removed
        self._lock = threading.RLock()
        self._closed = False

    @contextlib.contextmanager
    def _open(self) -> Iterator[None]:
        """Held while a temporary is created and recorded: none may appear after :meth:`abort`."""
        with self._lock:
            if self._closed:
                raise Cancelled("staged outputs were abandoned")
            yield

    def write(self, path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
        target = Path(path)
        tmp = _write_temp(target, writer, self._temps, self._open)
        try:
            with self._open():
                old = self._staged.get(target)
                self._staged[target] = tmp
        except Cancelled:  # abandoned meanwhile: a writer that opened the name after abort() made it anew
            tmp.unlink(missing_ok=True)
            raise
        if old is not None:  # staged twice (an .mgz rewritten with its colour table): the first one is spent
            old.unlink(missing_ok=True)
            with self._lock:
                self._temps.discard(old)

    def source(self, path: str | os.PathLike) -> Path:
        """Where the staged content of ``path`` can be read before the commit (or ``path`` itself)."""
        return self._staged.get(Path(path), Path(path))

    def commit(self) -> None:
        """Rename everything into place; signals wait until the last rename, so Ctrl-C never splits a set."""
        with deferred_signals(), self._open():
            try:
                for target, tmp in self._staged.items():
                    _rename(tmp, target, self._temps)
            finally:
                self._staged.clear()
                self.abort()

    def abort(self) -> None:
        """Remove every temporary and close the stage (nothing more can be written or committed)."""
        with deferred_signals(), self._lock:  # a second Ctrl-C must not stop the clean-up half-way
            self._closed = True
            for tmp in self._temps:
                tmp.unlink(missing_ok=True)
            self._temps.clear()
            self._staged.clear()

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def write_text(path: str | os.PathLike, text: str, stage: StagedOutputs | None = None) -> None:
    """Atomically replace a small text file (CSV, JSON sidecar).

    UTF-8; a file name that is not valid UTF-8 (a subject column) keeps its original bytes.
    """
    def _write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(text)
    (stage.write if stage is not None else atomic_write)(path, _write)
