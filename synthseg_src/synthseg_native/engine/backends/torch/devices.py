"""Which device the PyTorch backend runs on, with how many threads and in which precision.

``--device auto`` picks CUDA, then Apple's MPS, then the CPU. fp32 on CUDA means real fp32: TensorFloat-32
(10-bit mantissa products, PyTorch's default for cuDNN convolutions) is switched off unless ``--precision tf32``
asks for it, because the TF engine and upstream compute in full fp32 and agreement is measured against them.
"""

from __future__ import annotations

import os
import platform

import torch

from ...machine import cpu_has_bf16, cpu_model

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def memory_format(device: str) -> torch.memory_format:
    """How the networks' 5-D tensors are laid out: channels last (NDHWC) on CPU and CUDA, where oneDNN's and
    cuDNN's 3-D convolutions run 1.3-1.8x faster that way than channels first (measured here on the U-Net's
    full-resolution shapes, docs/performance.md); channels first on MPS, whose NDHWC Conv3D support is not one
    this project could check on a Mac."""
    return torch.contiguous_format if device == "mps" else torch.channels_last_3d


def available() -> list[str]:
    """Devices this PyTorch build can use here, best first ("cuda", "mps", "cpu")."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def pick(requested: str) -> str:
    """The device for ``--device`` (auto: the best available); ValueError naming what is missing."""
    found = available()
    if requested == "auto":
        return found[0]
    if requested not in found:
        why = {"cuda": "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False; a CPU-only wheel, "
                       "no driver, or CUDA_VISIBLE_DEVICES hides it)",
               "mps": "Apple's MPS backend is not available (needs macOS 12.3+ on Apple Silicon and a torch "
                      "build with MPS)"}.get(requested, f"unknown device {requested!r}")
        raise ValueError(f"--device {requested}: {why}; available: {', '.join(found)}")
    return requested


def describe(device: str) -> str:
    """The device as the run's [INFO] line names it."""
    if device == "cuda":
        index = torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}, PyTorch {torch.__version__})"
    if device == "mps":
        return f"mps (Apple GPU, PyTorch {torch.__version__})"
    return f"CPU ({cpu_model() or platform.processor() or platform.machine()}, PyTorch {torch.__version__})"


def configure_threads(n: int | None) -> int:
    """Intra-op threads for CPU work (default: all cores); inter-op parallelism stays at PyTorch's default."""
    threads = n or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def set_tf32(enabled: bool) -> None:
    """TensorFloat-32 for CUDA convolutions and matrix products, on or off."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def precision_unsupported(precision: str, device: str) -> str | None:
    """Why ``precision`` cannot run (fast) on ``device`` (None: it can)."""
    if precision == "fp32":
        return None
    if device == "cuda":
        major = torch.cuda.get_device_capability()[0]
        if precision in ("bf16", "tf32") and major < 8:
            return f"{precision} needs a CUDA GPU of compute capability 8.0 or newer (this one: {major}.x)"
        return None
    if precision == "tf32":
        return "TensorFloat-32 exists on CUDA GPUs only"
    if device == "mps":
        return None if precision == "fp16" else "bf16 autocast is not validated on MPS; use fp16 there"
    if precision == "fp16":
        return "PyTorch has no fast float16 Conv3D on CPUs"
    if not cpu_has_bf16():
        return "this CPU has neither AVX512-BF16 nor AMX-BF16"
    return None


def free_memory(device: str) -> tuple[float | None, str]:
    """Bytes free on a GPU for the networks (None: the host's memory is the budget, as on the CPU)."""
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return float(free), f"free memory of {describe(device)}"
    if device == "mps":
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        if recommended is not None:
            return float(recommended() - torch.mps.current_allocated_memory()), "Metal's recommended working set"
    return None, "host memory"


def reset_peak_memory(device: str) -> None:
    """Start a new peak for :func:`peak_memory` (CUDA: cached blocks released first, so the peak is this run's)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def version() -> str:
    return str(torch.__version__)


def peak_memory(device: str) -> int | None:
    """Peak bytes the caching allocator handed out on a GPU since the last reset (None on the CPU)."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if device == "mps":
        return int(torch.mps.driver_allocated_memory())
    return None


def report() -> str:
    """``make doctor``'s lines about PyTorch: version, devices and what each supports."""
    lines = [f"PyTorch {torch.__version__} (MKLDNN/oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'})"]
    for dev in available():
        try:
            x = torch.ones((1, 1, 8, 8, 8), device=dev)
            ok = float(torch.nn.functional.conv3d(x, torch.ones((1, 1, 3, 3, 3), device=dev), padding=1).sum()) > 0
            state = "Conv3D ok" if ok else "Conv3D gave zeros"
        except Exception as exc:  # a broken driver or backend: report it, do not crash the doctor
            state = f"Conv3D failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        fast = [p for p in ("bf16", "fp16", "tf32") if precision_unsupported(p, dev) is None]
        lines.append(f"  {describe(dev)}: {state}; reduced precision: {', '.join(fast) or 'none'}")
    return "\n".join(lines)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory: CUDA's ``OutOfMemoryError``, MPS's "MPS backend out of
    memory", the CPU allocator's "can't allocate memory"."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return "out of memory" in text or "can't allocate memory" in text
