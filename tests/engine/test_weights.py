"""HDF5 weight files: both Keras layouts, clear errors, and the search order."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import tensorflow as tf

from synthseg_native.engine import architecture as arch
from synthseg_native.engine.backends.tf import network
from synthseg_native.engine.backends.tf.backend import assign
from synthseg_native.engine.weights import checked, find_weights, is_test_weights, locate, read_weights, write_weights
from synthseg_native.errors import WeightsError

TINY = arch.UNet("unet", 1, 4, n_features=2, n_levels=2)
SHAPES = arch.weight_shapes(TINY)


def tiny_model() -> tf.keras.Model:
    inp = tf.keras.layers.Input(shape=[None, None, None, 1])
    return tf.keras.Model(inp, network.unet(inp, TINY))


def test_architecture_describes_the_keras_layers():
    """The framework-free description (names and shapes) is what the TF backend builds."""
    model = tiny_model()
    built = {name: {w.name.split("/")[-1].split(":")[0]: tuple(w.shape) for w in layer.weights}
             for name, layer in network.weighted_layers(model).items()}
    assert built == SHAPES


def arrays_of(model, rng) -> dict:
    return {name: {w.name.split("/")[-1].split(":")[0]: rng.normal(size=w.shape).astype(np.float32)
                   for w in layer.weights}
            for name, layer in network.weighted_layers(model).items()}


@pytest.mark.parametrize("layout", ["model", "weights"])
def test_round_trip_both_layouts(tmp_path, layout):
    model = tiny_model()
    arrays = arrays_of(model, np.random.RandomState(0))
    path = tmp_path / "w.h5"
    write_weights(path, arrays, layout=layout)
    with h5py.File(path) as f:
        assert ("model_weights" in f) is (layout == "model")
    loaded = read_weights(path)
    assert loaded.keys() == arrays.keys()
    assert assign(model, loaded) == len(arrays)
    for name, layer in network.weighted_layers(model).items():
        for w in layer.weights:
            kind = w.name.split("/")[-1].split(":")[0]
            np.testing.assert_array_equal(w.numpy(), arrays[name][kind])


def test_generated_test_weights_are_marked(tmp_path):
    """Runs and benchmarks name random test weights as such wherever the files were copied to."""
    model = tiny_model()
    arrays = arrays_of(model, np.random.RandomState(0))
    write_weights(tmp_path / "official-like.h5", arrays)
    write_weights(tmp_path / "test.h5", arrays, test_seed=7)
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    assert not is_test_weights(tmp_path / "official-like.h5")
    assert is_test_weights(tmp_path / "test.h5")
    assert not is_test_weights(tmp_path / "broken.h5")
    assert read_weights(tmp_path / "test.h5").keys() == arrays.keys()  # the marker changes nothing else


def test_keras_reads_our_files_like_official_ones(tmp_path):
    """Upstream loads with Keras' by-name loader: our layout must satisfy it too."""
    model = tiny_model()
    arrays = arrays_of(model, np.random.RandomState(1))
    path = tmp_path / "w.h5"
    write_weights(path, arrays)
    other = tiny_model()
    other.load_weights(str(path), by_name=True)
    bn = other.get_layer("unet_bn_down_0")
    np.testing.assert_array_equal(bn.moving_variance.numpy(), arrays["unet_bn_down_0"]["moving_variance"])


def test_missing_layer_is_named(tmp_path):
    model = tiny_model()
    arrays = arrays_of(model, np.random.RandomState(0))
    del arrays["unet_conv_uparm_2_1"]
    write_weights(tmp_path / "w.h5", arrays)
    with pytest.raises(WeightsError, match="unet_conv_uparm_2_1.*missing"):
        checked(read_weights(tmp_path / "w.h5"), SHAPES, tmp_path / "w.h5")


def test_wrong_shape_is_named(tmp_path):
    model = tiny_model()
    arrays = arrays_of(model, np.random.RandomState(0))
    arrays["unet_likelihood"]["kernel"] = np.zeros((1, 1, 1, 2, 7), np.float32)
    write_weights(tmp_path / "w.h5", arrays)
    with pytest.raises(WeightsError, match=r"unet_likelihood.*\(1, 1, 1, 2, 7\).*\(1, 1, 1, 2, 4\)"):
        checked(read_weights(tmp_path / "w.h5"), SHAPES, tmp_path / "w.h5")


def test_corrupt_file(tmp_path):
    bad = tmp_path / "synthseg_2.0.h5"
    bad.write_bytes(b"\x89HDF\r\n garbage")
    with pytest.raises(WeightsError, match="not a readable HDF5"):
        read_weights(bad)


def test_search_order(tmp_path, monkeypatch):
    for d in ("cli", "env", "fs/models"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "synthseg_2.0.h5").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYNTHSEG_MODELS", str(tmp_path / "env"))
    monkeypatch.setenv("FREESURFER_HOME", str(tmp_path / "fs"))
    assert find_weights("synthseg_2.0.h5", str(tmp_path / "cli")) == tmp_path / "cli" / "synthseg_2.0.h5"
    assert find_weights("synthseg_2.0.h5") == tmp_path / "env" / "synthseg_2.0.h5"
    monkeypatch.delenv("SYNTHSEG_MODELS")
    assert find_weights("synthseg_2.0.h5") == tmp_path / "fs" / "models" / "synthseg_2.0.h5"
    with pytest.raises(WeightsError, match="FREESURFER_HOME/models.*Official weights"):
        find_weights("synthseg_qc_2.0.h5")


def test_explicit_models_folder_is_the_only_place(tmp_path, monkeypatch):
    """A typo in --models (or a folder without the file) is an error naming that folder, never a quiet fallback to
    $SYNTHSEG_MODELS or ./models, which hold other weights."""
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "synthseg_2.0.h5").write_bytes(b"")
    (tmp_path / "cli").mkdir()
    monkeypatch.setenv("SYNTHSEG_MODELS", str(tmp_path / "env"))
    with pytest.raises(WeightsError, match=r"--models .*/clj: no such folder"):
        find_weights("synthseg_2.0.h5", str(tmp_path / "clj"))
    with pytest.raises(WeightsError, match=r"synthseg_2.0.h5 not found in the --models folder .*/cli \(the only"):
        find_weights("synthseg_2.0.h5", str(tmp_path / "cli"))
    assert locate("synthseg_2.0.h5") == (tmp_path / "env" / "synthseg_2.0.h5", "$SYNTHSEG_MODELS")
