"""The SynthSeg networks as tf.keras models whose layer names match the official weight files.

Layers and their configuration follow upstream's ``ext/neuron/models.py`` (U-Net, encoder) and the
inference graph of ``predict_synthseg.build_model`` (blur, flip, argmax/one-hot transitions), so
that TensorFlow executes the same kernels in the same order and produces the same bits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from ... import architecture as arch
from ...architecture import N_LEVELS
from .tensors import aligned_empty, as_tensor, copy_into

KL = tf.keras.layers


def _conv(conv: arch.Conv, data_format: bool = True) -> KL.Conv3D:
    """A Keras Conv3D as upstream configures it (``data_format`` and ``dilation_rate`` spelled out where it does)."""
    extra = {"data_format": "channels_last", "dilation_rate": 1} if data_format else {}
    return KL.Conv3D(conv.c_out, conv.kernel, padding="same", activation=conv.activation, name=conv.name, **extra)


def unet(inputs: tf.Tensor, net: arch.UNet) -> tf.Tensor:
    """Encoder/decoder with BatchNorm at the end of each level and softmax output ``{prefix}_prediction``.

    Skip connections take the last convolution of each encoder level *before* its BatchNorm;
    ``skip_n`` removes them at the finest decoder levels (the robust model's "l2l" network).
    """
    x = inputs
    skips: list[tf.Tensor] = []
    for level in range(net.n_levels):
        for conv in net.down(level):
            x = _conv(conv)(x)
        skips.append(x)
        x = KL.BatchNormalization(axis=-1, name=net.bn_down(level).name)(x)
        if level < net.n_levels - 1:
            x = KL.MaxPooling3D(pool_size=(2, 2, 2), padding="same", name=f"{net.prefix}_maxpool_{level}")(x)
    for res in range(net.n_levels - 2, -1, -1):
        u = net.n_levels + net.keras_level(res)
        x = KL.UpSampling3D(size=(2, 2, 2), name=f"{net.prefix}_up_{u}")(x)
        if net.merges(res):
            x = KL.concatenate([skips[res], x], axis=4, name=f"{net.prefix}_merge_{u}")
        for conv in net.up(res):
            x = KL.Conv3D(conv.c_out, conv.kernel, padding="same", activation=conv.activation, dilation_rate=1,
                          name=conv.name)(x)
        x = KL.BatchNormalization(axis=-1, name=net.bn_up(res).name)(x)
    likelihood = net.likelihood()
    x = KL.Conv3D(likelihood.c_out, likelihood.kernel, activation=None, name=likelihood.name)(x)
    # Under a reduced-precision policy (--precision) the softmax still runs, and returns, in float32.
    mixed = tf.keras.mixed_precision.global_policy().compute_dtype != "float32"
    return KL.Lambda(lambda t: tf.keras.activations.softmax(tf.cast(t, "float32") if mixed else t, axis=4),
                     name=f"{net.prefix}_prediction", **({"dtype": "float32"} if mixed else {}))(x)


def _one_hot_of_argmax(x: tf.Tensor, depth: int, name: str) -> tf.Tensor:
    """Hard decision between cascaded networks, as they were trained."""
    x = KL.Lambda(lambda t: tf.argmax(t, axis=-1), name=f"{name}_argmax")(x)
    return KL.Lambda(lambda t: tf.one_hot(tf.cast(t, "int32"), depth=depth, axis=-1), name=f"{name}_onehot")(x)


def unet_model(net: arch.UNet) -> tf.keras.Model:
    """A plain U-Net (the SynthSeg 1.0/2.0 segmentation, the parcellation): image → softmax posteriors."""
    image = KL.Input(shape=[None, None, None, net.c_in], name=f"{net.prefix}_input")
    name = {"unet": "synthseg_unet", "unet_parc": "synthseg_parc"}.get(net.prefix, f"synthseg_{net.prefix}")
    return tf.keras.Model(image, unet(image, net), name=name)


def robust_model(net: arch.Robust) -> tf.keras.Model:
    """SynthSeg-robust: U-Net to coarse groups → "l2l" denoiser → "unet2" on image + groups."""
    first, l2l, last = net.stages
    image = KL.Input(shape=[None, None, None, first.c_in], name="unet_input")
    x = _one_hot_of_argmax(unet(image, first), net.n_groups, "stage1")
    x = _one_hot_of_argmax(unet(x, l2l), net.n_groups, "stage2")
    if net.n_groups <= 2:
        x = KL.Lambda(lambda t: t[..., 1:], name="stage2_drop_bg")(x)
    x = KL.Lambda(lambda t: tf.cast(tf.concat(t, axis=-1), "float32"), name="stage2_concat")([image, x])
    return tf.keras.Model(image, unet(x, last), name="synthseg_robust")


def qc_model(net: arch.QC) -> tf.keras.Model:
    """QC regressor: residual encoder on one-hot structure groups → one score per group.

    Mirrors upstream's ``conv_enc(use_residuals=True)``: the last conv of a level has no
    activation, a 5×5×5 "expand" conv matches the channel count of the shortcut, and the sum goes
    through ReLU and BatchNorm; the final map is averaged over space inside the graph.
    """
    inp = KL.Input(shape=[None, None, None, net.n_groups], name="qc_input")
    x = inp
    for level in range(net.n_levels):
        conv0, conv1, expand, bn = net.level(level)
        shortcut = x
        x = _conv(conv0)(x)
        x = _conv(conv1, data_format=False)(x)
        if expand is not None:
            shortcut = _conv(expand)(shortcut)
        x = KL.add([shortcut, x], name=f"qc_res_down_merge_{level}")
        x = KL.Activation("relu", name=f"qc_res_down_merge_act_{level}")(x)
        x = KL.BatchNormalization(axis=-1, name=bn.name)(x)
        if level < net.n_levels - 1:
            x = KL.MaxPooling3D(pool_size=(2, 2, 2), padding="same", name=f"qc_maxpool_{level}")(x)
    x = KL.MaxPool3D(pool_size=(2, 2, 2), padding="same", name="qc_maxpool_3")(x)
    for conv in net.final():
        x = KL.Conv3D(conv.c_out, kernel_size=conv.kernel, padding="same", activation=conv.activation,
                      data_format="channels_last", name=conv.name)(x)
    score = KL.Lambda(lambda t: tf.reduce_mean(t, axis=[1, 2, 3]), name="qc_final_pred")(x)
    return tf.keras.Model(inp, score, name="synthseg_qc")


def keras_model(net: arch.Network) -> tf.keras.Model:
    """The Keras model of any of SynthSeg's networks, its layers named as in the official weight files."""
    if isinstance(net, arch.Robust):
        return robust_model(net)
    if isinstance(net, arch.QC):
        return qc_model(net)
    return unet_model(net)


class Argmax:
    """TensorFlow's argmax over channels (not numpy's), as int32.

    Upstream takes these hard decisions inside its graph; using the same op guarantees the same
    winner wherever two posteriors tie.
    """

    def __init__(self) -> None:
        self.fn = tf.function(lambda x: tf.cast(tf.argmax(x, axis=-1), "int32"),
                              input_signature=[tf.TensorSpec([1, None, None, None, None], tf.float32)])

    def __call__(self, post: np.ndarray) -> np.ndarray:
        return self.fn(post).numpy()


Slab = tuple[int, int, "np.ndarray | tf.Tensor"]


class Piece:
    """One compiled step of :class:`StagedUNet` (a conv on a slab with its context, BN + pooling, the core), with
    its convolution layers and its level, so a profiler can time it and count its FLOPs (tools/layerprofile.py).

    Off by default: a call is then just ``fn(*args)``. With ``timing`` on, each call's wall time (CPU execution is
    synchronous: the result exists when the call returns) and the voxels it produced are summed; the values
    computed are the same either way."""

    def __init__(self, label: str, fn, level: int, convs: tuple[tf.keras.layers.Layer, ...] = ()):
        self.label, self.fn, self.level, self.convs = label, fn, level, convs
        self.timing = False
        self.calls, self.seconds, self.voxels = 0, 0.0, 0

    def __call__(self, *args):
        if not self.timing:
            return self.fn(*args)
        t0 = time.perf_counter()
        out = self.fn(*args)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.voxels += int(np.prod(out.shape[1:4]))
        return out

    def conv_flops(self) -> list[tuple[tf.keras.layers.Layer, int]]:
        """Each convolution of the piece with its FLOPs for the voxels produced so far (as flops.py counts)."""
        return [(conv, self.voxels * arch.per_voxel_flop(conv.kernel.shape[-2], conv.filters, conv.kernel.shape[0]))
                for conv in self.convs]

    @property
    def flop(self) -> int:
        """Convolution FLOPs of the voxels produced so far."""
        return sum(flop for _, flop in self.conv_flops())


class StagedUNet:
    """Runs a trained :func:`unet` in exact stages so no high-resolution tensor of many channels is held whole.

    At each of the ``fine_levels`` top resolutions every 3×3×3 convolution streams along the first
    axis, one slab at a time, each slab sent with one row of context on either side taken from its
    neighbours (:func:`context_slabs`): a convolution recomputes only the two rows next to its slab
    (6 % extra at 32-row slabs), where running a level's two convolutions on one window with a 2-row
    halo recomputed 4 rows for each (25 % at 16-row slabs). BatchNorm + max-pooling work on the skip's
    slabs as they come; the decoder's first convolution reads its window of the stored skip and of the
    upsampled coarser output. Only the coarse middle runs on the whole volume. Measured bit-identical
    to one ``predict`` of the whole model: every piece is the same Keras layer on the same values, and
    pieces are cut after a layer's activation, never between a convolution and its bias/ELU, which
    TensorFlow's remapper fuses into one kernel that rounds differently from the unfused ops.

    Why two levels: TensorFlow's oneDNN allocator keeps its high-water mark for the life of the
    process, so the largest single graph sets the floor of the peak memory; with only the top level in
    slabs the half-resolution convs (144 channels after the skip merge) left ~2 GB behind.
    """

    def __init__(self, model: tf.keras.Model, prefix: str = "unet", n_levels: int = N_LEVELS, slab: int = 16,
                 fine_levels: int = 2):
        if slab < 2 or slab % 2:
            raise ValueError(f"slab must be a positive even number of rows (2x2x2 pooling), not {slab}")
        self.slab, self.fine = slab, fine_levels
        layer = model.get_layer
        cdt = tf.keras.mixed_precision.global_policy().compute_dtype  # float32 unless --precision

        def spec(channels: int, dtype: str = cdt) -> tf.TensorSpec:
            return tf.TensorSpec([1, None, None, None, channels], tf.as_dtype(dtype))

        rows = [tf.TensorSpec([], tf.int32)] * 3
        self.encoders: list[tuple] = []  # per fine level: conv 0, conv 1, BatchNorm + max-pooling
        self.decoders: list[tuple] = []  # per fine level: first conv (with the merge), second conv (+ BN ...)
        for level in range(fine_levels):
            conv0, conv1 = (layer(f"{prefix}_conv_downarm_{level}_{c}") for c in range(2))
            bn, pool = layer(f"{prefix}_bn_down_{level}"), layer(f"{prefix}_maxpool_{level}")
            in_dtype = model.inputs[0].dtype.name if level == 0 else cdt
            self.encoders.append((
                Piece(f"{prefix} encoder {level} conv 0", tf.function(
                    _with_context(conv0), input_signature=[spec(conv0.kernel.shape[-2], in_dtype)] * 3),
                    level, (conv0,)),
                Piece(f"{prefix} encoder {level} conv 1", tf.function(
                    _with_context(conv1), input_signature=[spec(conv1.kernel.shape[-2])] * 3), level, (conv1,)),
                Piece(f"{prefix} encoder {level} BN + max-pool", tf.function(
                    lambda t, bn=bn, pool=pool: pool(bn(t, training=False)),
                    input_signature=[spec(conv1.filters)]), level + 1)))
            u = n_levels + (n_levels - 2 - level)
            up, merge = layer(f"{prefix}_up_{u}"), layer(f"{prefix}_merge_{u}")
            conv0, conv1 = (layer(f"{prefix}_conv_uparm_{u}_{c}") for c in range(2))
            bn = layer(f"{prefix}_bn_up_{n_levels - 2 - level}")
            tail = [bn] + ([layer(f"{prefix}_likelihood"), layer(f"{prefix}_prediction")] if level == 0 else [])
            skip_ch = layer(f"{prefix}_conv_downarm_{level}_1").filters
            low_ch = conv0.kernel.shape[-2] - skip_ch
            self.decoders.append((
                Piece(f"{prefix} decoder {level} upsample + merge + conv 0", tf.function(
                    _merged_conv(up, merge, conv0), input_signature=[spec(skip_ch), spec(low_ch)] + rows),
                    level, (conv0,)),
                Piece(f"{prefix} decoder {level} conv 1 + BN" + (" + likelihood + softmax" if level == 0 else ""),
                      tf.function(_with_context(conv1, tail), input_signature=[spec(conv1.kernel.shape[-2])] * 3),
                      level, (conv1,) + ((layer(f"{prefix}_likelihood"),) if level == 0 else ()))))
        x = core_in = KL.Input(shape=[None, None, None, layer(f"{prefix}_conv_downarm_{fine_levels - 1}_1").filters],
                               dtype=cdt)
        skips = {}
        for level in range(fine_levels, n_levels):
            for conv in range(2):
                x = layer(f"{prefix}_conv_downarm_{level}_{conv}")(x)
            skips[level] = x
            x = layer(f"{prefix}_bn_down_{level}")(x)
            if level < n_levels - 1:
                x = layer(f"{prefix}_maxpool_{level}")(x)
        for res in range(n_levels - 2, fine_levels - 1, -1):  # decoder levels that stay in the core
            u = n_levels + (n_levels - 2 - res)
            x = layer(f"{prefix}_merge_{u}")([skips[res], layer(f"{prefix}_up_{u}")(x)])
            for conv in range(2):
                x = layer(f"{prefix}_conv_uparm_{u}_{conv}")(x)
            x = layer(f"{prefix}_bn_up_{n_levels - 2 - res}")(x)
        self.core = tf.keras.Model(core_in, x)
        self.run_core = Piece(f"{prefix} core (levels {fine_levels}-{n_levels - 1}, whole volume)", tf.function(
            lambda t: self.core(t, training=False), input_signature=[spec(core_in.shape[-1])]), fine_levels)
        self.pieces: list[Piece] = [p for level in self.encoders for p in level] + [self.run_core] + [
            p for level in reversed(self.decoders) for p in level]  # in the order they run

    def predict(self, image: np.ndarray, verbose: int = 0) -> np.ndarray:
        """Same call as ``Model.predict`` so either can serve the runner."""
        return assemble(self.predict_slabs(image), image.shape[1])

    def predict_slabs(self, image: np.ndarray) -> Iterator[tuple[int, int, tf.Tensor]]:
        """The network's output as consecutive slabs ``(x0, x1, output[:, x0:x1])`` along axis 1.

        Lets a caller consume the full-resolution output without ever holding all of it. The slabs are
        TensorFlow's own tensors (``np.asarray`` of one is a read-only view, no copy), so that the blur
        that usually follows takes them without TensorFlow copying them back in.
        """
        skips = []
        x = image
        for level in range(self.fine):
            skip, x = self._encode(level, x)
            skips.append(skip)
        low = self.run_core(as_tensor(x))  # stays a tensor: the decoder slices it in TensorFlow
        del x
        for level in range(self.fine - 1, 0, -1):
            low = assemble(self._decode(level, skips.pop(), low), low.shape[1] * 2)
        yield from self._decode(0, skips.pop(), low)

    def _encode(self, level: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Encoder level ``level``: its skip (the last conv, kept for the decoder) and its pooled output."""
        conv0, conv1, pool = self.encoders[level]
        size = x.shape[1]
        skip = pooled = None
        for x0, x1, part in context_slabs(conv1, context_slabs(conv0, _array_slabs(x, self.slab))):
            down = np.asarray(pool(part))
            if skip is None:  # aligned: their row windows go back to TensorFlow without a copy
                skip = aligned_empty((1, size) + tuple(part.shape[2:]), part.dtype.as_numpy_dtype)
                pooled = aligned_empty((1, size // 2) + down.shape[2:], down.dtype)
            copy_into(skip[:, x0:x1], part)
            copy_into(pooled[:, x0 // 2:x1 // 2], down)
        return skip, pooled

    def _decode(self, level: int, skip: np.ndarray, low: np.ndarray) -> Iterator[Slab]:
        """Decoder level ``level`` as a stream of slabs: the upsampled coarser output ``low`` merged with
        the skip, two convs and BatchNorm (at full resolution also the likelihood and the softmax)."""
        first, second = self.decoders[level]
        size = skip.shape[1]

        def slabs() -> Iterator[Slab]:
            for x0 in range(0, size, self.slab):
                x1 = min(size, x0 + self.slab)
                a, b = max(0, x0 - 1), min(size, x1 + 1)  # the slab and one row of context each side
                yield x0, x1, first(as_tensor(skip[:, a:b]), as_tensor(low[:, a // 2:(b + 1) // 2]), a % 2,
                                    x0 - a, x1 - x0)

        return context_slabs(second, slabs())


def _with_context(conv: tf.keras.layers.Layer, tail: list | None = None):
    """A 3×3×3 conv (bias and activation included) on a slab joined with its context rows, cut back to
    the slab's rows, then the per-voxel layers of ``tail``: the piece that :func:`context_slabs` streams."""
    def fn(before: tf.Tensor, part: tf.Tensor, after: tf.Tensor) -> tf.Tensor:
        start = tf.shape(before)[1]
        x = conv(tf.concat([before, part, after], axis=1))[:, start:start + tf.shape(part)[1]]
        for lay in tail or []:
            x = lay(x, training=False) if isinstance(lay, KL.BatchNormalization) else lay(x)
        return tf.identity(x)
    return fn


def _merged_conv(up: tf.keras.layers.Layer, merge: tf.keras.layers.Layer, conv: tf.keras.layers.Layer):
    """The decoder's first conv on a window of the skip and of the coarser output (upsampled, then cut
    to the window, ``off`` = the window's start is odd), cut back to rows ``[lo, lo + n)``."""
    def fn(skip: tf.Tensor, low: tf.Tensor, off: tf.Tensor, lo: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
        upsampled = _upsample(low, up.size)[:, off:off + tf.shape(skip)[1]]
        return tf.identity(conv(merge([skip, upsampled]))[:, lo:lo + n])
    return fn


def _upsample(x: tf.Tensor, size: tuple[int, int, int]) -> tf.Tensor:
    """Nearest-neighbour upsampling of (1, X, Y, Z, C): the values of Keras' ``UpSampling3D``, in two
    broadcast copies instead of its three tile-and-reshape passes (3x faster on a full-resolution slab)."""
    s = tf.shape(x)
    y = tf.reshape(x, [s[1] * s[2], s[3], 1, s[4]])  # repeat along Z: each voxel's channels
    y = tf.broadcast_to(y, [s[1] * s[2], s[3], size[2], s[4]])
    y = tf.reshape(y, [s[1], 1, s[2], 1, s[3] * size[2] * s[4]])  # then along X and Y: whole Z-lines
    y = tf.broadcast_to(y, [s[1], size[0], s[2], size[1], s[3] * size[2] * s[4]])
    return tf.reshape(y, [1, s[1] * size[0], s[2] * size[1], s[3] * size[2], s[4]])


def _array_slabs(volume: np.ndarray, slab: int) -> Iterator[Slab]:
    for x0 in range(0, volume.shape[1], slab):
        yield x0, min(volume.shape[1], x0 + slab), as_tensor(volume[:, x0:x0 + slab])


def assemble(slabs: Iterator[Slab], size: int) -> np.ndarray:
    """A volume of ``size`` rows from its consecutive slabs (written into a new, writable, aligned array)."""
    out = None
    for x0, x1, part in slabs:
        part = np.asarray(part)
        if out is None:
            out = aligned_empty((1, size) + part.shape[2:], part.dtype)
        copy_into(out[:, x0:x1], part)
    return out


def context_slabs(fn, slabs: Iterator[Slab]) -> Iterator[Slab]:
    """``fn(before, part, after)`` on a volume that arrives as consecutive slabs along axis 1, one slab
    behind the input: ``before`` is the last row of the previous slab, ``after`` the first row of the next
    (empty at the volume's ends, where the op's own zero padding applies, as on the whole volume).

    For any op that needs one row of context (a 3×3×3 convolution), this gives the bits of running it
    on the whole volume while holding two slabs of its input at a time.
    """
    before = pending = None
    for x0, x1, part in slabs:
        if pending is not None:
            yield pending[0], pending[1], fn(context_rows(before, pending[2]), pending[2], part[:, :1])
            before = pending[2][:, -1:]
        pending = (x0, x1, part)
    if pending is not None:
        last = pending[2]
        yield pending[0], pending[1], fn(context_rows(before, last), last, context_rows(None, last))


def context_rows(rows: np.ndarray | tf.Tensor | None, like: np.ndarray | tf.Tensor) -> np.ndarray | tf.Tensor:
    """``rows``, or no rows at all (a (1, 0, ...) array shaped and typed like ``like``)."""
    if rows is not None:
        return rows
    if isinstance(like, np.ndarray):
        return np.zeros((1, 0) + like.shape[2:], dtype=like.dtype)
    return tf.zeros((1, 0) + tuple(like.shape[2:]), dtype=like.dtype)


def weighted_layers(model: tf.keras.Model) -> dict[str, tf.keras.layers.Layer]:
    """All layers holding weights, by name, looking inside nested models."""
    found: dict[str, tf.keras.layers.Layer] = {}
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.update(weighted_layers(layer))
        elif layer.weights:
            found[layer.name] = layer
    return found
