"""Which device the PyTorch backend runs on, with how many threads and in which precision.

``--device auto`` picks CUDA, then Apple's MPS, then the CPU. fp32 on CUDA means real fp32: TensorFloat-32
(10-bit mantissa products, PyTorch's default for cuDNN convolutions) is switched off unless ``--precision tf32``
asks for it, because the TF engine and upstream compute in full fp32 and agreement is measured against them.

Apple's MPS is used only with a PyTorch that runs every op of the networks natively there (:data:`MPS_MIN_TORCH`:
3-D max-pooling reached MPS in 2.8, pytorch#156467, nearest 3-D upsampling natively in 2.8, #156090; 2.9 is the
first release with both for certain), on macOS 13.2 or newer (3-D convolutions on MPS, PyTorch 2.2+). With
``PYTORCH_ENABLE_MPS_FALLBACK`` set, PyTorch would quietly run missing ops on the CPU: the run says so.
"""

from __future__ import annotations

import logging
import os
import platform
import threading

import numpy as np
import torch
import torch.nn.functional as F

from ...machine import cpu_has_bf16, cpu_model
from ...runtime import DeviceMemory

logger = logging.getLogger(__name__)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
MPS_MIN_TORCH = (2, 9)
MPS_MIN_MACOS = "13.2"
MPS_TENSOR_CAP = float(2 ** 31)  # bytes: MPS arrays fail over 2^32 bytes or 2^31 elements (pytorch#149325, #143859)


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


def torch_version() -> tuple[int, int]:
    """PyTorch's (major, minor)."""
    parts = str(torch.__version__).split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def mps_refused() -> str | None:
    """Why this PyTorch must not run SynthSeg on MPS (None: it may)."""
    if torch_version() < MPS_MIN_TORCH:
        need = ".".join(map(str, MPS_MIN_TORCH))
        return (f"PyTorch {torch.__version__} lacks native MPS kernels for SynthSeg's 3-D max-pooling and upsampling "
                f"(added in 2.8): pip install 'torch>={need}'")
    return None


def pick(requested: str) -> str:
    """The device for ``--device`` (auto: the best available); ValueError naming what is missing. A PyTorch too old
    for MPS is refused for ``--device mps`` and passed over by ``auto`` (with a warning)."""
    found = available()
    if requested == "auto":
        if found[0] == "mps" and mps_refused():
            logger.warning(f"the Apple GPU is not used: {mps_refused()}; running on the CPU")
            return "cpu"
        return found[0]
    if requested not in found:
        why = {"cuda": "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False; a CPU-only wheel, "
                       "no driver, or CUDA_VISIBLE_DEVICES hides it)",
               "mps": f"Apple's MPS backend is not available (needs Apple silicon, macOS {MPS_MIN_MACOS} or newer "
                      "for 3-D convolutions, and a torch build with MPS)"}.get(requested,
                                                                               f"unknown device {requested!r}")
        raise ValueError(f"--device {requested}: {why}; available: {', '.join(found)}")
    if requested == "mps" and mps_refused():
        raise ValueError(f"--device mps: {mps_refused()}")
    return requested


def warn_about_fallback(device: str) -> None:
    """PyTorch's CPU fallback for ops MPS lacks hides slow and untested paths: say so when it is on."""
    if device == "mps" and os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK", "0") not in ("", "0"):
        logger.warning("PYTORCH_ENABLE_MPS_FALLBACK is set: any op MPS lacks would run on the CPU without a word "
                       "(slow, and not the path that was checked); unset it to see such an op fail instead")


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


def free_memory(device: str) -> DeviceMemory | None:
    """What bounds an image on a GPU; None on the CPU (the host's memory is the budget there).

    On MPS the GPU shares the host's memory: the budget is Metal's recommended working set minus what its driver
    has already allocated, and the host's part of the run is checked against the host's memory as well
    (``unified``); no tensor may exceed :data:`MPS_TENSOR_CAP`."""
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return DeviceMemory(float(free), f"free memory of {describe(device)}")
    if device == "mps":
        recommended = float(torch.mps.recommended_max_memory())
        return DeviceMemory(recommended - float(torch.mps.driver_allocated_memory()),
                            "Metal's recommended working set less what its driver holds", unified=True,
                            tensor_cap=MPS_TENSOR_CAP)
    return None


def reset_peak_memory(device: str) -> None:
    """Start a new peak for :func:`peak_memory` (CUDA: cached blocks released first, so the peak is this run's;
    MPS: a sampler, since Metal keeps no peak of its own)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if device == "mps":
        MPS_PEAK.start()


class PeakSampler:
    """The driver's allocation on MPS read every ``interval`` seconds in a thread, keeping the largest: Metal reports
    only the current figure, and reading it once at the end of a run missed the peak in the middle."""

    def __init__(self, read=lambda: float(torch.mps.driver_allocated_memory()), interval: float = 0.02):
        self.read, self.interval = read, interval
        self.peak = 0.0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.stop()
        self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(self._stop,), name="mps-peak", daemon=True)
        self._thread.start()

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.peak = max(self.peak, self.read())

    def stop(self) -> float:
        """Stop sampling (one last reading included); the peak."""
        if self._stop is not None and self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.read())
            self._stop = self._thread = None
        return self.peak


MPS_PEAK = PeakSampler()


def version() -> str:
    return str(torch.__version__)


def peak_memory(device: str) -> int | None:
    """Peak bytes on a GPU since :func:`reset_peak_memory` (None on the CPU): CUDA's caching allocator's own peak;
    on MPS the sampler's."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if device == "mps":
        return int(MPS_PEAK.stop())
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


def run_ops(device: str, inputs: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray | None, str]]:
    """Every op type of SynthSeg's networks on ``device`` (``make doctor``'s probe): the result, channels last, as
    numpy, and where it ran (or why it failed). ``inputs``: channels-last float32 arrays (x, kernel, bias, gamma,
    beta, mean, var)."""
    def first(t: np.ndarray) -> torch.Tensor:  # (1, X, Y, Z, C) -> (1, C, X, Y, Z) on the device
        return torch.as_tensor(np.ascontiguousarray(np.moveaxis(t, -1, 1)), device=device)

    def last(t: torch.Tensor) -> np.ndarray:
        return np.moveaxis(t.float().cpu().numpy(), 1, -1)

    x = first(inputs["x"])
    kernel = torch.as_tensor(np.ascontiguousarray(inputs["kernel"].transpose(4, 3, 0, 1, 2)), device=device)
    vec = {k: torch.as_tensor(inputs[k], device=device) for k in ("bias", "gamma", "beta", "mean", "var")}
    ops = {
        "Conv3D": lambda: F.conv3d(x, kernel, vec["bias"], padding=1),
        "MaxPool3D": lambda: F.max_pool3d(x, 2),
        "UpSampling3D (nearest)": lambda: F.interpolate(x, scale_factor=2, mode="nearest"),
        "Concatenate": lambda: torch.cat([x, 2 * x], dim=1),
        "ELU": lambda: F.elu(x - 0.5),
        "Softmax": lambda: torch.softmax(x, dim=1),
        "Argmax/one-hot": lambda: F.one_hot(torch.argmax(x, dim=1), x.shape[1]).permute(0, 4, 1, 2, 3),
        "BatchNorm (inference)": lambda: F.batch_norm(x, vec["mean"], vec["var"], vec["gamma"], vec["beta"], False,
                                                      0.0, 1e-3),
    }
    found: dict[str, tuple[np.ndarray | None, str]] = {}
    for name, op in ops.items():
        try:
            with torch.inference_mode():
                out = op()
            found[name] = (last(out), str(out.device))
        except Exception as exc:  # an op the device lacks: report it, do not crash the doctor
            found[name] = (None, f"FAILED ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    return found


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory: CUDA's ``OutOfMemoryError``, MPS's "MPS backend out of
    memory", the CPU allocator's "can't allocate memory"."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return "out of memory" in text or "can't allocate memory" in text
