"""SynthSeg's networks in ``torch.nn``, loaded from the official Keras ``.h5`` files (read with h5py).

The modules mirror the TensorFlow backend's graph layer for layer (backends/tf/network.py, after upstream's
``ext/neuron/models.py``): 3x3x3 "same" convolutions with ELU, BatchNorm (inference, Keras' epsilon 1e-3) at the
end of each level, 2x2x2 max-pooling, nearest upsampling, skip connections taken *before* the BatchNorm, a 1x1x1
likelihood and a softmax. Tensors are channels first (N, C, X, Y, Z), PyTorch's native layout; the axes X, Y, Z
are the Keras model's, so a Keras kernel (kx, ky, kz, in, out) becomes (out, in, kx, ky, kz) unchanged otherwise.

The layers are built from the framework-free description in ``engine/architecture.py`` (names, channels, kernels,
levels), the same one the TF backend builds from; their arrays arrive checked (``engine.weights.checked``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import architecture as arch

BN_EPSILON = 1e-3  # Keras' BatchNormalization default, which SynthSeg's models keep


class Conv(nn.Conv3d):
    """A Keras ``Conv3D(padding="same")``: odd kernel, zero padding of half its size, optional activation."""

    def __init__(self, spec: arch.Conv):
        super().__init__(spec.c_in, spec.c_out, spec.kernel, padding=spec.kernel // 2)
        self.keras_name, self.activation = spec.name, spec.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._activate(super().forward(x))

    def rows(self, window: torch.Tensor) -> torch.Tensor:
        """The convolution on a window that carries its context rows along X (``padding`` of them on each side,
        zeros at the volume's ends): only the rows between the context come out, none computed in vain."""
        y = F.conv3d(window, self.weight, self.bias, padding=(0,) + tuple(self.padding[1:]))  # type: ignore[arg-type]
        return self._activate(y)

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation == "elu":
            return F.elu(y, inplace=True)
        if self.activation == "relu":
            return F.relu(y, inplace=True)
        return y

    def set_keras(self, stored: dict[str, np.ndarray]) -> None:
        """Keras' kernel (kx, ky, kz, in, out) as PyTorch's (out, in, kx, ky, kz), and the bias."""
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(np.ascontiguousarray(stored["kernel"].transpose(4, 3, 0, 1, 2))))
            self.bias.copy_(torch.from_numpy(stored["bias"]))


class BatchNorm(nn.Module):
    """Keras' BatchNormalization at inference: ``(x - mean) / sqrt(var + eps) * gamma + beta`` per channel."""

    def __init__(self, spec: arch.BatchNorm):
        super().__init__()
        self.keras_name = spec.name
        for kind in arch.BN_KINDS:
            self.register_buffer(kind, torch.zeros(spec.channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.batch_norm(x, self.moving_mean, self.moving_variance, self.gamma, self.beta, False, 0.0,
                            BN_EPSILON)

    def set_keras(self, stored: dict[str, np.ndarray]) -> None:
        for kind in arch.BN_KINDS:
            getattr(self, kind).copy_(torch.from_numpy(stored[kind]))


class UNet(nn.Module):
    """Upstream's U-Net (``architecture.UNet``): per level two convolutions then BatchNorm (then max-pooling going
    down); going up, nearest upsampling, concatenation ``[skip, upsampled]``, two convolutions, BatchNorm; likelihood,
    softmax. The attributes are lists indexed by level (``up[res]``: the decoder level at resolution ``res``, 0 = full)
    so the slab-streaming runner (stream.py) can run pieces of it."""

    def __init__(self, spec: arch.UNet):
        super().__init__()
        self.prefix, self.n_levels, self.n_labels = spec.prefix, spec.n_levels, spec.n_labels
        self.down = nn.ModuleList([nn.ModuleList([Conv(c) for c in spec.down(level)])
                                   for level in range(spec.n_levels)])
        self.bn_down = nn.ModuleList([BatchNorm(spec.bn_down(level)) for level in range(spec.n_levels)])
        self.up = nn.ModuleList([nn.ModuleList([Conv(c) for c in spec.up(res)]) for res in range(spec.n_levels - 1)])
        self.bn_up = nn.ModuleList([BatchNorm(spec.bn_up(res)) for res in range(spec.n_levels - 1)])
        self.merges = [spec.merges(res) for res in range(spec.n_levels - 1)]
        self.likelihood = Conv(spec.likelihood())

    def encode(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """The two convolutions of encoder level ``level`` (the skip connection's tensor)."""
        for conv in self.down[level]:
            x = conv(x)
        return x

    def decode(self, res: int, skip: torch.Tensor | None, low: torch.Tensor) -> torch.Tensor:
        """Decoder level ``res``: ``low`` (already upsampled to this level's grid) merged with the skip, two
        convolutions, BatchNorm."""
        x = torch.cat([skip, low], dim=1) if skip is not None else low
        for conv in self.up[res]:
            x = conv(x)
        return self.bn_up[res](x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Likelihood and softmax (in float32, also under autocast)."""
        return torch.softmax(self.likelihood(x).float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        skips = []
        for level in range(self.n_levels):
            skip = self.encode(level, x)
            skips.append(skip)
            x = self.bn_down[level](skip)
            if level < self.n_levels - 1:
                x = F.max_pool3d(x, 2)
        for res in range(self.n_levels - 2, -1, -1):
            x = self.decode(res, skips[res] if self.merges[res] else None, upsample(x))
        return self.head(x)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upsampling by 2 along X, Y, Z (Keras' ``UpSampling3D(2)``)."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def one_hot_argmax(x: torch.Tensor, depth: int) -> torch.Tensor:
    """Hard decision between cascaded networks (channels first), as they were trained."""
    return F.one_hot(torch.argmax(x, dim=1), depth).permute(0, 4, 1, 2, 3).to(torch.float32)


class Robust(nn.Module):
    """SynthSeg-robust (``architecture.Robust``): U-Net to coarse groups -> "l2l" denoiser -> "unet2" on image +
    groups."""

    def __init__(self, spec: arch.Robust):
        super().__init__()
        self.n_groups = spec.n_groups
        self.unet, self.l2l, self.unet2 = (UNet(stage) for stage in spec.stages)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = one_hot_argmax(self.unet(image), self.n_groups)
        x = one_hot_argmax(self.l2l(x), self.n_groups)
        if self.n_groups <= 2:
            x = x[:, 1:]
        return self.unet2(torch.cat([image.float(), x.to(image.dtype)], dim=1))


class QC(nn.Module):
    """The QC regressor (``architecture.QC``, as the TF backend's ``qc_model``: the level's last conv has no
    activation; a 5x5x5 "expand" conv matches the shortcut's channels; ReLU and BatchNorm after the sum; the final map
    averaged over space)."""

    def __init__(self, spec: arch.QC):
        super().__init__()
        self.n_levels = spec.n_levels
        self.levels = nn.ModuleList()
        for level in range(spec.n_levels):
            conv0, conv1, expand, bn = spec.level(level)
            parts = nn.ModuleDict({"conv0": Conv(conv0), "conv1": Conv(conv1), "bn": BatchNorm(bn)})
            if expand is not None:
                parts["expand"] = Conv(expand)
            self.levels.append(parts)
        self.final = nn.ModuleList([Conv(c) for c in spec.final()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        for level, parts in enumerate(self.levels):
            shortcut = parts["expand"](x) if "expand" in parts else x
            y = parts["conv1"](parts["conv0"](x))
            x = parts["bn"](F.relu(shortcut + y))
            if level < self.n_levels - 1:
                x = F.max_pool3d(x, 2)
        x = F.max_pool3d(x, 2)
        for conv in self.final:
            x = conv(x)
        return x.float().mean(dim=(2, 3, 4))


def module(net: arch.Network) -> nn.Module:
    """The ``torch.nn`` module of any of SynthSeg's networks."""
    if isinstance(net, arch.Robust):
        return Robust(net)
    if isinstance(net, arch.QC):
        return QC(net)
    return UNet(net)


def load_arrays(model: nn.Module, arrays: dict[str, dict[str, np.ndarray]]) -> int:
    """Set every weighted layer of ``model`` from checked arrays (``engine.weights.checked``); the number set."""
    count = 0
    for m in model.modules():
        if isinstance(m, (Conv, BatchNorm)):
            m.set_keras(arrays[m.keras_name])
            count += 1
    return count


def blur_taps(sigma: float) -> list[float]:
    """The 1-D factor of upstream's 3-D Gaussian (window 2*ceil(2.5 sigma / 2) + 1 = 3 taps for sigma 0.5): the
    float32 density normalised to sum 1. Upstream's kernel, exp of the summed per-axis log-densities normalised
    as a whole, is their outer product to within 1.2e-7 (tested), so the blur runs as three 1-D passes of 3 taps
    instead of one 27-tap depthwise convolution, which PyTorch's CPU and MPS kernels run slowly."""
    window = int(np.int32(np.ceil(2.5 * sigma) / 2) * 2 + 1)
    centre = (window - 1) / 2
    x = torch.arange(window, dtype=torch.float32)
    sig = torch.tensor(float(sigma), dtype=torch.float32)
    taps = torch.exp(-torch.square(x - centre) / (2 * sig ** 2) - torch.log(np.float32(np.sqrt(2 * np.pi)) * sig))
    return [float(t) for t in taps / taps.sum()]


def blur(x: torch.Tensor, taps: list[float], dims: tuple[int, ...] = (2, 3, 4)) -> torch.Tensor:
    """Separable "same" filter of ``x`` along ``dims`` with zeros beyond the edges (as the convolution's zero
    padding): per dimension, the weighted sum of the shifted tensor, in place on one new tensor per pass."""
    half = len(taps) // 2
    for d in dims:
        n = x.shape[d]
        y = x * taps[half]
        for k, w in enumerate(taps):
            shift = k - half
            if shift == 0 or abs(shift) >= n:
                continue
            if shift < 0:  # y[i] += w * x[i + shift]
                y.narrow(d, -shift, n + shift).add_(x.narrow(d, 0, n + shift), alpha=w)
            else:
                y.narrow(d, 0, n - shift).add_(x.narrow(d, shift, n - shift), alpha=w)
        x = y
    return x
