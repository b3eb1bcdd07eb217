"""A U-Net's full-resolution levels in slabs, so no high-resolution tensor of many channels is held whole.

At the ``fine`` top levels (full and half resolution) every convolution streams along X, one slab of ``slab``
rows at a time, each slab sent with the rows of context its kernel needs taken from its neighbours (zero rows
at the volume's ends, where the whole volume's zero padding applies): the values are those of the whole-volume
pass, no row is computed twice, and only the skip connection of each level and a few slabs are held. The
coarse middle runs whole. The last level's output leaves as a stream of slabs, which the predictor blurs and
averages as they come, so the flipped pass's posteriors are never held whole.

What a full 1 mm head then needs on a GPU is estimated in engine/memory.py (DEVICE_PER_VOXEL) and measured by
scripts/gpu_check.sh (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .network import Conv, UNet, upsample

Slab = tuple[int, int, torch.Tensor]  # rows [x0, x1) of a (1, C, X, Y, Z) tensor
Window = tuple[int, int, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def with_context(slabs: Iterator[Slab], rows: int = 1) -> Iterator[Window]:
    """Each slab with the last ``rows`` rows of the ones before and the first ``rows`` of the ones after (None
    at the volume's ends), one slab behind the input: what a filter of half-width ``rows`` needs to give the
    whole volume's values slab by slab. Slabs must have at least ``rows`` rows."""
    before = pending = None
    for x0, x1, part in slabs:
        if pending is not None:
            yield pending[0], pending[1], before, pending[2], part[:, :, :rows]
            before = pending[2][:, :, -rows:]
        pending = (x0, x1, part)
    if pending is not None:
        yield pending[0], pending[1], before, pending[2], None


def zero_rows(like: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` rows of zeros shaped, typed and laid out like ``like``'s: a real tensor, not a broadcast view.

    Why not ``F.pad``: Apple's MPS corrupts constant padding of 5-D tensors whose two innermost sizes multiply to
    65,536 or more (pytorch#194922, silently, fixed after the 2.14 branch cut), which every 256x256 plane of a
    decoder window hits; and MPS kernels have computed wrong values from strided and broadcast views
    (pytorch#169342, #180984). Zeros written into their own tensor and joined by ``cat`` are ops MPS gets right."""
    shape = (like.shape[0], like.shape[1], rows) + tuple(like.shape[3:])
    return torch.zeros(shape, dtype=like.dtype, device=like.device).contiguous(memory_format=_format(like))


def padded(before: torch.Tensor | None, part: torch.Tensor, after: torch.Tensor | None, rows: int) -> torch.Tensor:
    """``part`` joined with its context rows, zero rows standing in for those beyond the volume's ends."""
    ends = [zero_rows(part, rows) if t is None else t for t in (before, after)]
    return torch.cat([ends[0], part, ends[1]], dim=2)


def conv_stream(conv: Conv, slabs: Iterator[Slab]) -> Iterator[Slab]:
    """A "same" convolution (bias, activation) on a volume that arrives as slabs: its output slab by slab, with
    the whole volume's values; two slabs of the input are held at a time and no output row is computed twice."""
    rows = conv.kernel_size[0] // 2
    for x0, x1, before, part, after in with_context(slabs, rows):
        yield x0, x1, conv.rows(padded(before, part, after, rows))


def array_slabs(x: torch.Tensor, slab: int) -> Iterator[Slab]:
    for x0 in range(0, x.shape[2], slab):
        yield x0, min(x.shape[2], x0 + slab), x[:, :, x0:x0 + slab]


def encode(net: UNet, level: int, x: torch.Tensor, slab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder level ``level`` in slabs: its skip tensor (whole) and the BatchNorm'd, max-pooled output."""
    size = x.shape[2]
    conv0, conv1 = net.down[level]
    skip = pooled = None
    for x0, x1, part in conv_stream(conv1, conv_stream(conv0, array_slabs(x, slab))):
        down = F.max_pool3d(net.bn_down[level](part), 2)
        if skip is None:
            skip = _like(part, size)
            pooled = _like(down, size // 2)
        skip[:, :, x0:x1] = part
        pooled[:, :, x0 // 2:x1 // 2] = down
    assert skip is not None and pooled is not None
    return skip, pooled


def decode(net: UNet, res: int, skip: torch.Tensor, low: torch.Tensor, slab: int, last: bool) -> Iterator[Slab]:
    """Decoder level ``res`` as slabs: ``low`` (the coarser level's output) upsampled, merged with the skip,
    two convolutions, BatchNorm, and at full resolution (``last``) the likelihood and softmax."""
    size = skip.shape[2]
    conv0, conv1 = net.up[res]
    rows = conv0.kernel_size[0] // 2

    def first() -> Iterator[Slab]:
        for x0 in range(0, size, slab):
            x1 = min(size, x0 + slab)
            a, b = max(0, x0 - rows), min(size, x1 + rows)
            up = upsample(low[:, :, a // 2:(b + 1) // 2])[:, :, a % 2:a % 2 + (b - a)]
            window = torch.cat([skip[:, :, a:b], up], dim=1) if net.merges[res] else up
            parts = ([zero_rows(window, a - (x0 - rows))] if a > x0 - rows else []) + [window] + (
                [zero_rows(window, (x1 + rows) - b)] if b < x1 + rows else [])
            if len(parts) > 1 or not window.is_contiguous(memory_format=_format(window)):
                window = torch.cat(parts, dim=2)  # zero rows beyond the volume's ends; never a strided view
            yield x0, x1, conv0.rows(window)

    for x0, x1, part in conv_stream(conv1, first()):
        out = net.bn_up[res](part)
        yield x0, x1, net.head(out) if last else out


def _like(part: torch.Tensor, size: int) -> torch.Tensor:
    """An empty volume of ``size`` rows for slabs like ``part`` (same channels, dtype, device, memory format)."""
    shape = (1, part.shape[1], size) + tuple(part.shape[3:])
    return torch.empty(shape, dtype=part.dtype, device=part.device).contiguous(memory_format=_format(part))


def _format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if t.is_contiguous(memory_format=torch.channels_last_3d) and t.shape[1] > 1 \
        else torch.contiguous_format


def assemble(slabs: Iterator[Slab], size: int) -> torch.Tensor:
    out = None
    for x0, x1, part in slabs:
        if out is None:
            out = _like(part, size)
        out[:, :, x0:x1] = part
    assert out is not None
    return out


def stream(net: UNet, x: torch.Tensor, slab: int = 32, fine: int = 2) -> Iterator[Slab]:
    """The network's softmax output on ``x`` (1, C, X, Y, Z), as consecutive slabs along X."""
    skips = []
    for level in range(fine):
        skip, x = encode(net, level, x, slab)
        skips.append(skip)
    inner = {}
    for level in range(fine, net.n_levels):
        inner[level] = net.encode(level, x)
        x = net.bn_down[level](inner[level])
        if level < net.n_levels - 1:
            x = F.max_pool3d(x, 2)
    for res in range(net.n_levels - 2, fine - 1, -1):
        x = net.decode(res, inner.pop(res) if net.merges[res] else None, upsample(x))
    for res in range(fine - 1, 0, -1):
        x = assemble(decode(net, res, skips.pop(), x, slab, last=False), x.shape[2] * 2)
    yield from decode(net, 0, skips.pop(), x, slab, last=True)


def whole(net: UNet, x: torch.Tensor, slab: int = 32) -> torch.Tensor:
    """:func:`stream` assembled into one tensor (1, labels, X, Y, Z)."""
    return assemble(stream(net, x, slab), x.shape[2])
