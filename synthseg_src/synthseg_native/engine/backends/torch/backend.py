"""The PyTorch backend: SynthSeg's networks in ``torch.nn`` on CUDA, Apple's MPS or the CPU, and the primitives the
engine's predictor runs on them.

Its operations mirror the TF backend's step for step (the U-Net streamed in slabs, the sigma-0.5 Gaussian blur of
the posteriors as three separable passes, the flipped pass blurred, mirrored, channel-swapped and averaged slab by
slab, the robust model's argmax/one-hot cascade, the parcellation and QC heads), on device tensors. Its results
agree with the TF engine's to float32 rounding, not to the bit (docs/equivalence.md). Nothing on this path imports
TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ....errors import UsageError
from ... import architecture as arch
from ...backend import SIGMA_POSTERIORS, out_of_memory
from ...runtime import DeviceMemory, Runtime
from ...spec import ModelSpec
from . import devices, network, stream
from .stream import Slab

logger = logging.getLogger(__name__)


def start(spec: ModelSpec) -> TorchBackend:
    """Device, threads and precision for this process; ``--precision`` falls back to fp32 (with a warning)
    where the device lacks fast support for it."""
    try:
        device = devices.pick(spec.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    threads = devices.configure_threads(spec.threads)
    precision = spec.precision
    why = devices.precision_unsupported(precision, device)
    if why:
        logger.warning(f"--precision {precision}: {why}; running in fp32")
        precision = "fp32"
    if device == "cuda":
        devices.set_tf32(precision == "tf32")
    devices.warn_about_fallback(device)
    return TorchBackend(Runtime(threads=threads, device=devices.describe(device), precision=precision,
                                backend="torch", device_kind=device, framework=f"PyTorch {devices.version()}"))


class TorchBackend:
    """The primitives of :class:`~synthseg_native.engine.backend.Backend` in PyTorch. Posteriors are float32
    channels-last tensors (1, X, Y, Z, C) on the device; the networks' inputs channels first (1, C, X, Y, Z) in
    their memory layout; slabs channels first."""

    name = "torch"

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.device = torch.device(runtime.device_kind)
        self.layout = devices.memory_format(self.device.type)
        self.slab = 32
        self.taps = network.blur_taps(SIGMA_POSTERIORS)
        self._cortex: dict[bytes, torch.Tensor] = {}

    def build(self, net: arch.Network, arrays: dict[str, dict[str, np.ndarray]]) -> torch.nn.Module:
        model = network.module(net)
        network.load_arrays(model, arrays)
        return model.to(self.device, memory_format=self.layout).eval()

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Inference mode, autocast for --precision bf16/fp16 (weights stay float32), and the device's
        out-of-memory (CUDA's, MPS's, the CPU allocator's) as a :class:`MemoryShortage`."""
        dtype = devices.AUTOCAST.get(self.runtime.precision)
        try:
            with torch.inference_mode():
                if dtype is None:
                    yield
                else:
                    with torch.autocast(self.device.type, dtype=dtype):
                        yield
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError; MPS and the CPU raise plain ones
            if not devices.is_out_of_memory(exc):
                raise
            raise out_of_memory(str(exc)) from exc

    def upload(self, image: np.ndarray) -> torch.Tensor:
        """(1, X, Y, Z, C) numpy -> (1, C, X, Y, Z) on the device, in the networks' memory layout."""
        x = torch.as_tensor(np.ascontiguousarray(image), device=self.device).permute(0, 4, 1, 2, 3)
        return x.contiguous(memory_format=self.layout)

    def download(self, post: torch.Tensor) -> np.ndarray:
        """Posteriors held channels last on the device (1, X, Y, Z, C) -> a float32 numpy array."""
        return post.float().cpu().numpy() if post.device.type != "cpu" else post.float().numpy()

    def copy(self, post: torch.Tensor) -> torch.Tensor:
        return post.clone()

    def flipped(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims=[2])

    def run(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(net, network.Robust):
            return self._robust(net, x)
        return _channels_last(stream.stream(net, x, self.slab), x.shape[2])

    def run_slabs(self, net: network.UNet, x: torch.Tensor) -> Iterator[Slab]:
        return stream.stream(net, x, self.slab)

    def assemble(self, slabs: Iterator[Slab], like: torch.Tensor) -> torch.Tensor:
        return _channels_last(slabs, like.shape[2])

    def blur(self, post: torch.Tensor) -> torch.Tensor:
        """Blur channels-last posteriors (1, X, Y, Z, C) slab by slab, in place."""
        size = post.shape[1]
        before = None
        for x0 in range(0, size, self.slab):
            x1 = min(size, x0 + self.slab)
            part = post[:, x0:x1].permute(0, 4, 1, 2, 3)
            after = post[:, x1:x1 + 1].permute(0, 4, 1, 2, 3) if x1 < size else None
            out = self._blur_window(before, part, after)
            before = part[:, :, -1:].clone()  # its unblurred last row is the next slab's context
            post[:, x0:x1] = out.permute(0, 2, 3, 4, 1)
        return post

    def blur_slabs(self, slabs: Iterator[Slab]) -> Iterator[Slab]:
        """Each slab blurred (sigma 0.5, every channel separately) with its neighbours' rows as context."""
        for x0, x1, before, part, after in stream.with_context(slabs):
            yield x0, x1, self._blur_window(before, part, after)

    def blur_flip_average(self, post: torch.Tensor, flipped: Iterator[Slab], order: np.ndarray) -> torch.Tensor:
        size = post.shape[1]
        index = torch.as_tensor(order, device=self.device)
        for x0, x1, part in self.blur_slabs(flipped):  # lands on [X - x1, X - x0), mirrored, channels swapped
            target = post[:, size - x1:size - x0]
            mirrored = torch.flip(part, dims=[2]).index_select(1, index)
            target.copy_((target + mirrored.permute(0, 2, 3, 4, 1)) * 0.5)
        return post

    def decisions(self, post: torch.Tensor) -> np.ndarray:
        return torch.argmax(post, dim=-1).cpu().numpy().astype(np.int32)

    def parc_input(self, x: torch.Tensor, post: torch.Tensor, cortex: np.ndarray) -> torch.Tensor:
        key = cortex.tobytes()
        if key not in self._cortex:
            self._cortex[key] = torch.as_tensor(cortex, device=self.device)
        mask = self._cortex[key][torch.argmax(post, dim=-1)]  # (1, X, Y, Z)
        one_hot = F.one_hot(mask.long(), 2).permute(0, 4, 1, 2, 3).to(torch.float32)
        return torch.cat([x.float(), one_hot], dim=1).contiguous(memory_format=self.layout)

    def score(self, net: torch.nn.Module, groups: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.ascontiguousarray(np.moveaxis(groups, -1, 1)), device=self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):  # QC stays float32
            return net(x).float().cpu().numpy()

    def device_memory(self) -> DeviceMemory | None:
        """On CUDA/MPS the device's free memory now (the budget of the next image); None on the CPU."""
        return devices.free_memory(self.device.type)

    def cpu_twin(self) -> TorchBackend:
        if self.device.type == "cpu":
            return self
        return TorchBackend(Runtime(threads=self.runtime.threads, device=devices.describe("cpu"), precision="fp32",
                                    backend="torch", device_kind="cpu", framework=self.runtime.framework))

    # -- steps of the primitives ------------------------------------------------------------------
    def _robust(self, model: network.Robust, x: torch.Tensor) -> torch.Tensor:
        groups = model.n_groups
        y = network.one_hot_argmax(stream.whole(model.unet, x, self.slab), groups)
        y = network.one_hot_argmax(stream.whole(model.l2l, y, self.slab), groups)
        if groups <= 2:
            y = y[:, 1:]
        y = torch.cat([x.float(), y], dim=1).contiguous(memory_format=self.layout)
        return _channels_last(stream.stream(model.unet2, y, self.slab), x.shape[2])

    def _blur_window(self, before: torch.Tensor | None, part: torch.Tensor, after: torch.Tensor | None
                     ) -> torch.Tensor:
        rows = [t.float() for t in (before, part, after) if t is not None]  # float32, as in the TF backend
        window = torch.cat(rows, dim=2) if len(rows) > 1 else rows[0]
        y = network.blur(window, self.taps)
        start = 0 if before is None else before.shape[2]
        return y[:, :, start:start + part.shape[2]]


def _channels_last(slabs: Iterator[Slab], size: int) -> torch.Tensor:
    """Slabs (1, C, rows, Y, Z) written into one float32 tensor (1, X, Y, Z, C) on their device."""
    out = None
    for x0, x1, part in slabs:
        if out is None:
            out = torch.empty((1, size) + tuple(part.shape[3:]) + (part.shape[1],), dtype=torch.float32,
                              device=part.device)
        out[:, x0:x1] = part.permute(0, 2, 3, 4, 1)
    assert out is not None
    return out
