"""A NumPy backend of the engine's protocol (engine/backend.py), for tests: slow, exact to float64, tiny networks.

It runs SynthSeg's networks from their framework-free description (engine/architecture.py) with plain numpy
operations, whole-volume (its "slabs" are cut from the whole output), so that the predictor's routing and the
protocol can be tested in milliseconds on small grids, against the same expectations as the real backends
(tests/engine/test_predictor.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy.ndimage import convolve

from synthseg_native.engine import architecture as arch
from synthseg_native.engine.backend import SIGMA_POSTERIORS
from synthseg_native.engine.runtime import Runtime

BN_EPSILON = 1e-3
SLAB = 4


def gaussian(sigma: float) -> np.ndarray:
    """Upstream's 3-D Gaussian kernel: exp of the summed per-axis log densities, normalised as a whole."""
    window = int(np.int32(np.ceil(2.5 * sigma) / 2) * 2 + 1)
    x = np.arange(window) - (window - 1) / 2
    one = -x ** 2 / (2 * sigma ** 2) - np.log(np.sqrt(2 * np.pi) * sigma)
    k = np.exp(one[:, None, None] + one[None, :, None] + one[None, None, :])
    return k / k.sum()


def conv(x: np.ndarray, layer: arch.Conv, w: dict[str, np.ndarray]) -> np.ndarray:
    """'same' convolution of (X, Y, Z, C_in) with a Keras kernel (k, k, k, in, out), bias, activation."""
    k = layer.kernel
    h = k // 2
    padded = np.pad(x, ((h, h), (h, h), (h, h), (0, 0)))
    out = np.zeros(x.shape[:3] + (layer.c_out,))
    for i in range(k):
        for j in range(k):
            for m in range(k):
                window = padded[i:i + x.shape[0], j:j + x.shape[1], m:m + x.shape[2]]
                out += window @ w["kernel"][i, j, m]
    out += w["bias"]
    if layer.activation == "elu":
        out = np.where(out > 0, out, np.expm1(np.minimum(out, 0)))
    elif layer.activation == "relu":
        out = np.maximum(out, 0)
    return out


def batchnorm(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    return (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + BN_EPSILON) * w["gamma"] + w["beta"]


def maxpool(x: np.ndarray) -> np.ndarray:
    s = x.shape
    return x.reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2, s[3]).max(axis=(1, 3, 5))


def upsample(x: np.ndarray) -> np.ndarray:
    return x.repeat(2, 0).repeat(2, 1).repeat(2, 2)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def unet(net: arch.UNet, w: dict[str, dict[str, np.ndarray]], x: np.ndarray) -> np.ndarray:
    skips = []
    for level in range(net.n_levels):
        for layer in net.down(level):
            x = conv(x, layer, w[layer.name])
        skips.append(x)
        x = batchnorm(x, w[net.bn_down(level).name])
        if level < net.n_levels - 1:
            x = maxpool(x)
    for res in range(net.n_levels - 2, -1, -1):
        x = upsample(x)
        if net.merges(res):
            x = np.concatenate([skips[res], x], axis=-1)
        for layer in net.up(res):
            x = conv(x, layer, w[layer.name])
        x = batchnorm(x, w[net.bn_up(res).name])
    return softmax(conv(x, net.likelihood(), w[net.likelihood().name]))


def one_hot_argmax(x: np.ndarray, depth: int) -> np.ndarray:
    return np.eye(depth)[np.argmax(x, axis=-1)]


def forward(net: arch.Network, w: dict[str, dict[str, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """One image (X, Y, Z, C) through ``net``."""
    if isinstance(net, arch.UNet):
        return unet(net, w, x)
    if isinstance(net, arch.Robust):
        first, l2l, last = net.stages
        y = one_hot_argmax(unet(l2l, w, one_hot_argmax(unet(first, w, x), net.n_groups)), net.n_groups)
        if net.n_groups <= 2:
            y = y[..., 1:]
        return unet(last, w, np.concatenate([x, y], axis=-1))
    for level in range(net.n_levels):
        conv0, conv1, expand, bn = net.level(level)
        shortcut = x if expand is None else conv(x, expand, w[expand.name])
        x = batchnorm(np.maximum(shortcut + conv(conv(x, conv0, w[conv0.name]), conv1, w[conv1.name]), 0),
                      w[bn.name])
        if level < net.n_levels - 1:
            x = maxpool(x)
    x = maxpool(x)
    for layer in net.final():
        x = conv(x, layer, w[layer.name])
    return x.mean(axis=(0, 1, 2))


class NumpyBackend:
    """The protocol's primitives in numpy; tensors are float64 arrays (1, X, Y, Z, C)."""

    name = "numpy"

    def __init__(self) -> None:
        self.runtime = Runtime(threads=1, device="CPU (numpy)", precision="fp32", backend="numpy")
        self.kernel = gaussian(SIGMA_POSTERIORS)
        self.calls: list[str] = []  # what the predictor asked for, in order

    def build(self, net: arch.Network, arrays: dict[str, dict[str, np.ndarray]]) -> Any:
        return net, {k: {kind: v.astype(np.float64) for kind, v in kinds.items()} for k, kinds in arrays.items()}

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def upload(self, image: np.ndarray) -> np.ndarray:
        return image.astype(np.float64)

    def download(self, post: np.ndarray) -> np.ndarray:
        return post.astype(np.float32)

    def copy(self, post: np.ndarray) -> np.ndarray:
        return post.copy()

    def flipped(self, x: np.ndarray) -> np.ndarray:
        return x[:, ::-1].copy()

    def run(self, built: Any, x: np.ndarray) -> np.ndarray:
        self.calls.append("run")
        net, w = built
        return forward(net, w, x[0])[None]

    def run_slabs(self, built: Any, x: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        self.calls.append("run_slabs")
        whole = self.run(built, x)
        for x0 in range(0, whole.shape[1], SLAB):
            yield x0, min(x0 + SLAB, whole.shape[1]), whole[:, x0:x0 + SLAB]

    def assemble(self, slabs: Iterator[tuple[int, int, np.ndarray]], like: np.ndarray) -> np.ndarray:
        return np.concatenate([part for _, _, part in slabs], axis=1)

    def blur(self, post: np.ndarray) -> np.ndarray:
        self.calls.append("blur")
        for c in range(post.shape[-1]):
            post[0, ..., c] = convolve(post[0, ..., c], self.kernel, mode="constant")
        return post

    def blur_slabs(self, slabs: Iterator[tuple[int, int, np.ndarray]]) -> Iterator[tuple[int, int, np.ndarray]]:
        parts = list(slabs)
        whole = self.blur(np.concatenate([p for _, _, p in parts], axis=1))
        for x0, x1, _ in parts:
            yield x0, x1, whole[:, x0:x1]

    def blur_flip_average(self, post: np.ndarray, flipped: Iterator[tuple[int, int, np.ndarray]],
                          order: np.ndarray) -> np.ndarray:
        other = self.blur(np.concatenate([p for _, _, p in flipped], axis=1))
        post[...] = (post + other[:, ::-1][..., order]) * 0.5
        return post

    def decisions(self, post: np.ndarray) -> np.ndarray:
        return np.argmax(post, axis=-1).astype(np.int32)

    def parc_input(self, x: np.ndarray, post: np.ndarray, cortex: np.ndarray) -> np.ndarray:
        return np.concatenate([x, np.eye(2)[cortex[self.decisions(post)]]], axis=-1)

    def score(self, built: Any, groups: np.ndarray) -> np.ndarray:
        self.calls.append("score")
        net, w = built
        return forward(net, w, groups[0].astype(np.float64))[None].astype(np.float32)

    def device_memory(self) -> tuple[float | None, str] | None:
        return None
