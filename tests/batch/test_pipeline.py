"""A batch's overlap (batch/pipeline.py): order, failures, memory waits and interrupts with fake steps (no
network), thread-safe staging, and real batches whose outputs must equal ``--no-overlap``'s byte for byte."""

from __future__ import annotations

import filecmp
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import pytest

from engine_fixtures import crop_img
from synthseg_native.batch import pipeline
from synthseg_native.errors import Cancelled
from synthseg_native.io.atomic import StagedOutputs

WAIT = 20.0  # seconds a test waits for something that should happen at once (never reached when it works)


class FakeSteps:
    """Records what the pipeline asks for; ``hooks[(step, k)]`` runs inside that step (to fail, block, check)."""

    def __init__(self, fits: bool = True):
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.hooks: dict[tuple[str, int], object] = {}
        self.abandoned: list[int] = []
        self.fits_answer = fits
        self.checkpoint = lambda: None
        self.threads: dict[str, set[str]] = {}

    def _note(self, step: str, k: int) -> None:
        with self.lock:
            self.events.append((step, k))
            self.threads.setdefault(step, set()).add(threading.current_thread().name)
        hook = self.hooks.get((step, k))
        if hook is not None:
            hook()  # type: ignore[operator]

    def started(self, k: int) -> None:
        self._note("started", k)

    def create(self, k: int) -> int:
        self._note("create", k)
        return k

    def read(self, job: int) -> None:
        self._note("read", job)

    def network(self, job: int) -> None:
        self._note("network", job)
        self._note("network end", job)

    def finish(self, job: int) -> None:
        self._note("finish", job)
        self.checkpoint()
        self._note("done", job)

    def failed(self, k: int, exc: Exception) -> None:
        self._note("failed", k)

    def fits(self, job: int) -> bool:
        return self.fits_answer

    def abandon(self, job: int) -> None:
        with self.lock:
            self.abandoned.append(job)

    def outcomes(self) -> list[tuple[str, int]]:
        return [e for e in self.events if e[0] in ("done", "failed")]


def run(steps: FakeSteps, todo: list[int], overlap: bool = True) -> pipeline.Run[int]:
    flow: pipeline.Run[int] = pipeline.Run(steps, overlap=overlap)
    steps.checkpoint = flow.checkpoint
    flow.run(todo)
    return flow


def fail() -> None:
    raise ValueError("broken")


@pytest.mark.parametrize("overlap", [True, False])
def test_every_scan_in_order_with_its_steps_in_their_threads(overlap):
    steps = FakeSteps()
    run(steps, [0, 1, 2, 3], overlap=overlap)
    assert steps.outcomes() == [("done", k) for k in range(4)]
    for k in range(4):
        order = [s for s, j in steps.events if j == k]
        assert order == ["started", "create", "read", "network", "network end", "finish", "done"] or \
            order.index("read") < order.index("network") < order.index("finish")
    assert sorted(steps.abandoned) == [0, 1, 2, 3]  # each job let go once finished (idempotent release)
    main = threading.main_thread().name
    assert steps.threads["network"] == {main}
    if overlap:
        assert steps.threads["read"] == {"synthseg-read"} and steps.threads["finish"] == {"synthseg-write"}
    else:
        assert steps.threads["read"] == steps.threads["finish"] == {main}


def test_the_next_scan_is_read_and_the_previous_finished_while_the_network_runs():
    """Scan 1's network waits until scan 2 was read and scan 0 finished: a sequential loop would hang here."""
    steps = FakeSteps()
    read_2, done_0 = threading.Event(), threading.Event()
    steps.hooks[("read", 2)] = read_2.set
    steps.hooks[("done", 0)] = done_0.set

    def network_1() -> None:
        assert read_2.wait(WAIT) and done_0.wait(WAIT), "no overlap"

    steps.hooks[("network", 1)] = network_1
    run(steps, [0, 1, 2])
    assert steps.outcomes() == [("done", 0), ("done", 1), ("done", 2)]


def test_failures_are_reported_in_the_plans_order_and_the_others_carry_on():
    steps = FakeSteps()
    slow_finish_0 = threading.Event()
    steps.hooks[("finish", 0)] = lambda: slow_finish_0.wait(0.3)  # the failures of 1-4 are known before 0 is done
    for step, k in (("create", 1), ("read", 2), ("network", 3), ("finish", 4)):
        steps.hooks[(step, k)] = fail
    run(steps, [0, 1, 2, 3, 4, 5])
    assert steps.outcomes() == [("done", 0), ("failed", 1), ("failed", 2), ("failed", 3), ("failed", 4),
                                ("done", 5)]
    assert 1 not in steps.abandoned and {2, 3, 4} <= set(steps.abandoned)  # created jobs are let go


def test_a_network_that_does_not_fit_beside_the_previous_finish_waits_for_it():
    steps = FakeSteps(fits=False)
    steps.hooks[("finish", 0)] = lambda: time.sleep(0.2)
    run(steps, [0, 1, 2])
    ev = steps.events
    for k in (1, 2):
        assert ev.index(("done", k - 1)) < ev.index(("network", k))


def test_interrupt_abandons_what_is_in_flight_and_propagates_quickly():
    """Ctrl-C during scan 1's network while scan 0's write hangs: every job in flight is abandoned (its files
    removed, locks released) within the grace period, and the write, once it returns, commits nothing."""
    steps = FakeSteps()
    hang, release, read_2 = threading.Event(), threading.Event(), threading.Event()

    def stuck_write() -> None:
        hang.set()
        release.wait(WAIT)

    def ctrl_c() -> None:
        assert hang.wait(WAIT) and read_2.wait(WAIT)
        raise KeyboardInterrupt

    steps.hooks[("finish", 0)] = stuck_write
    steps.hooks[("read", 2)] = read_2.set
    steps.hooks[("network", 1)] = ctrl_c
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run(steps, [0, 1, 2, 3])
    assert time.perf_counter() - t0 < pipeline.GRACE_S + 2
    assert {0, 1, 2} <= set(steps.abandoned)  # finishing, in the network, being read
    release.set()
    time.sleep(0.2)
    assert steps.outcomes() == []  # the write's checkpoint saw the interrupt: no done, no failed
    assert ("create", 3) not in steps.events


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failure_of_the_bookkeeping_itself_stops_the_batch_and_lets_go_of_everything(overlap):
    """Not a scan's failure (that is reported and the batch goes on) but the batch's own, e.g. a shared table that
    can no longer be written: it propagates, one at a time or overlapped, and no job stays locked."""
    steps = FakeSteps()

    def broken_table() -> None:
        raise RuntimeError("table gone")

    steps.hooks[("network", 1)] = fail
    steps.hooks[("failed", 1)] = broken_table  # reporting scan 1's failure fails
    steps.hooks[("network", 3)] = lambda: time.sleep(0.3)  # the writer's error is seen while the batch still runs
    with pytest.raises(RuntimeError, match="table gone"):
        run(steps, list(range(6)), overlap=overlap)
    created = {k for step, k in steps.events if step == "create"}
    assert created <= set(steps.abandoned)
    assert ("done", 5) not in steps.events


def test_staged_outputs_abandoned_from_another_thread_leave_nothing(tmp_path):
    stage = StagedOutputs()
    target = tmp_path / "seg.nii.gz"
    writing, abandoned = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow_writer(tmp: Path) -> None:
        tmp.write_bytes(b"part")
        writing.set()
        assert abandoned.wait(WAIT)
        tmp.write_bytes(b"part and more")  # into a file the main thread already removed

    def worker() -> None:
        try:
            stage.write(target, slow_writer)
        except BaseException as exc:
            errors.append(exc)
        try:
            stage.commit()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    assert writing.wait(WAIT)
    stage.abort()
    abandoned.set()
    thread.join(WAIT)
    assert [type(e) for e in errors] == [Cancelled, Cancelled]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Cancelled):
        stage.write(tmp_path / "other.nii.gz", lambda tmp: tmp.write_bytes(b"x"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ real batches


@pytest.fixture(scope="module")
def scans(tmp_path_factory, mni_img) -> Path:
    """Three small real scans (MNI152 blocks at different places) in one folder."""
    folder = tmp_path_factory.mktemp("scans")
    for k, lo in enumerate(((60, 70, 55), (50, 80, 60), (70, 60, 50))):
        nib.save(crop_img(mni_img, lo, (64, 72, 64)), folder / f"scan{k}.nii.gz")
    return folder


def cli(*args: object, **kw: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "synthseg_native", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


@pytest.mark.slow
def test_overlapped_batch_writes_the_same_bytes_as_one_at_a_time(weights, scans, tmp_path):
    models = weights.need("seg2")
    outs = {}
    for mode, extra in (("overlap", []), ("sequential", ["--no-overlap"])):
        out = tmp_path / mode
        proc = cli("--i", scans, "--o", out / "seg", "--post", out / "post", "--resample", out / "res",
                   "--vol", out / "vols.csv", "--models", models, "--threads", "2", *extra)
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr.decode()
        err = stderr.decode() + stdout.decode()
        done = [line for line in err.splitlines() if line.startswith("[DONE]")]
        assert [d.split()[1].rsplit("/", 1)[1] for d in done] == [f"scan{k}.nii.gz" for k in range(3)]
        outs[mode] = out
    names = sorted(str(p.relative_to(outs["overlap"])) for p in outs["overlap"].rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(outs["sequential"])) for p in outs["sequential"].rglob("*")
                           if p.is_file())
    assert len([n for n in names if n.startswith("seg/")]) == 3
    for name in names:
        if name.endswith(".json"):
            continue
        assert filecmp.cmp(outs["overlap"] / name, outs["sequential"] / name, shallow=False), name


@pytest.mark.slow
def test_sigterm_in_an_overlapped_batch_leaves_only_whole_scans(weights, scans, tmp_path):
    """SIGTERM while scan 2's network runs (scan 1 is being written, scan 3 read): one [ERR] line, exit 143, and
    every scan in the output folder complete (segmentation and posteriors), with no temporary or lock left."""
    out = tmp_path / "out"
    proc = cli("--i", scans, "--o", out / "seg", "--post", out / "post", "--models", weights.need("seg2"),
               "--threads", "2")
    runs = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(b"[RUN ]"):
            runs += 1
            if runs == 2:
                break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    errors = [line for line in stderr.decode().splitlines() if line.startswith("[ERR]")]
    assert len(errors) == 1 and errors[0].startswith("[ERR] interrupted (SIGTERM) while segmenting ")
    assert "no partial output left" in errors[0]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert not [f for f in files if f.startswith(".")], files  # no temporary, no lock file
    segs = {f.split("_synthseg")[0] for f in files if "_synthseg" in f}
    posts = {f.split("_posteriors")[0] for f in files if "_posteriors" in f}
    assert segs == posts
    assert len(segs) == int(errors[0].split("left; ")[1].split(" of ")[0])
