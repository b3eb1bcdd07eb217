"""What a backend reports about a run: its settings (:class:`Runtime`) and where the time went (:class:`Timings`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import machine


@dataclass
class Timings:
    """Seconds per stage, and the process's peak memory when each stage last ended (--profile)."""

    stages: dict[str, float] = field(default_factory=dict)
    peak_gb: dict[str, float] = field(default_factory=dict)
    network_flop: int = 0

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        self.peak_gb[stage] = machine.peak_rss() / 1e9

    def merge(self, other: Timings) -> None:
        """Add another record's seconds and FLOPs (one scan's, into its batch's), keeping the peak memory each
        stage had when it ended there, not now."""
        for stage, seconds in other.stages.items():
            self.stages[stage] = self.stages.get(stage, 0.0) + seconds
            self.peak_gb[stage] = max(self.peak_gb.get(stage, 0.0), other.peak_gb.get(stage, 0.0))
        self.network_flop += other.network_flop


@dataclass(frozen=True)
class Runtime:
    """How the backend runs in this process: threads in effect, the device's name, the precision granted, where the
    networks' tensors live, and the framework's version (for messages and the device self-check's cache)."""

    threads: int
    device: str
    precision: str
    backend: str = "tf"
    device_kind: str = "cpu"                 # "cpu", "cuda", "mps": where the networks' tensors live
    framework: str = ""                      # e.g. "PyTorch 2.13.0", "TensorFlow 2.15.1"


@dataclass(frozen=True)
class DeviceMemory:
    """What bounds an image on a GPU (``engine.memory.decide``): the memory the networks may still use there, where
    that figure came from, whether the GPU shares the host's memory (Apple silicon: the host's part of the run then
    comes out of the same memory), and the largest single tensor the device can hold (MPS: arrays over 2^32 bytes or
    2^31 elements fail)."""

    free: float | None
    where: str
    unified: bool = False
    tensor_cap: float | None = None
