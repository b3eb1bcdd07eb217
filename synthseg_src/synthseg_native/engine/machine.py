"""Facts about this machine that several layers report: CPU model and flags, memory, peak RSS.

One home for each, so the engine's memory check, ``--profile``, ``make bench``, ``make roofline``
and the precision check all read them the same way. Linux first (/proc), with the macOS
equivalents where a Mac differs (``ru_maxrss`` is in bytes there, KiB on Linux).
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of CPUs with fast bfloat16


def cpu_flags() -> set[str]:
    """The CPU's feature flags on Linux (empty elsewhere: then no reduced precision on the CPU)."""
    return set(cpuinfo_field("flags").split())


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & BF16_CPU_FLAGS)


def cpuinfo_field(name: str) -> str:
    """The first ``name : value`` of ``/proc/cpuinfo`` (``vendor_id``, ``model name``); empty where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """``/proc/cpuinfo``'s vendor (``GenuineIntel``, ``AuthenticAMD``); empty where there is none."""
    return cpuinfo_field("vendor_id")


def cpu_model() -> str:
    """``lscpu``'s model name, for every results set."""
    model = cpuinfo_field("model name")
    if model:
        return model
    if sys.platform == "darwin":
        proc = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return proc.stdout.strip()
    return platform.processor() or platform.machine()


def physical_memory() -> float | None:
    """Bytes of RAM, or None when the OS does not say."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def _maxrss_bytes(who: int) -> float:
    peak = resource.getrusage(who).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def peak_rss() -> float:
    """This process's peak resident memory so far, in bytes."""
    return _maxrss_bytes(resource.RUSAGE_SELF)


def peak_rss_of_children() -> float:
    """The largest peak resident memory among this process's finished children, in bytes."""
    return _maxrss_bytes(resource.RUSAGE_CHILDREN)


def rss() -> float:
    """This process's resident memory now, in bytes (its peak where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return float(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return peak_rss()
