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
    """How the backend runs in this process: threads in effect, the device's name, the precision granted, and for
    a GPU the memory that bounds an image (``memory.decide``)."""

    threads: int
    device: str
    precision: str
    backend: str = "tf"
    device_kind: str = "cpu"                 # "cpu", "cuda", "mps": where the networks' tensors live
    device_memory: float | None = None       # bytes free on a GPU (its memory is the budget); None: host memory
    device_memory_source: str = "host memory"
