"""Overlap in a batch: while the network runs on scan k, scan k+1 is read and prepared and scan k-1 is
post-processed and written (nnU-Net's pattern of reading and export beside the prediction).

Why: the network is most of a scan's time, not all of it. Reading and resampling the input, upstream's
post-processing and writing the outputs (gzip of 33 posterior channels alone takes seconds) are mostly
single-threaded stretches during which the cores the network uses sit idle, and on a GPU the device waits
for all of them. Threads, not processes: TensorFlow, PyTorch, NumPy, SciPy and zlib release the GIL in
their long calls, and a thread shares the loaded networks and the arrays without copies.

What stays as it was (tests/batch/test_pipeline.py):

- **Order.** Scans are read, run and finished in the plan's order by one reader and one writer thread, and
  every step of bookkeeping (``[DONE]``/``[ERR]`` lines, shared tables, provenance, snapshots, progress)
  runs in the writer, in order. A scan that fails is reported in its place and the batch goes on.
- **Results.** The steps are the functions a sequential batch runs, on the same arrays: the outputs are
  byte for byte those of ``--no-overlap``.
- **Memory.** A scan's network starts beside the previous scan's finishing only if the budget holds both
  (``Steps.fits``); otherwise it waits for the writer. Overlap never makes a scan tile.
- **Interrupts.** Only the main thread receives signals. On Ctrl-C or SIGTERM it tells the workers to stop
  at their next step, waits at most :data:`GRACE_S` for them, then abandons what is still in flight
  (temporaries removed, locks released: ``Steps.abandon``), so "no partial output left" holds, also when
  SLURM's SIGKILL follows its SIGTERM a few seconds later. The workers are daemon threads: a write that
  was abandoned cannot hold up the exit.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, Generic, Protocol, TypeVar

from ..errors import Cancelled

logger = logging.getLogger(__name__)

GRACE_S = 2.0  # how long an interrupted batch waits for its workers to reach a step's end before abandoning

J = TypeVar("J")


class Steps(Protocol[J]):
    """What :func:`run` does with each scan ``k``; a job ``J`` is one scan in flight."""

    def started(self, k: int) -> None:
        """Main thread, just before scan k's network (its ``[RUN ]`` line)."""

    def create(self, k: int) -> J:
        """Reader: the checks and locks before any work (cheap); raising fails the scan."""

    def read(self, job: J) -> None:
        """Reader: load and prepare the image."""

    def network(self, job: J) -> None:
        """Main thread: the networks."""

    def finish(self, job: J) -> None:
        """Writer: post-process, write, commit, and the bookkeeping of a finished scan."""

    def failed(self, k: int, exc: Exception) -> None:
        """Writer (so in order): the ``[ERR]`` line and the bookkeeping of a failed scan."""

    def fits(self, job: J) -> bool:
        """May the job's network run while the previous scan is being finished (memory)?"""

    def abandon(self, job: J) -> None:
        """Any thread, idempotent: remove the job's staged files and release its locks."""


class Worker:
    """One daemon thread that runs submitted calls one after another, in order."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, fn, args))
        return future

    def stop(self) -> None:
        """No more calls: the thread ends after the ones queued (it is not waited for)."""
        self._queue.put(None)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)


class Run(Generic[J]):
    """One batch's scans through ``steps``, overlapped or one at a time."""

    def __init__(self, steps: Steps[J], overlap: bool):
        self.steps, self.overlap = steps, overlap
        self.cancel = threading.Event()
        self._inflight: list[J] = []          # created and not yet finished or abandoned
        self._lock = threading.Lock()

    def checkpoint(self) -> None:
        """Called by the steps between their parts: raises :class:`Cancelled` once the batch is interrupted."""
        if self.cancel.is_set():
            raise Cancelled("the batch was interrupted")

    # -- the parts of one scan, wrapped ---------------------------------------------------------------
    def _open(self, k: int) -> tuple[J | None, Exception | None]:
        """Reader: create and read scan k; on failure the exception, which the main thread reports in order."""
        self.checkpoint()
        try:
            job = self.steps.create(k)
        except Cancelled:
            raise
        except Exception as exc:
            return None, exc
        with self._lock:
            self._inflight.append(job)
        try:
            self.checkpoint()
            self.steps.read(job)
        except Exception as exc:
            self._drop(job)
            if isinstance(exc, Cancelled):
                raise
            return None, exc
        return job, None

    def _finish(self, k: int, job: J) -> None:
        try:
            self.checkpoint()
            self.steps.finish(job)
        except Cancelled:
            pass
        except Exception as exc:
            self._drop(job)  # its temporaries go before the [ERR] line says so
            self._failed(k, exc)
        finally:
            self._drop(job)

    def _failed(self, k: int, exc: Exception) -> None:
        if not self.cancel.is_set():
            self.steps.failed(k, exc)

    def _drop(self, job: J) -> None:
        self.steps.abandon(job)
        with self._lock:
            if job in self._inflight:
                self._inflight.remove(job)

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, todo: list[int]) -> None:
        """Every scan of ``todo``; returns when the last one is finished. Ctrl-C/SIGTERM (KeyboardInterrupt in
        the main thread) abandons what is in flight and propagates."""
        if not self.overlap or len(todo) < 2:
            self._sequential(todo)
            return
        reader, writer = Worker("synthseg-read"), Worker("synthseg-write")
        opening: Future[Any] | None = reader.submit(self._open, todo[0])
        finishing: Future[Any] | None = None
        queued: list[Future[Any]] = []  # the writer's calls not yet checked for an error of their own

        def write(fn: Callable[..., Any], *args: Any) -> Future[Any]:
            future = writer.submit(fn, *args)
            queued.append(future)
            while queued and queued[0].done():
                queued.pop(0).result()  # bookkeeping that failed stops the batch, as it does one at a time
            return future

        try:
            for i, k in enumerate(todo):
                self.steps.started(k)
                assert opening is not None
                job, error = opening.result()
                opening = reader.submit(self._open, todo[i + 1]) if i + 1 < len(todo) else None
                if job is None:
                    assert error is not None
                    write(self._failed, k, error)  # the writer's queue keeps the plan's order
                    continue
                if finishing is not None and not self.steps.fits(job):
                    finishing.result()  # the budget holds this scan's network, not also the previous one's finish
                try:
                    self.steps.network(job)
                except Exception as exc:
                    self._drop(job)
                    write(self._failed, k, exc)
                    continue
                finishing = write(self._finish, k, job)
            for future in queued:
                future.result()
        except BaseException:  # Ctrl-C/SIGTERM, or a failure of the batch itself: nothing in flight may stay behind
            self._interrupted([f for f in (opening, finishing) if f is not None])
            raise
        finally:
            reader.stop()
            writer.stop()

    def _sequential(self, todo: list[int]) -> None:
        try:
            for k in todo:
                self.steps.started(k)
                job, error = self._open(k)
                if job is None:
                    assert error is not None
                    self._failed(k, error)
                    continue
                try:
                    self.steps.network(job)
                except Exception as exc:
                    self._drop(job)
                    self._failed(k, exc)
                    continue
                self._finish(k, job)
        except BaseException:
            self.cancel.set()
            self._abandon_all()
            raise

    def _interrupted(self, pending: list[Future[Any]]) -> None:
        """Stop the workers at their next step, wait a little for them, abandon whatever is still in flight."""
        self.cancel.set()
        try:
            wait_futures([f for f in pending if not f.done()], timeout=GRACE_S)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, still clean up
            pass
        self._abandon_all()

    def _abandon_all(self) -> None:
        with self._lock:
            jobs, self._inflight = list(self._inflight), []
        for job in jobs:
            self.steps.abandon(job)
