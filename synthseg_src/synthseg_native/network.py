"""The SynthSeg networks as tf.keras models whose layer names match the official weight files.

Layers and their configuration follow upstream's ``ext/neuron/models.py`` (U-Net, encoder) and the
inference graph of ``predict_synthseg.build_model`` (blur, flip, argmax/one-hot transitions), so
that TensorFlow executes the same kernels in the same order and produces the same bits.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow as tf

KL = tf.keras.layers


def unet(inputs: tf.Tensor, prefix: str, n_labels: int, conv_size: int = 3, n_features: int = 24,
         n_levels: int = 5, skip_n: int = 0, activation: str = "elu") -> tf.Tensor:
    """Encoder/decoder with BatchNorm at the end of each level and softmax output ``{prefix}_prediction``.

    Skip connections take the last convolution of each encoder level *before* its BatchNorm;
    ``skip_n`` removes them at the deepest levels (the robust model's "l2l" network).
    """
    x = inputs
    skips: list[tf.Tensor] = []
    for level in range(n_levels):
        feats = int(np.round(n_features * 2 ** level))
        for conv in range(2):
            x = KL.Conv3D(feats, conv_size, padding="same", activation=activation,
                          data_format="channels_last", dilation_rate=1,
                          name=f"{prefix}_conv_downarm_{level}_{conv}")(x)
        skips.append(x)
        x = KL.BatchNormalization(axis=-1, name=f"{prefix}_bn_down_{level}")(x)
        if level < n_levels - 1:
            x = KL.MaxPooling3D(pool_size=(2, 2, 2), padding="same", name=f"{prefix}_maxpool_{level}")(x)
    for level in range(n_levels - 1):
        feats = int(np.round(n_features * 2 ** (n_levels - 2 - level)))
        x = KL.UpSampling3D(size=(2, 2, 2), name=f"{prefix}_up_{n_levels + level}")(x)
        if level < n_levels - skip_n - 1:
            x = KL.concatenate([skips[n_levels - 2 - level], x], axis=4, name=f"{prefix}_merge_{n_levels + level}")
        for conv in range(2):
            x = KL.Conv3D(feats, conv_size, padding="same", activation=activation, dilation_rate=1,
                          name=f"{prefix}_conv_uparm_{n_levels + level}_{conv}")(x)
        x = KL.BatchNormalization(axis=-1, name=f"{prefix}_bn_up_{level}")(x)
    x = KL.Conv3D(n_labels, 1, activation=None, name=f"{prefix}_likelihood")(x)
    # Under a reduced-precision policy (--precision) the softmax still runs, and returns, in float32.
    mixed = tf.keras.mixed_precision.global_policy().compute_dtype != "float32"
    return KL.Lambda(lambda t: tf.keras.activations.softmax(tf.cast(t, "float32") if mixed else t, axis=4),
                     name=f"{prefix}_prediction", **({"dtype": "float32"} if mixed else {}))(x)


def blur_kernel(sigma: float) -> tf.Tensor:
    """3-D Gaussian kernel built with upstream's exact sequence of float32 TF operations."""
    sig = tf.convert_to_tensor([float(sigma)] * 3, dtype="float32")
    window = np.int32(np.ceil(2.5 * np.array([sigma] * 3)) / 2) * 2 + 1
    mesh = tf.meshgrid(*[tf.range(0, int(w)) for w in window], indexing="ij")
    mesh = [tf.cast(m, "float32") for m in mesh]
    diff = tf.stack([mesh[f] - (window[f] - 1) / 2 for f in range(3)], axis=-1)
    for _ in range(3):
        sig = tf.expand_dims(sig, axis=0)
    is_zero = tf.equal(sig, 0)
    exp_term = -tf.square(diff) / (2 * tf.where(is_zero, tf.ones_like(sig), sig) ** 2)
    norms = exp_term - tf.math.log(tf.where(is_zero, tf.ones_like(sig), np.sqrt(2 * np.pi) * sig))
    kernel = tf.exp(tf.reduce_sum(norms, -1))
    kernel /= tf.reduce_sum(kernel)
    return tf.expand_dims(tf.expand_dims(kernel, -1), -1)


def _one_hot_of_argmax(x: tf.Tensor, depth: int, name: str) -> tf.Tensor:
    """Hard decision between cascaded networks, as they were trained."""
    x = KL.Lambda(lambda t: tf.argmax(t, axis=-1), name=f"{name}_argmax")(x)
    return KL.Lambda(lambda t: tf.one_hot(tf.cast(t, "int32"), depth=depth, axis=-1), name=f"{name}_onehot")(x)


def unet_model(n_labels: int, n_channels: int = 1) -> tf.keras.Model:
    """The plain segmentation U-Net (SynthSeg 1.0/2.0): image → softmax posteriors."""
    image = KL.Input(shape=[None, None, None, n_channels], name="unet_input")
    return tf.keras.Model(image, unet(image, "unet", n_labels), name="synthseg_unet")


def robust_model(n_labels: int, n_groups: int = 5) -> tf.keras.Model:
    """SynthSeg-robust: U-Net to coarse groups → "l2l" denoiser → "unet2" on image + groups."""
    image = KL.Input(shape=[None, None, None, 1], name="unet_input")
    x = unet(image, "unet", n_groups)
    x = _one_hot_of_argmax(x, n_groups, "stage1")
    x = unet(x, "l2l", n_groups, conv_size=5, n_features=16, skip_n=2)
    x = _one_hot_of_argmax(x, n_groups, "stage2")
    if n_groups <= 2:
        x = KL.Lambda(lambda t: t[..., 1:], name="stage2_drop_bg")(x)
    x = KL.Lambda(lambda t: tf.cast(tf.concat(t, axis=-1), "float32"), name="stage2_concat")([image, x])
    return tf.keras.Model(image, unet(x, "unet2", n_labels), name="synthseg_robust")


def parc_model(n_labels: int = 69) -> tf.keras.Model:
    """Cortical parcellation U-Net; input = image + one-hot cortex mask (3 channels)."""
    x = KL.Input(shape=[None, None, None, 3], name="unet_parc_input")
    return tf.keras.Model(x, unet(x, "unet_parc", n_labels), name="synthseg_parc")


def qc_model(n_groups: int = 9, n_levels: int = 4, conv_size: int = 5, n_features: int = 24) -> tf.keras.Model:
    """QC regressor: residual encoder on one-hot structure groups → one score per group.

    Mirrors upstream's ``conv_enc(use_residuals=True)``: the last conv of a level has no
    activation, a 5×5×5 "expand" conv matches the channel count of the shortcut, and the sum goes
    through ReLU and BatchNorm; the final map is averaged over space inside the graph.
    """
    inp = KL.Input(shape=[None, None, None, n_groups], name="qc_input")
    x = inp
    for level in range(n_levels):
        shortcut = x
        feats = int(np.round(n_features * 2 ** level))
        x = KL.Conv3D(feats, conv_size, padding="same", activation="relu", data_format="channels_last",
                      dilation_rate=1, name=f"qc_conv_downarm_{level}_0")(x)
        x = KL.Conv3D(feats, conv_size, padding="same", name=f"qc_conv_downarm_{level}_1")(x)
        n_in, n_out = shortcut.shape[-1], x.shape[-1]
        if n_in > 1 and n_out > 1 and n_in != n_out:
            shortcut = KL.Conv3D(feats, conv_size, padding="same", activation="relu", data_format="channels_last",
                                 dilation_rate=1, name=f"qc_expand_down_merge_{level}")(shortcut)
        x = KL.add([shortcut, x], name=f"qc_res_down_merge_{level}")
        x = KL.Activation("relu", name=f"qc_res_down_merge_act_{level}")(x)
        x = KL.BatchNormalization(axis=-1, name=f"qc_bn_down_{level}")(x)
        if level < n_levels - 1:
            x = KL.MaxPooling3D(pool_size=(2, 2, 2), padding="same", name=f"qc_maxpool_{level}")(x)
    x = KL.MaxPool3D(pool_size=(2, 2, 2), padding="same", name="qc_maxpool_3")(x)
    for k in range(2):
        x = KL.Conv3D(n_groups, kernel_size=conv_size, padding="same", activation="relu",
                      data_format="channels_last", name=f"qc_final_conv_{k}")(x)
    score = KL.Lambda(lambda t: tf.reduce_mean(t, axis=[1, 2, 3]), name="qc_final_pred")(x)
    return tf.keras.Model(inp, score, name="synthseg_qc")


class ArgmaxLabels:
    """TensorFlow's argmax over channels (not numpy's), mapped through a lookup table.

    Upstream takes these hard decisions inside its graph; using the same op guarantees the same
    winner wherever two posteriors tie.
    """

    def __init__(self, lut: np.ndarray):
        table = tf.constant(lut.astype(np.int32))
        self.fn = tf.function(lambda x: tf.gather(table, tf.cast(tf.argmax(x, axis=-1), "int32")),
                              input_signature=[tf.TensorSpec([1, None, None, None, None], tf.float32)])

    def __call__(self, post: np.ndarray) -> np.ndarray:
        return self.fn(post).numpy()


class StagedUNet:
    """Runs a trained :func:`unet` in exact stages so no high-resolution tensor of many channels is held whole.

    For each of the ``fine_levels`` top resolutions, three stages run in slabs along the first axis: stem
    (level input → its last encoder conv, the skip), pool (BatchNorm + max-pool of the skip) and head
    (skip + upsampled coarser output → two convs and BatchNorm; at full resolution also likelihood and
    softmax), with a 2-voxel halo for the two 3×3×3 convs. Only the coarse middle runs on the whole
    volume. Measured bit-identical to one ``predict`` of the whole model. The ``tf.identity`` after each
    stem matters: a conv output that is itself fetched is not fused with its bias and ELU by
    TensorFlow's remapper, and the unfused kernels round differently.

    Why two levels: TensorFlow's oneDNN allocator keeps its high-water mark for the life of the
    process, so the largest single graph sets the floor of the peak memory; with only the top level in
    slabs the half-resolution convs (144 channels after the skip merge) left ~2 GB behind.
    """

    def __init__(self, model: tf.keras.Model, prefix: str = "unet", n_levels: int = 5, slab: int = 16,
                 fine_levels: int = 2):
        self.slab, self.halo, self.fine = slab, 2, fine_levels
        self._fns: dict[tuple, tf.types.experimental.GenericFunction] = {}
        layer = model.get_layer
        cdt = tf.keras.mixed_precision.global_policy().compute_dtype  # float32 unless --precision
        self.stems: list[tf.keras.Model] = []
        self.pools: list[tf.keras.Model] = []
        self.heads: list[tf.keras.Model] = []
        level_in = model.inputs
        for level in range(fine_levels):
            top = layer(f"{prefix}_conv_downarm_{level}_1")
            x = level_in[0]
            for conv in range(2):
                x = layer(f"{prefix}_conv_downarm_{level}_{conv}")(x)
            self.stems.append(tf.keras.Model(level_in, KL.Lambda(tf.identity)(x)))
            skip_in = KL.Input(shape=[None, None, None, top.filters], dtype=cdt)
            pooled = layer(f"{prefix}_maxpool_{level}")(layer(f"{prefix}_bn_down_{level}")(skip_in))
            self.pools.append(tf.keras.Model(skip_in, pooled))
            level_in = [KL.Input(shape=[None, None, None, top.filters], dtype=cdt)]
        x = core_in = level_in[0]
        skips = {}
        for level in range(fine_levels, n_levels):
            for conv in range(2):
                x = layer(f"{prefix}_conv_downarm_{level}_{conv}")(x)
            skips[level] = x
            x = layer(f"{prefix}_bn_down_{level}")(x)
            if level < n_levels - 1:
                x = layer(f"{prefix}_maxpool_{level}")(x)
        for res in range(n_levels - 2, fine_levels - 1, -1):  # decoder levels that stay in the core
            x = self._decoder_level(layer, prefix, n_levels, res, skips[res], x)
        self.core = tf.keras.Model(core_in, x)
        for res in range(fine_levels - 1, -1, -1):
            skip = KL.Input(shape=[None, None, None, layer(f"{prefix}_conv_downarm_{res}_1").filters], dtype=cdt)
            low = KL.Input(shape=[None, None, None, x.shape[-1]], dtype=cdt)
            x = self._decoder_level(layer, prefix, n_levels, res, skip, low)
            if res == 0:
                x = layer(f"{prefix}_prediction")(layer(f"{prefix}_likelihood")(x))
            self.heads.insert(0, tf.keras.Model([skip, low], x))

    @staticmethod
    def _decoder_level(layer, prefix: str, n_levels: int, res: int, skip, low):
        """Upsample, merge with the skip, two convs and BatchNorm: decoder level ``res`` of the U-Net."""
        u = n_levels + (n_levels - 2 - res)
        x = layer(f"{prefix}_merge_{u}")([skip, layer(f"{prefix}_up_{u}")(low)])
        for conv in range(2):
            x = layer(f"{prefix}_conv_uparm_{u}_{conv}")(x)
        return layer(f"{prefix}_bn_up_{n_levels - 2 - res}")(x)

    def predict(self, image: np.ndarray, verbose: int = 0) -> np.ndarray:
        """Same call as ``Model.predict`` so either can serve the runner."""
        out = None
        for x0, x1, part in self.predict_slabs(image):
            if out is None:
                out = np.empty((1, image.shape[1]) + part.shape[2:], dtype=part.dtype)
            out[:, x0:x1] = part
        return out

    def predict_slabs(self, image: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """The network's output as consecutive slabs ``(x0, x1, output[:, x0:x1])`` along axis 1.

        Lets a caller consume the full-resolution output without ever holding all of it.
        """
        skips = []
        x = image
        for level in range(self.fine):
            skips.append(self._slabs(self.stems[level], x, halo=self.halo))
            x = self._slabs(self.pools[level], skips[-1], halo=0, shrink=2)
        low = self._call(self.core, x)
        del x
        for level in range(self.fine - 1, 0, -1):
            low = self._slabs(self.heads[level], skips.pop(), halo=self.halo, coarse=low)
        yield from self._iter_slabs(self.heads[0], skips.pop(), halo=self.halo, coarse=low)

    def _call(self, net: tf.keras.Model, inputs) -> np.ndarray:
        """One inference call through a traced function (no Keras ``predict`` data pipeline per slab).

        Between stages tensors keep the network's compute dtype (bfloat16/float16 under --precision).
        """
        inputs = inputs if isinstance(inputs, list) else [inputs]
        key = (id(net), tuple(str(x.dtype) for x in inputs))
        fn = self._fns.get(key)
        if fn is None:
            specs = [tf.TensorSpec([1, None, None, None, t.shape[-1]], tf.as_dtype(x.dtype))
                     for t, x in zip(net.inputs, inputs)]
            fn = tf.function(lambda *xs: net(list(xs) if len(xs) > 1 else xs[0], training=False),
                             input_signature=specs)
            self._fns[key] = fn
        return fn(*inputs).numpy()

    def _slabs(self, net: tf.keras.Model, fine: np.ndarray, halo: int, shrink: int = 1,
               coarse: np.ndarray | None = None) -> np.ndarray:
        """Apply ``net`` slab by slab along axis 1 of ``fine`` and assemble the result."""
        out = None
        for x0, x1, part in self._iter_slabs(net, fine, halo, shrink, coarse):
            if out is None:
                out = np.empty((1, fine.shape[1] // shrink) + part.shape[2:], dtype=part.dtype)
            out[:, x0:x1] = part
        return out

    def _iter_slabs(self, net: tf.keras.Model, fine: np.ndarray, halo: int, shrink: int = 1,
                    coarse: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """``net`` on slabs of axis 1 of ``fine`` (and of ``coarse``, at half resolution), with a halo.

        Slab starts and halos are even, so a slab of ``coarse`` upsamples onto exactly its fine slab.
        """
        size = fine.shape[1]
        for x0 in range(0, size, self.slab):
            x1 = min(size, x0 + self.slab)
            a, b = max(0, x0 - halo), min(size, x1 + halo)
            inputs = fine[:, a:b] if coarse is None else [fine[:, a:b], coarse[:, a // 2:b // 2]]
            part = self._call(net, inputs)
            yield x0 // shrink, x1 // shrink, part[:, (x0 - a) // shrink:(x1 - a) // shrink]


class ChannelBlur:
    """Gaussian smoothing of posteriors, every channel separately, in place, slab by slab.

    Upstream convolves each channel separately inside its graph. Here each slab of 16 rows (plus a
    one-row overlap) is turned channel-first and all channels go through the very same conv3d as one
    batch: same kernel, same op, same bits as per-channel calls (tested), but contiguous memory. Blurring
    channel by channel on the channel-last volume read and wrote the whole 1.4 GB array once per
    channel (strided access) and cost ~7 s per pass at full size.
    """

    def __init__(self, sigma: float, slab: int = 16):
        kernel = blur_kernel(sigma)
        self.slab = slab
        self.fn = tf.function(
            lambda x: tf.nn.conv3d(x, kernel, [1] * 5, "SAME"),
            input_signature=[tf.TensorSpec([None, None, None, None, 1], tf.float32)])

    def window(self, part: np.ndarray) -> np.ndarray:
        """All channels of ``part`` (1, X, Y, Z, C) blurred, zero padding at its own borders."""
        channels = np.ascontiguousarray(np.moveaxis(part[0], -1, 0)[..., None])
        return np.moveaxis(self.fn(channels).numpy()[..., 0], 0, -1)[None]

    def __call__(self, post: np.ndarray) -> np.ndarray:
        size = post.shape[1]
        slabs = ((x0, min(size, x0 + self.slab), post[:, x0:x0 + self.slab].copy()) for x0 in range(0, size, self.slab))
        for x0, x1, part in blurred_slabs(slabs, self):  # each slab is copied before its neighbour is written
            post[:, x0:x1] = part
        return post


def blurred_slabs(slabs: Iterator[tuple[int, int, np.ndarray]], blur: ChannelBlur
                  ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Blur a volume that arrives as consecutive slabs along axis 1, one slab behind the input.

    The 3×3×3 Gaussian needs one row on each side of a slab, so each slab is blurred together with
    the last row of the slab before and the first row of the slab after; at the volume's ends the
    convolution's own zero padding applies, as on the whole volume. Same bits as blurring it whole.
    """
    before = pending = None
    for x0, x1, part in slabs:
        if pending is not None:
            yield _blur_window(blur, before, pending, part[:, :1])
            before = pending[2][:, -1:]
        pending = (x0, x1, part)
    if pending is not None:
        yield _blur_window(blur, before, pending, None)


def _blur_window(blur: ChannelBlur, before: np.ndarray | None, pending: tuple[int, int, np.ndarray],
                 after: np.ndarray | None) -> tuple[int, int, np.ndarray]:
    x0, x1, part = pending
    window = blur.window(np.concatenate([p for p in (before, part, after) if p is not None], axis=1))
    lo = 0 if before is None else 1
    return x0, x1, window[:, lo:lo + x1 - x0]


def average_flipped_slabs(post: np.ndarray, slabs: Iterator[tuple[int, int, np.ndarray]],
                          flip: np.ndarray) -> np.ndarray:
    """:func:`average_flipped` with the flipped prediction arriving in slabs, so it is never held whole.

    Slab ``[x0, x1)`` of the flipped volume lands on ``[X - x1, X - x0)`` of ``post``, mirrored and with
    its channels swapped; the float32 operations per voxel are those of :func:`average_flipped`.
    """
    size, order = post.shape[1], np.asarray(flip, dtype=np.intp)
    for x0, x1, part in slabs:
        post[:, size - x1:size - x0] += part[:, ::-1][..., order]
    post *= np.float32(0.5)
    return post


def average_flipped(post: np.ndarray, post_flipped: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """0.5 · (P + swap(flip_x(P'))), computed in place in ``post`` channel by channel.

    The flipped prediction's left channels describe the right hemisphere, hence the swap.
    Float32 add then multiply, exactly like upstream's in-graph average.
    """
    back = post_flipped[:, ::-1]
    for c in range(post.shape[-1]):
        post[..., c] += back[..., int(flip[c])]
    post *= np.float32(0.5)
    return post


def weighted_layers(model: tf.keras.Model) -> dict[str, tf.keras.layers.Layer]:
    """All layers holding weights, by name, looking inside nested models."""
    found: dict[str, tf.keras.layers.Layer] = {}
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.update(weighted_layers(layer))
        elif layer.weights:
            found[layer.name] = layer
    return found
