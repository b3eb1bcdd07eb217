"""The BatchNorm patch must remove FusedBatchNormV3 from 5-D graphs without changing the numbers
beyond float rounding, and must be undoable; the NumPy shim must only ever add what is missing."""

from __future__ import annotations

import numpy as np
import pytest

from synthseg_native.engine.backends.tf import patches

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

SHAPE = (2, 6, 7, 5, 4)  # batch, 3 spatial axes, channels: a 5-D input as in SynthSeg's U-Net


@pytest.fixture(autouse=True)
def _no_patch_left_behind():
    patches.remove_bn_patch()
    yield
    patches.remove_bn_patch()


def _bn_model(fused: bool | None = None) -> tuple[keras.Model, keras.layers.BatchNormalization]:
    """A BN in inference mode with non-trivial statistics, so a wrong formula would show."""
    inp = keras.Input(SHAPE[1:])
    layer = keras.layers.BatchNormalization(axis=-1, fused=fused)
    model = keras.Model(inp, layer(inp))
    rng = np.random.default_rng(0)
    n = SHAPE[-1]
    gamma, beta = rng.uniform(0.5, 2.0, n), rng.normal(0.0, 1.0, n)
    mean, var = rng.normal(0.3, 0.5, n), rng.uniform(0.1, 3.0, n)
    layer.set_weights([w.astype("float32") for w in (gamma, beta, mean, var)])
    return model, layer


def _trace(model: keras.Model):
    """A fresh tf.function each time, so each trace sees the patch state of the moment."""
    return tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec(SHAPE, tf.float32))


def _input() -> np.ndarray:
    return np.random.default_rng(1).normal(0.0, 2.0, SHAPE).astype("float32")


def test_unpatched_5d_batchnorm_is_fused():
    model, layer = _bn_model()
    assert "FusedBatchNormV3" in patches.graph_op_types(_trace(model))
    assert layer.fused is True


def test_patch_removes_fused_op_and_matches_fused_output():
    fused_model, _ = _bn_model()
    x = _input()
    expected = _trace(fused_model)(tf.constant(x)).numpy()
    with patches.unfused_batchnorm():
        model, layer = _bn_model()
        concrete = _trace(model)
    types = patches.graph_op_types(concrete)
    assert "FusedBatchNormV3" not in types
    assert {"Rsqrt", "Mul"} <= types
    assert layer.fused is False
    np.testing.assert_allclose(concrete(tf.constant(x)).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_model_built_under_patch_stays_unfused_when_traced_later():
    with patches.unfused_batchnorm():
        model, _ = _bn_model()
    assert not patches.bn_patch_active()
    assert "FusedBatchNormV3" not in patches.graph_op_types(_trace(model))


def test_layers_built_before_patch_are_unfused_when_traced_under_it():
    model, layer = _bn_model()
    assert layer.fused is True
    patches.apply_bn_patch()
    assert "FusedBatchNormV3" not in patches.graph_op_types(_trace(model))
    explicit, _ = _bn_model(fused=True)
    assert "FusedBatchNormV3" not in patches.graph_op_types(_trace(explicit))


def test_predict_path_is_unfused():
    """Model.predict traces its own function; the op must be gone there too."""
    with patches.unfused_batchnorm():
        model, _ = _bn_model()
    model.predict(_input(), verbose=0)
    assert "FusedBatchNormV3" not in patches.graph_op_types(model.predict_function.get_concrete_function(
        iter([tf.constant(_input())])))


def test_nested_function_ops_are_collected():
    inner = tf.function(lambda x: tf.math.rsqrt(x) * 2.0)
    outer = tf.function(lambda x: inner(x) + 1.0).get_concrete_function(tf.TensorSpec([3], tf.float32))
    types = patches.graph_op_types(outer)
    assert "Rsqrt" in types
    assert {op.type for op in outer.graph.get_operations()} & {"PartitionedCall", "StatefulPartitionedCall"}


def test_apply_is_idempotent_and_logs_once(capsys):
    assert patches.apply_bn_patch() is True
    assert patches.apply_bn_patch() is False
    out = capsys.readouterr().out
    assert out.count("[INFO] BatchNorm patch applied") == 1
    assert patches.bn_patch_active()


def test_remove_restores_fused_behaviour():
    from keras.src.layers.normalization.batch_normalization import BatchNormalizationBase as base

    originals = {name: base.__dict__[name] for name in ("_fused_can_be_used", "call")}
    patches.apply_bn_patch()
    assert patches.remove_bn_patch() is True
    assert patches.remove_bn_patch() is False
    assert not patches.bn_patch_active()
    assert {name: base.__dict__[name] for name in originals} == originals
    model, _ = _bn_model()
    assert "FusedBatchNormV3" in patches.graph_op_types(_trace(model))


def test_context_manager_keeps_an_outer_patch():
    patches.apply_bn_patch()
    with patches.unfused_batchnorm():
        pass
    assert patches.bn_patch_active()


def test_numpy_shim_adds_and_removes_only_missing_aliases():
    assert not hasattr(np, "int")  # NumPy 1.24+ removed it; the shim exists because of that
    added = patches.apply_numpy_alias_shim()
    try:
        assert {"int", "float", "object", "str"} <= set(added)
        assert np.int is int and np.float is float
        assert patches.apply_numpy_alias_shim() == []
        assert np.zeros(2, dtype=np.int).dtype.kind == "i"
    finally:
        removed = patches.remove_numpy_alias_shim()
    assert sorted(removed) == sorted(added)
    assert not hasattr(np, "int") and not hasattr(np, "float")
    assert hasattr(np, "float64")
