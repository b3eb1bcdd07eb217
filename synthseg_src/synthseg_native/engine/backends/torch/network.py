"""SynthSeg's networks in ``torch.nn``, loaded from the official Keras ``.h5`` files (read with h5py).

The modules mirror the TensorFlow backend's graph layer for layer (backends/tf/network.py, after upstream's
``ext/neuron/models.py``): 3x3x3 "same" convolutions with ELU, BatchNorm (inference, Keras' epsilon 1e-3) at the
end of each level, 2x2x2 max-pooling, nearest upsampling, skip connections taken *before* the BatchNorm, a 1x1x1
likelihood and a softmax. Tensors are channels first (N, C, X, Y, Z), PyTorch's native layout; the axes X, Y, Z
are the Keras model's, so a Keras kernel (kx, ky, kz, in, out) becomes (out, in, kx, ky, kz) unchanged otherwise.

Layer names are the Keras ones, so :func:`load_arrays` can report a missing or misshaped layer by the name the
weight file uses, as the TF backend does.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ....config import N_LEVELS
from ....errors import WeightsError

BN_EPSILON = 1e-3  # Keras' BatchNormalization default, which SynthSeg's models keep


class Conv(nn.Conv3d):
    """A Keras ``Conv3D(padding="same")``: odd kernel, zero padding of half its size, optional activation.

    ``level`` is how many times the grid was halved before this layer (for the FLOP count).
    """

    def __init__(self, name: str, c_in: int, c_out: int, size: int, activation: str | None, level: int):
        super().__init__(c_in, c_out, size, padding=size // 2)
        self.keras_name, self.activation, self.level = name, activation, level

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

    def set_keras(self, stored: dict[str, np.ndarray], path: str | os.PathLike) -> None:
        kernel = _array(stored, "kernel", self.keras_name, path, tuple(self.weight.shape[2:]) +
                        (self.in_channels, self.out_channels))
        bias = _array(stored, "bias", self.keras_name, path, (self.out_channels,))
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2))))
            self.bias.copy_(torch.from_numpy(bias))


class BatchNorm(nn.Module):
    """Keras' BatchNormalization at inference: ``(x - mean) / sqrt(var + eps) * gamma + beta`` per channel."""

    def __init__(self, name: str, channels: int):
        super().__init__()
        self.keras_name = name
        for kind in ("gamma", "beta", "moving_mean", "moving_variance"):
            self.register_buffer(kind, torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.batch_norm(x, self.moving_mean, self.moving_variance, self.gamma, self.beta, False, 0.0,
                            BN_EPSILON)

    def set_keras(self, stored: dict[str, np.ndarray], path: str | os.PathLike) -> None:
        for kind in ("gamma", "beta", "moving_mean", "moving_variance"):
            buf = getattr(self, kind)
            buf.copy_(torch.from_numpy(_array(stored, kind, self.keras_name, path, tuple(buf.shape))))


def _array(stored: dict[str, np.ndarray], kind: str, layer: str, path: str | os.PathLike,
           shape: tuple[int, ...]) -> np.ndarray:
    """One array of a layer, checked as the TF backend checks it (the same messages)."""
    if kind not in stored:
        raise WeightsError(f"{path}: layer '{layer}' has no '{kind}' weights")
    value = np.asarray(stored[kind], dtype=np.float32)
    if tuple(value.shape) != shape:
        raise WeightsError(f"{path}: layer '{layer}' {kind} has shape {tuple(value.shape)}, the network expects "
                           f"{shape}")
    if not np.all(np.isfinite(value)):  # damaged bytes inside a dataset read back as NaN/Inf
        raise WeightsError(f"{path}: layer '{layer}' {kind} has NaN or infinite values (corrupt file?)")
    return value


def features(n_features: int, level: int) -> int:
    return int(np.round(n_features * 2 ** level))


class UNet(nn.Module):
    """Upstream's U-Net: per level two convolutions then BatchNorm (then max-pooling going down); going up,
    nearest upsampling, concatenation ``[skip, upsampled]``, two convolutions, BatchNorm; likelihood, softmax.

    ``skip_n`` drops the skip connections of the deepest decoder levels (the robust model's "l2l" network).
    The attributes are lists indexed by level so the slab-streaming runner (stream.py) can run pieces of it.
    """

    def __init__(self, prefix: str, c_in: int, n_labels: int, conv_size: int = 3, n_features: int = 24,
                 n_levels: int = N_LEVELS, skip_n: int = 0):
        super().__init__()
        self.prefix, self.n_levels, self.n_labels = prefix, n_levels, n_labels
        self.down = nn.ModuleList()
        self.bn_down = nn.ModuleList()
        c = c_in
        for level in range(n_levels):
            feats = features(n_features, level)
            self.down.append(nn.ModuleList([
                Conv(f"{prefix}_conv_downarm_{level}_{k}", c if k == 0 else feats, feats, conv_size, "elu", level)
                for k in range(2)]))
            self.bn_down.append(BatchNorm(f"{prefix}_bn_down_{level}", feats))
            c = feats
        # up[i] is the decoder level at resolution i (0 = full), so that up[0] is the last to run.
        self.up: nn.ModuleList = nn.ModuleList([nn.Module() for _ in range(n_levels - 1)])
        self.bn_up = nn.ModuleList([nn.Module() for _ in range(n_levels - 1)])
        self.merges = [False] * (n_levels - 1)
        for level in range(n_levels - 1):  # Keras' order: deepest decoder level first
            res = n_levels - 2 - level
            feats = features(n_features, res)
            merge = level < n_levels - skip_n - 1
            c_first = c + (features(n_features, res) if merge else 0)
            u = n_levels + level
            self.up[res] = nn.ModuleList([
                Conv(f"{prefix}_conv_uparm_{u}_{k}", c_first if k == 0 else feats, feats, conv_size, "elu", res)
                for k in range(2)])
            self.bn_up[res] = BatchNorm(f"{prefix}_bn_up_{level}", feats)
            self.merges[res] = merge
            c = feats
        self.likelihood = Conv(f"{prefix}_likelihood", c, n_labels, 1, None, 0)

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
    """SynthSeg-robust: U-Net to coarse groups -> "l2l" denoiser -> "unet2" on image + groups."""

    def __init__(self, n_labels: int, n_groups: int = 5):
        super().__init__()
        self.n_groups = n_groups
        self.unet = UNet("unet", 1, n_groups)
        self.l2l = UNet("l2l", n_groups, n_groups, conv_size=5, n_features=16, skip_n=2)
        self.unet2 = UNet("unet2", 1 + (n_groups - 1 if n_groups <= 2 else n_groups), n_labels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = one_hot_argmax(self.unet(image), self.n_groups)
        x = one_hot_argmax(self.l2l(x), self.n_groups)
        if self.n_groups <= 2:
            x = x[:, 1:]
        return self.unet2(torch.cat([image.float(), x.to(image.dtype)], dim=1))


class QC(nn.Module):
    """The QC regressor: residual encoder on one-hot structure groups -> one score per group (as the TF
    backend's ``qc_model``: the level's last conv has no activation; a 5x5x5 "expand" conv matches the
    shortcut's channels; ReLU and BatchNorm after the sum; the final map averaged over space)."""

    def __init__(self, n_groups: int = 9, n_levels: int = 4, conv_size: int = 5, n_features: int = 24):
        super().__init__()
        self.n_levels = n_levels
        self.levels = nn.ModuleList()
        c = n_groups
        for level in range(n_levels):
            feats = features(n_features, level)
            parts = nn.ModuleDict({
                "conv0": Conv(f"qc_conv_downarm_{level}_0", c, feats, conv_size, "relu", level),
                "conv1": Conv(f"qc_conv_downarm_{level}_1", feats, feats, conv_size, None, level),
                "bn": BatchNorm(f"qc_bn_down_{level}", feats)})
            if c > 1 and feats > 1 and c != feats:
                parts["expand"] = Conv(f"qc_expand_down_merge_{level}", c, feats, conv_size, "relu", level)
            self.levels.append(parts)
            c = feats
        self.final = nn.ModuleList([Conv(f"qc_final_conv_{k}", c if k == 0 else n_groups, n_groups, conv_size,
                                         "relu", n_levels) for k in range(2)])

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


def weighted_layers(model: nn.Module) -> dict[str, Conv | BatchNorm]:
    """Every layer holding weights, by its Keras name."""
    return {m.keras_name: m for m in model.modules() if isinstance(m, (Conv, BatchNorm))}


def load_arrays(model: nn.Module, arrays: dict[str, dict[str, np.ndarray]], path: str | os.PathLike) -> int:
    """Set every weighted layer of ``model`` from ``engine.weights.read_weights``'s arrays; the number set.

    Raises :class:`WeightsError` naming the first layer that is missing or misshaped.
    """
    count = 0
    for name, layer in weighted_layers(model).items():
        if name not in arrays:
            raise WeightsError(f"{path}: layer '{name}' is missing from the weights file")
        layer.set_keras(arrays[name], path)
        count += 1
    return count


def conv_flops(model: nn.Module, grid: tuple[int, int, int]) -> int:
    """Convolution FLOPs of one pass on a ``grid`` input, counted as the TF backend's flops.py counts them:
    2 per multiply-add (2 k^3 C_in C_out per output voxel) plus one per output value for the bias."""
    total = 0
    for m in model.modules():
        if isinstance(m, Conv):
            voxels = int(np.prod([g // 2 ** m.level for g in grid]))
            k = int(np.prod(m.kernel_size))
            total += voxels * m.out_channels * (2 * k * m.in_channels + 1)
    return total


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
