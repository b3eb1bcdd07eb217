"""The PyTorch backend's predictor: SynthSeg's networks in ``torch.nn`` on CUDA, Apple's MPS or the CPU.

It reproduces the TF backend's inference graph step for step (backends/tf/predictor.py, which documents why
each head sees which posteriors): the U-Net (both passes without --fast), the sigma=0.5 Gaussian blur of the
posteriors, the flipped pass with the left/right channel swap and the average, the robust model's argmax/one-hot
cascade, the parcellation and QC heads. Its results agree with the TF engine's to float32 rounding, not to the
bit (docs/equivalence.md). Nothing on this path imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ....config import Options
from ....errors import UsageError
from ... import heads, tiling
from ... import labels as L
from ...runtime import Runtime, Timings
from ...weights import MODEL_FILES, file_sha256, find_weights, is_test_weights, read_weights
from . import devices, network, stream
from .stream import Slab

logger = logging.getLogger(__name__)
SIGMA_POSTERIORS = 0.5  # upstream smooths the segmentation posteriors with this Gaussian


def start(opts: Options) -> Runtime:
    """Device, threads and precision for this process; ``--precision`` falls back to fp32 (with a warning)
    where the device lacks fast support for it."""
    try:
        device = devices.pick("cpu" if opts.cpu else opts.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    threads = devices.configure_threads(opts.threads)
    precision = opts.precision
    why = devices.precision_unsupported(precision, device)
    if why:
        logger.warning(f"--precision {precision}: {why}; running in fp32")
        precision = "fp32"
    if device == "cuda":
        devices.set_tf32(precision == "tf32")
    free, where = devices.free_memory(device)
    return Runtime(threads=threads, device=devices.describe(device), precision=precision, backend="torch",
                   device_kind=device, device_memory=free, device_memory_source=where)


class TorchPredictor:
    """Holds the built and loaded networks on their device so a batch pays for model construction once."""

    def __init__(self, opts: Options, timings: Timings, runtime: Runtime):
        t0 = time.perf_counter()
        self.opts, self.runtime = opts, runtime
        self.device = torch.device(runtime.device_kind)
        self.layout = devices.memory_format(self.device.type)
        self.slab = 32
        self.labels = L.LabelSet.build(opts.v1)
        key = opts.segmentation_model
        self.weight_paths: dict[str, object] = {}
        self.flip = None if (opts.fast or opts.robust) else torch.as_tensor(
            np.asarray(self.labels.flip, dtype=np.int64), device=self.device)
        n_labels = len(self.labels.labels)
        self.model: network.UNet | network.Robust
        if opts.robust:
            self.model = self._load(key, network.Robust(n_labels, len(L.denoiser_groups())))
        else:
            self.model = self._load(key, network.UNet("unet", 1, n_labels))
        self.taps = network.blur_taps(SIGMA_POSTERIORS)
        self.parc_model = self.qc_model = None
        if opts.parc:
            self.parc_model = self._load("parc", network.UNet("unet_parc", 3, len(L.parcellation_labels())))
        if opts.qc:
            self.qc_model = self._load("qc", network.QC(len(np.unique(self.labels.qc_groups))))
        self.cortex = torch.as_tensor(heads.cortex_lut(self.labels), device=self.device)
        for weights in self.weight_paths.values():
            if is_test_weights(weights):
                logger.warning(f"{weights}: seeded random test weights (synthseg_native.tools.testweights), not "
                               "the official ones: outputs are anatomically meaningless")
        timings.add("load_weights", time.perf_counter() - t0)

    def _load(self, key: str, model: torch.nn.Module):
        path = find_weights(MODEL_FILES[key], self.opts.models)
        self.weight_paths[key] = path
        network.load_arrays(model, read_weights(path), path)
        return model.to(self.device, memory_format=self.layout).eval()

    # -- the protocol ------------------------------------------------------------------------------
    def network_flop(self, shape: tuple[int, ...]) -> int:
        """Convolution FLOPs of the segmentation (both passes) and parcellation networks on one padded input."""
        grid = tuple(shape[:3])
        total = network.conv_flops(self.model, grid) * (1 if self.flip is None else 2)
        if self.parc_model is not None:
            total += network.conv_flops(self.parc_model, grid)
        return total

    def device_memory(self) -> tuple[float | None, str] | None:
        """On CUDA/MPS the device's free memory now (the budget of the next image); None on the CPU."""
        if self.device.type == "cpu":
            return None
        return devices.free_memory(self.device.type)

    def weights_digest(self) -> dict[str, str]:
        return {os.path.basename(str(p)): file_sha256(str(p)) for p in self.weight_paths.values()}

    def predict(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Segmentation posteriors (1, X, Y, Z, labels) float32 on the padded grid, then the parcellation
        posteriors and QC scores when requested (the same tensors the TF backend returns)."""
        with self._context():
            x = self._upload(image)
            returned, blurred = self._segment(x)
            post_parc = self._parcellate(x, blurred)
            del x
            qc = None if self.qc_model is None else self._qc(self._qc_channels(returned, blurred))
            return self._download(returned), None if post_parc is None else self._download(post_parc), qc

    def predict_tiled(self, image: np.ndarray, tiles: tiling.Tiling
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """:meth:`predict` tile by tile, stitched by the shared tiling code; QC once on the stitched decision."""

        def one(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
            x = self._upload(tile)
            returned, blurred = self._segment(x)
            post_parc = self._parcellate(x, blurred)
            channels = None
            if self.qc_model is not None:
                channels = self._qc_channels(returned, blurred).cpu().numpy().astype(np.int32)
            return (self._download(returned), None if post_parc is None else self._download(post_parc),
                    channels)

        with self._context():
            returned, post_parc, channels = tiling.stitch(image, tiles, one)
            assert returned is not None
            qc = None if channels is None else self._qc(torch.as_tensor(channels, device=self.device))
        return returned, post_parc, qc

    # -- steps -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        """Inference mode, and autocast for --precision bf16/fp16 (weights stay float32)."""
        dtype = devices.AUTOCAST.get(self.runtime.precision)
        with torch.inference_mode():
            if dtype is None:
                yield
            else:
                with torch.autocast(self.device.type, dtype=dtype):
                    yield

    def _upload(self, image: np.ndarray) -> torch.Tensor:
        """(1, X, Y, Z, C) numpy -> (1, C, X, Y, Z) on the device, in the networks' memory layout."""
        x = torch.as_tensor(np.ascontiguousarray(image), device=self.device).permute(0, 4, 1, 2, 3)
        return x.contiguous(memory_format=self.layout)

    def _download(self, post: torch.Tensor) -> np.ndarray:
        """Posteriors held channels last on the device (1, X, Y, Z, C) -> a float32 numpy array."""
        return post.float().cpu().numpy() if post.device.type != "cpu" else post.float().numpy()

    def _segment(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posteriors returned as the segmentation's, and the blurred ones the heads decide on, both
        channels last (1, X, Y, Z, labels); the same tensor except with --fast and a head."""
        heads_on = self.parc_model is not None or self.qc_model is not None
        if isinstance(self.model, network.Robust):  # robust: no smoothing anywhere
            post = self._robust(x)
            return post, post
        if self.flip is None:
            post = _channels_last(stream.stream(self.model, x, self.slab), x.shape[2])
            returned = post.clone() if heads_on else None
            self._blur_in_place(post)
            return (post if returned is None else returned), post
        post = _channels_last(self._blurred(stream.stream(self.model, x, self.slab)), x.shape[2])
        size = x.shape[2]
        flipped = stream.stream(self.model, torch.flip(x, dims=[2]), self.slab)
        for x0, x1, part in self._blurred(flipped):  # lands on [X - x1, X - x0), mirrored, channels swapped
            target = post[:, size - x1:size - x0]
            mirrored = torch.flip(part, dims=[2]).index_select(1, self.flip)
            target.copy_((target + mirrored.permute(0, 2, 3, 4, 1)) * 0.5)
        return post, post

    def _robust(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        assert isinstance(model, network.Robust)
        groups = model.n_groups
        y = network.one_hot_argmax(stream.whole(model.unet, x, self.slab), groups)
        y = network.one_hot_argmax(stream.whole(model.l2l, y, self.slab), groups)
        if groups <= 2:
            y = y[:, 1:]
        y = torch.cat([x.float(), y], dim=1).contiguous(memory_format=self.layout)
        return _channels_last(stream.stream(model.unet2, y, self.slab), x.shape[2])

    def _blurred(self, slabs: Iterator[Slab]) -> Iterator[Slab]:
        """Each slab blurred (sigma 0.5, every channel separately) with its neighbours' rows as context."""
        for x0, x1, before, part, after in stream.with_context(slabs):
            yield x0, x1, self._blur_window(before, part, after)

    def _blur_window(self, before: torch.Tensor | None, part: torch.Tensor, after: torch.Tensor | None
                     ) -> torch.Tensor:
        rows = [t.float() for t in (before, part, after) if t is not None]  # float32, as in the TF backend
        window = torch.cat(rows, dim=2) if len(rows) > 1 else rows[0]
        y = network.blur(window, self.taps)
        start = 0 if before is None else before.shape[2]
        return y[:, :, start:start + part.shape[2]]

    def _blur_in_place(self, post: torch.Tensor) -> None:
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

    def _parcellate(self, x: torch.Tensor, blurred: torch.Tensor) -> torch.Tensor | None:
        if self.parc_model is None:
            return None
        cortex = self.cortex[torch.argmax(blurred, dim=-1)]  # (1, X, Y, Z)
        one_hot = F.one_hot(cortex.long(), 2).permute(0, 4, 1, 2, 3).to(torch.float32)
        parc_in = torch.cat([x.float(), one_hot], dim=1).contiguous(memory_format=self.layout)
        del one_hot, cortex
        post = _channels_last(stream.stream(self.parc_model, parc_in, self.slab), x.shape[2])
        if self.qc_model is None:
            self._blur_in_place(post)
        return post

    def _qc_channels(self, returned: torch.Tensor, blurred: torch.Tensor) -> torch.Tensor:
        """The hard decision (1, X, Y, Z) the QC network scores."""
        return torch.argmax(returned if self.parc_model is not None else blurred, dim=-1)

    def _qc(self, channels: torch.Tensor) -> np.ndarray:
        assert self.qc_model is not None
        groups = heads.qc_input(channels[0].cpu().numpy().astype(np.int32), self.labels)  # (1, 224^3, groups)
        x = torch.as_tensor(np.ascontiguousarray(np.moveaxis(groups, -1, 1)), device=self.device)
        del groups
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):  # QC stays float32
            return self.qc_model(x).float().cpu().numpy()


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
