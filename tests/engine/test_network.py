"""Network graph: BatchNorm form, upstream layer names, and the Gaussian blur kernel."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from synthseg_native.engine import architecture as arch
from synthseg_native.engine import labels as L
from synthseg_native.engine.backends.tf import blur, network
from synthseg_native.engine.backends.tf.backend import TFBackend
from synthseg_native.engine.backends.tf.patches import graph_op_types, unfused_batchnorm
from synthseg_native.engine.runtime import Runtime

UNET33 = arch.UNet("unet", 1, 33)


def traced_ops(model) -> list[str]:
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, 32, 32, 32, 1], tf.float32))
    return sorted(graph_op_types(concrete))


def op_counts(model) -> dict[str, int]:
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, 32, 32, 32, 1], tf.float32))
    counts: dict[str, int] = {}
    for fdef in [concrete.graph.as_graph_def()]:
        nodes = list(fdef.node) + [n for f in fdef.library.function for n in f.node_def]
        for n in nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
    return counts


def random_arrays(net: arch.Network, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Weights of the right shapes (positive variances), as engine.weights.checked returns them."""
    rng = np.random.RandomState(seed)
    return {layer: {kind: (np.abs(rng.normal(1, 0.1, shape)) if kind == "moving_variance"
                           else rng.normal(0, 0.1, shape)).astype(np.float32) for kind, shape in kinds.items()}
            for layer, kinds in arch.weight_shapes(net).items()}


def built_op_types(built, channels: int) -> set[str]:
    """The op types of every graph a built network runs: each piece of a staged U-Net, or the whole Keras model."""
    if isinstance(built, network.StagedUNet):
        ops: set[str] = set()
        for piece in built.pieces:
            ops |= graph_op_types(piece.fn.get_concrete_function())
        return ops
    fn = tf.function(lambda x: built(x, training=False))
    return graph_op_types(fn.get_concrete_function(tf.TensorSpec([1, 32, 32, 32, channels], tf.float32)))


@pytest.mark.parametrize("bn, fused", [("unfused", False), ("fused", True)])
def test_every_network_is_built_in_the_batchnorm_form_asked_for(bn, fused):
    """tensorflow-metal cannot run a 5-D FusedBatchNormV3: with bn="unfused" no graph of any network (segmentation,
    robust cascade, parcellation, QC) may hold one. Before the networks were built in one place, the parcellation
    and QC networks kept the fused form."""
    backend = TFBackend(Runtime(threads=2, device="CPU", precision="fp32"), bn)
    for key in ("seg2", "robust", "parc", "qc"):
        net = arch.network(key, L.LabelSet.build(False))
        built = backend.build(net, random_arrays(net))
        channels = net.n_groups if isinstance(net, arch.QC) else 1
        ops = built_op_types(built, channels)
        assert ("FusedBatchNormV3" in ops) == fused, (key, sorted(ops))
        assert fused or "Rsqrt" in ops, key


def test_fused_model_uses_fused_batchnorm():
    counts = op_counts(network.unet_model(UNET33))
    assert counts.get("FusedBatchNormV3") == 9  # one per level: 5 encoder + 4 decoder
    assert counts.get("Conv3D") == 19  # 2 per level (18) + the 1x1x1 likelihood
    assert counts.get("MaxPool3D") == 4


def test_unfused_model_has_no_fused_batchnorm():
    with unfused_batchnorm():
        model = network.unet_model(UNET33)
    ops = traced_ops(model)
    assert "FusedBatchNormV3" not in ops and "Rsqrt" in ops
    fused = network.unet_model(UNET33)
    fused.set_weights(model.get_weights())
    x = np.random.RandomState(0).rand(1, 32, 32, 32, 1).astype(np.float32)
    np.testing.assert_allclose(model(x).numpy(), fused(x).numpy(), atol=1e-5)


@pytest.mark.skipif(not os.environ.get("SYNTHSEG_HOME"), reason="needs an upstream checkout in SYNTHSEG_HOME")
def test_fused_graph_matches_upstream_keras_model():
    """Same op sequence as upstream's own U-Net (run locally with SYNTHSEG_HOME set)."""
    import sys

    from synthseg_native.engine.backends.tf.patches import apply_numpy_alias_shim

    apply_numpy_alias_shim()
    sys.path.insert(0, os.environ["SYNTHSEG_HOME"])
    from ext.neuron import models as nrn

    theirs = nrn.unet(input_shape=[None, None, None, 1], nb_labels=33, nb_levels=5, nb_conv_per_level=2,
                      conv_size=3, nb_features=24, feat_mult=2, activation="elu", batch_norm=-1, name="unet")
    assert op_sequence(network.unet_model(UNET33)) == op_sequence(theirs)


def op_sequence(model) -> list[str]:
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, 32, 32, 32, 1], tf.float32))
    graph = concrete.graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return [n.op for n in nodes if n.op not in ("Placeholder", "Identity", "NoOp", "ReadVariableOp")]


def test_channel_blur_matches_in_graph_blur():
    """Per-channel blur outside the graph equals upstream-style concat of per-channel convs."""
    post = np.random.RandomState(2).rand(1, 37, 16, 14, 5).astype(np.float32)
    kernel = blur.blur_kernel(0.5)
    ref = tf.concat([tf.nn.conv3d(tf.expand_dims(post[..., n], -1), kernel, [1] * 5, "SAME")
                     for n in range(5)], -1).numpy()
    for slab in (1, 2, 7, 16, 37, 64):  # in place, slab by slab: each slab must see its unblurred neighbours
        out = blur.ChannelBlur(0.5, slab=slab)(post.copy())
        np.testing.assert_array_equal(out, ref)


def test_average_flipped_swaps_channels():
    a = np.zeros((1, 4, 2, 2, 3), np.float32)
    b = np.zeros_like(a)
    b[0, 0, ..., 1] = 1.0  # channel 1 at the first x of the flipped prediction
    out = blur.average_flipped(a, b, np.array([0, 2, 1]))
    assert out[0, 3, 0, 0, 2] == 0.5 and out.sum() == 0.5 * 4


def test_layer_names_follow_upstream():
    model = network.unet_model(UNET33)
    names = set(network.weighted_layers(model))
    expected = {f"unet_conv_downarm_{lvl}_{c}" for lvl in range(5) for c in range(2)}
    expected |= {f"unet_conv_uparm_{5 + lvl}_{c}" for lvl in range(4) for c in range(2)}
    expected |= {f"unet_bn_down_{lvl}" for lvl in range(5)} | {f"unet_bn_up_{lvl}" for lvl in range(4)}
    expected |= {"unet_likelihood"}
    assert names == expected


def test_robust_model_stages():
    model = network.robust_model(arch.Robust(33, 5))
    names = set(network.weighted_layers(model))
    assert {"unet_likelihood", "l2l_likelihood", "unet2_likelihood"} <= names
    l2l = model.get_layer("l2l_conv_downarm_0_0")
    assert l2l.kernel.shape == (5, 5, 5, 5, 16)
    assert model.get_layer("unet2_conv_downarm_0_0").kernel.shape == (3, 3, 3, 6, 24)
    # upstream's skip_n_concatenations=2 drops the skips of the two *top* (full and 1/2 resolution)
    # decoder levels; the deeper ones keep theirs
    names = [lyr.name for lyr in model.layers]
    assert "l2l_merge_5" in names and "l2l_merge_6" in names
    assert "l2l_merge_7" not in names and "l2l_merge_8" not in names


def test_blur_kernel_is_normalised_gaussian():
    k = blur.blur_kernel(0.5).numpy()[..., 0, 0]
    assert k.shape == (3, 3, 3)
    assert abs(k.sum() - 1) < 1e-6 and k[1, 1, 1] == k.max()
    ratio = k[1, 1, 0] / k[1, 1, 1]
    assert abs(ratio - np.exp(-2.0)) < 1e-6


def test_staged_unet_is_bit_identical_to_one_predict(tmp_path):
    """Stem / core / head-in-slabs gives the same bits as running the whole Keras model at once."""
    rng = np.random.RandomState(3)
    model = network.unet_model(arch.UNet("unet", 1, 5))
    for layer in network.weighted_layers(model).values():
        layer.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in layer.get_weights()][:2]
                          + [np.abs(rng.normal(1, 0.1, w.shape)).astype(np.float32) for w in layer.get_weights()[2:]])
    x = rng.rand(1, 80, 32, 32, 1).astype(np.float32)
    whole = model.predict(x, verbose=0)
    for fine_levels, slab in ((1, 32), (2, 32), (2, 2), (2, 6), (2, 128)):  # 80 rows: full, partial, one slab
        staged = network.StagedUNet(model, slab=slab, fine_levels=fine_levels)
        np.testing.assert_array_equal(staged.predict(x), whole)
    with pytest.raises(ValueError, match="even"):
        network.StagedUNet(model, slab=15)
    parts = list(network.StagedUNet(model, slab=16).predict_slabs(x))
    assert [(x0, x1) for x0, x1, _ in parts] == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 80)]
    np.testing.assert_array_equal(np.concatenate([p for _, _, p in parts], axis=1), whole)


def _slabs_of(volume: np.ndarray, slab: int):
    for x0 in range(0, volume.shape[1], slab):
        yield x0, min(volume.shape[1], x0 + slab), volume[:, x0:x0 + slab].copy()


def test_blur_and_flip_average_in_slabs_equal_whole_volume():
    """The flipped pass is blurred and averaged slab by slab; it must give the whole-volume bits."""
    rng = np.random.RandomState(4)
    post = rng.rand(1, 37, 12, 10, 4).astype(np.float32)
    flipped = rng.rand(1, 37, 12, 10, 4).astype(np.float32)
    smooth = blur.ChannelBlur(0.5)
    flip = np.array([0, 2, 1, 3])
    whole = blur.average_flipped(smooth(post.copy()), smooth(flipped.copy()), flip)
    for slab in (1, 5, 16, 37, 64):
        blurred = list(blur.blurred_slabs(_slabs_of(flipped, slab), smooth))
        np.testing.assert_array_equal(np.concatenate([p for _, _, p in blurred], axis=1), smooth(flipped.copy()))
        got = blur.blur_average_flipped(smooth(post.copy()), _slabs_of(flipped, slab), smooth, flip)
        np.testing.assert_array_equal(got, whole)
    assert smooth.flipped_average((0, 2, 1, 3)) is smooth.flipped_average((0, 2, 1, 3))  # traced once, not per image


@pytest.mark.parametrize("key", ["seg2", "seg1", "robust", "parc", "qc"])
def test_architecture_is_what_the_tf_backend_builds(key):
    """Names and shapes of every weighted layer, and the FLOPs the engine reports (--profile, make bench) equal to the
    Conv3D arithmetic of the traced Keras graph (2 per multiply-add, 1 per bias value)."""
    net = arch.network(key, L.LabelSet.build(key == "seg1"))
    model = network.keras_model(net)
    built = {name: {w.name.split("/")[-1].split(":")[0]: tuple(w.shape) for w in layer.weights}
             for name, layer in network.weighted_layers(model).items()}
    assert built == arch.weight_shapes(net)
    if key == "qc":
        return  # not counted by the engine
    channels = 3 if key == "parc" else 1
    fn = tf.function(lambda x: model(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec([1, 32, 32, 64, channels], tf.float32)).graph
    traced = 0
    for op in graph.get_operations():
        if op.type == "Conv3D":
            kernel, out = op.inputs[1].shape.as_list(), op.outputs[0].shape.as_list()
            traced += int(np.prod(out[:-1])) * arch.per_voxel_flop(kernel[-2], kernel[-1], kernel[0])
    assert traced == arch.conv_flops(net, (32, 32, 64))
