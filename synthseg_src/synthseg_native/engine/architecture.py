"""SynthSeg's networks as numbers: every layer's name, channels, kernel and level, with no framework.

Upstream builds its networks in ``ext/neuron/models.py`` (U-Net, residual encoder) and ``predict_synthseg``
(the robust cascade, the parcellation and QC heads). Their architecture is a fact both backends need — to build
their layers, to check a weights file's arrays, to count the convolutions' FLOPs — so it lives here once: the TF
backend turns a :class:`UNet` into Keras layers of the same names, the PyTorch one into ``torch.nn`` modules, and
:func:`conv_flops` and :func:`weight_shapes` read the same description.

Layer names are those of the official ``.h5`` files; shapes are in Keras' layout (kernel ``(k, k, k, in, out)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..config import N_LEVELS
from . import labels as L

__all__ = ["BN_KINDS", "N_LEVELS", "QC", "QC_SHAPE", "BatchNorm", "Conv", "Network", "Robust", "UNet", "conv_flops",
           "network", "per_voxel_flop", "weight_shapes"]
BN_KINDS = ("gamma", "beta", "moving_mean", "moving_variance")
QC_SHAPE = 224  # the QC network's input grid: the segmentation cropped or padded to 224^3 around its foreground


@dataclass(frozen=True)
class Conv:
    """A "same" 3-D convolution with bias; ``level``: how many times the grid was halved before it."""

    name: str
    c_in: int
    c_out: int
    kernel: int
    activation: str | None
    level: int

    def flop_per_voxel(self) -> int:
        """FLOPs of one output voxel: 2 per multiply-add, 1 per bias value (what the roofline measures)."""
        return per_voxel_flop(self.c_in, self.c_out, self.kernel)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"kernel": (self.kernel,) * 3 + (self.c_in, self.c_out), "bias": (self.c_out,)}


@dataclass(frozen=True)
class BatchNorm:
    """Keras' BatchNormalization at inference (epsilon 1e-3), per channel."""

    name: str
    channels: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {kind: (self.channels,) for kind in BN_KINDS}


def per_voxel_flop(c_in: int, c_out: int, kernel: int, bias: bool = True) -> int:
    """FLOPs of one output voxel of a ``kernel``³ convolution: 2 per multiply-add, 1 per bias value."""
    return c_out * (2 * kernel ** 3 * c_in + (1 if bias else 0))


@dataclass(frozen=True)
class UNet:
    """Upstream's U-Net: per level two ELU convolutions then BatchNorm (then 2x2x2 max-pooling going down); going
    up, nearest upsampling, concatenation ``[skip, upsampled]``, two convolutions, BatchNorm; a 1x1x1 likelihood and a
    softmax ``{prefix}_prediction``. Skips are taken *before* the encoder's BatchNorm. ``skip_n`` drops the skips of
    the decoder levels at the finest ``skip_n`` resolutions (the robust model's "l2l" network).

    Decoder levels are indexed by resolution ``res`` (0 = full); Keras numbers them deepest first, which the names
    keep."""

    prefix: str
    c_in: int
    n_labels: int
    conv_size: int = 3
    n_features: int = 24
    n_levels: int = N_LEVELS
    skip_n: int = 0

    def features(self, level: int) -> int:
        return int(np.round(self.n_features * 2 ** level))

    def down(self, level: int) -> tuple[Conv, Conv]:
        c_in = self.c_in if level == 0 else self.features(level - 1)
        f = self.features(level)
        return tuple(Conv(f"{self.prefix}_conv_downarm_{level}_{k}", c_in if k == 0 else f, f, self.conv_size,
                          "elu", level) for k in range(2))  # type: ignore[return-value]

    def bn_down(self, level: int) -> BatchNorm:
        return BatchNorm(f"{self.prefix}_bn_down_{level}", self.features(level))

    def merges(self, res: int) -> bool:
        """Whether decoder level ``res`` concatenates the encoder's skip."""
        return res >= self.skip_n

    def keras_level(self, res: int) -> int:
        """Keras' index of decoder level ``res`` (``{prefix}_up_{n_levels + i}``, ``{prefix}_bn_up_{i}``)."""
        return self.n_levels - 2 - res

    def up(self, res: int) -> tuple[Conv, Conv]:
        f = self.features(res)
        c_first = self.features(res + 1) + (f if self.merges(res) else 0)
        u = self.n_levels + self.keras_level(res)
        return tuple(Conv(f"{self.prefix}_conv_uparm_{u}_{k}", c_first if k == 0 else f, f, self.conv_size, "elu",
                          res) for k in range(2))  # type: ignore[return-value]

    def bn_up(self, res: int) -> BatchNorm:
        return BatchNorm(f"{self.prefix}_bn_up_{self.keras_level(res)}", self.features(res))

    def likelihood(self) -> Conv:
        return Conv(f"{self.prefix}_likelihood", self.features(0), self.n_labels, 1, None, 0)

    def layers(self) -> list[Conv | BatchNorm]:
        """Every weighted layer, in the order Keras builds them."""
        out: list[Conv | BatchNorm] = []
        for level in range(self.n_levels):
            out += [*self.down(level), self.bn_down(level)]
        for res in range(self.n_levels - 2, -1, -1):
            out += [*self.up(res), self.bn_up(res)]
        return out + [self.likelihood()]


@dataclass(frozen=True)
class Robust:
    """SynthSeg-robust: a U-Net to coarse groups, the "l2l" denoiser on their one-hot argmax, and "unet2" on the
    image with the denoised groups (one-hot argmax again); hard decisions between the stages, as trained."""

    n_labels: int
    n_groups: int = 5

    @property
    def stages(self) -> tuple[UNet, UNet, UNet]:
        groups = self.n_groups - 1 if self.n_groups <= 2 else self.n_groups  # two groups: the background dropped
        return (UNet("unet", 1, self.n_groups),
                UNet("l2l", self.n_groups, self.n_groups, conv_size=5, n_features=16, skip_n=2),
                UNet("unet2", 1 + groups, self.n_labels))

    def layers(self) -> list[Conv | BatchNorm]:
        return [layer for stage in self.stages for layer in stage.layers()]


@dataclass(frozen=True)
class QC:
    """The QC regressor (upstream's ``conv_enc(use_residuals=True)``): per level a ReLU convolution and one without
    activation, a ReLU "expand" convolution on the shortcut where the channel counts differ, the sum through ReLU
    and BatchNorm, max-pooling; two ReLU convolutions to one map per group, averaged over space."""

    n_groups: int
    n_levels: int = 4
    conv_size: int = 5
    n_features: int = 24

    def features(self, level: int) -> int:
        return int(np.round(self.n_features * 2 ** level))

    def level(self, level: int) -> tuple[Conv, Conv, Conv | None, BatchNorm]:
        c_in = self.n_groups if level == 0 else self.features(level - 1)
        f, k = self.features(level), self.conv_size
        expand = None
        if c_in > 1 and f > 1 and c_in != f:
            expand = Conv(f"qc_expand_down_merge_{level}", c_in, f, k, "relu", level)
        return (Conv(f"qc_conv_downarm_{level}_0", c_in, f, k, "relu", level),
                Conv(f"qc_conv_downarm_{level}_1", f, f, k, None, level), expand,
                BatchNorm(f"qc_bn_down_{level}", f))

    def final(self) -> tuple[Conv, Conv]:
        c = self.features(self.n_levels - 1)
        return tuple(Conv(f"qc_final_conv_{k}", c if k == 0 else self.n_groups, self.n_groups, self.conv_size,
                          "relu", self.n_levels) for k in range(2))  # type: ignore[return-value]

    def layers(self) -> list[Conv | BatchNorm]:
        out: list[Conv | BatchNorm] = []
        for level in range(self.n_levels):
            conv0, conv1, expand, bn = self.level(level)
            out += [conv0, conv1] + ([expand] if expand else []) + [bn]
        return out + list(self.final())


Network = Union[UNet, Robust, QC]


def network(key: str, label_set: L.LabelSet) -> Network:
    """The network whose weights file is ``MODEL_FILES[key]`` (``seg2``, ``seg1``, ``robust``, ``parc``, ``qc``)."""
    if key == "robust":
        return Robust(len(label_set.labels), len(L.denoiser_groups()))
    if key == "parc":
        return UNet("unet_parc", 3, len(L.parcellation_labels()))
    if key == "qc":
        return QC(len(np.unique(label_set.qc_groups)))
    return UNet("unet", 1, len(label_set.labels))


def weight_shapes(net: Network) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every array the weights file must hold for ``net``: {layer: {kind: shape}}, in Keras' layout."""
    return {layer.name: layer.shapes() for layer in net.layers()}


def conv_flops(net: Network, grid: tuple[int, ...]) -> int:
    """Convolution FLOPs of one pass of ``net`` on a padded ``grid`` (X, Y, Z): every convolution's output voxels at
    its level times its per-voxel FLOPs (BatchNorm, activations, pooling and softmax are under 1 % and left out)."""
    return sum(math.prod(-(-g // 2 ** conv.level) for g in grid[:3]) * conv.flop_per_voxel()
               for conv in net.layers() if isinstance(conv, Conv))
