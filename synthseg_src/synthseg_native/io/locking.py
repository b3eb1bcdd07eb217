"""Exclusive locks on output files, so two runs never write the same output at once.

Atomic renames already keep each file whole, but two runs writing the same outputs would still
interleave: one run's segmentation next to the other's posteriors, or a shared volume CSV that
keeps only the rows of whichever run rewrote it last. So a run holds a lock on every output it is
about to write, and a second run that wants one of them **fails at once** with a message naming the
holder (it does not wait: in a batch it would only redo the same image, and a queue of waiting jobs
hides the mistake of starting the same job twice). The batch goes on with its other images.

The lock is ``flock(2)`` on a hidden file ``.<output name>.lock`` beside the output. The kernel
releases it when the holder exits for any reason, SIGKILL included, so a crashed run never leaves a
stale lock behind; the file itself is removed on release, and a lock file left by a killed run is
simply reused. ``flock`` works on local file systems; on NFS, Linux maps it to byte-range locks,
which work only where the server supports them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from ..errors import LockedError
from .atomic import deferred_signals


def lock_path(path: str | os.PathLike) -> Path:
    target = Path(path)
    return target.with_name(f".{target.name}.lock")


class OutputLock:
    """A non-blocking exclusive lock on one output path (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = lock_path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            with deferred_signals():  # an interrupt must not leave a descriptor or lock file nobody releases
                self._acquire()
        except KeyboardInterrupt:  # delivered as the block ends, with the lock already taken
            self.release()
            raise

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise LockedError(f"{self.path}: another run{holder} is writing this output; "
                                      "not touched (wait for it to finish, or stop it)") from exc
                raise
            # The previous holder may have removed the file between our open and our lock: then we hold a
            # lock on a file nobody else can find, and must start again on the current one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with deferred_signals():
            try:
                self.file.unlink(missing_ok=True)  # while still locked, so nobody else is holding this file
            finally:
                os.close(self._fd)  # closing the descriptor releases the lock
                self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


class LockSet:
    """Locks on several outputs, taken in a fixed order and all released together."""

    def __init__(self, paths: list[str | os.PathLike]):
        unique = sorted({os.path.abspath(p) for p in paths})
        self.locks = [OutputLock(p) for p in unique]

    def __enter__(self) -> LockSet:
        try:
            for lock in self.locks:
                lock.acquire()
        except BaseException:
            self.__exit__(None, None, None)  # releases the locks taken (a no-op for the others)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with deferred_signals():  # a second Ctrl-C must not stop the release half-way
            for lock in reversed(self.locks):
                lock.release()
