"""The U-Net builder, model files with their cards, and intensity normalisation."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="building and saving networks needs Keras: pip install kneeboneseg[train]")

from KneeBoneSegLib.errors import ModelError
from KneeBoneSegLib.network.export import export_onnx
from KneeBoneSegLib.network.models import ModelCard, card_path, load_model, save_model
from KneeBoneSegLib.network.unet import build_unet
from KneeBoneSegLib.preprocess.normalization import normalize_intensities


def _layers_of(model, kind):
    return [layer for layer in model.layers if isinstance(layer, kind)]


def test_paper_unet_has_the_papers_filters_pooling_and_output():
    model = build_unet(patch_size=64, base_filters=64, depth=4)
    convs = [layer.filters for layer in _layers_of(model, keras.layers.Conv3D) if layer.kernel_size == (3, 3, 3)]
    # Two convolutions per block: down 64-128-256-512, bridge 1024, up 512-256-128-64.
    assert convs == [64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024, 512, 512, 256, 256, 128, 128, 64, 64]
    assert len(_layers_of(model, keras.layers.BatchNormalization)) == len(convs)
    assert [layer.pool_size for layer in _layers_of(model, keras.layers.MaxPooling3D)] == [(2, 2, 2)] * 4
    ups = _layers_of(model, keras.layers.Conv3DTranspose)
    assert [(u.filters, u.kernel_size, u.strides) for u in ups] == [
        (f, (2, 2, 2), (2, 2, 2)) for f in (512, 256, 128, 64)
    ]
    assert len(_layers_of(model, keras.layers.Concatenate)) == 4
    assert model.output_shape == (None, 64, 64, 64, 1)
    assert model.layers[-1].activation.__name__ == "sigmoid"


def test_compact_unet_predicts_probabilities_of_the_patch_shape(rng):
    model = build_unet(patch_size=16, base_filters=4, depth=2)
    out = keras.ops.convert_to_numpy(model(rng.random((2, 16, 16, 16, 1), dtype=np.float32), training=False))
    assert out.shape == (2, 16, 16, 16, 1)
    assert np.all((out > 0) & (out < 1))


def test_a_unet_without_a_patch_size_runs_whole_volumes_and_slices(rng):
    patch = build_unet(patch_size=16, base_filters=4, depth=2, normalization="instance")
    whole = build_unet(patch_size=None, base_filters=4, depth=2, normalization="instance")
    whole.set_weights(patch.get_weights())
    cube = rng.random((1, 16, 16, 16, 1), dtype=np.float32)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(whole(cube)), keras.ops.convert_to_numpy(patch(cube)), atol=1e-6
    )
    assert keras.ops.convert_to_numpy(whole(rng.random((1, 12, 20, 32, 1), dtype=np.float32))).shape == (
        1,
        12,
        20,
        32,
        1,
    )
    slices = build_unet(patch_size=None, base_filters=4, depth=2, dimensions=2)
    assert _layers_of(slices, keras.layers.Conv2D) and not _layers_of(slices, keras.layers.Conv3D)
    assert keras.ops.convert_to_numpy(slices(rng.random((3, 20, 32, 1), dtype=np.float32))).shape == (3, 20, 32, 1)


def test_patch_size_must_fit_the_depth():
    with pytest.raises(ValueError, match="divisible"):
        build_unet(patch_size=20, base_filters=4, depth=3)


def test_model_and_card_round_trip(tmp_path, rng):
    network = build_unet(patch_size=16, base_filters=2, depth=2)
    card = ModelCard(
        name="tiny", architecture={"base_filters": 2, "depth": 2}, patch_size=16, stride=8, spacing_mm=[0.7, 0.7, 0.7]
    )
    path = save_model(network, card, tmp_path / "tiny.keras")
    loaded = load_model(path)
    assert loaded.card == card
    assert json.loads(card_path(path).read_text())["stride"] == 8
    batch = rng.random((1, 16, 16, 16, 1), dtype=np.float32)
    np.testing.assert_allclose(
        loaded.network.predict_on_batch(batch),
        keras.ops.convert_to_numpy(network(batch, training=False)),
        rtol=1e-6,
    )


def test_bare_keras_file_like_the_papers_notebook_loads_with_card_settings(tmp_path, rng):
    # The notebook saves a plain functional U-Net (its own layer names, biases, no card)
    # and feeds it 8-bit images divided by 255.
    inputs = keras.Input((32, 32, 32, 1))
    x = keras.layers.Conv3D(4, 3, padding="same", activation="relu")(inputs)
    skip = x
    x = keras.layers.MaxPooling3D(2)(x)
    x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.UpSampling3D(2)(x)
    x = keras.layers.Concatenate()([x, skip])
    outputs = keras.layers.Conv3D(1, 1, activation="sigmoid")(x)
    path = tmp_path / "notebook_unet.keras"
    keras.Model(inputs, outputs).save(path)

    loaded = load_model(path)
    assert (loaded.card.patch_size, loaded.card.stride) == (32, 16)
    paper_card = ModelCard(
        patch_size=32, stride=16, normalization={"method": "divide", "to_uint8": True, "divisor": 255}
    )
    loaded = load_model(path, card=paper_card)
    image = normalize_intensities(rng.integers(0, 4096, (32, 32, 32)), loaded.card.normalization)
    out = loaded.network.predict_on_batch(image[None, ..., None].astype(np.float32))
    assert out.shape == (1, 32, 32, 32, 1)

    # `kneeboneseg export` turns such a file into one that segments without Keras.
    record = export_onnx(path)
    exported = load_model(path.with_suffix(".onnx"), engine="onnxruntime")
    assert record["max_abs_difference"] <= 1e-4 and exported.network.describe()["engine"] == "onnxruntime"
    np.testing.assert_allclose(
        exported.network.predict_on_batch(image[None, ..., None].astype(np.float32)), out, atol=1e-4
    )


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "absent.keras")


def test_corrupt_model_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="garbage.keras.*not a Keras"):
        load_model(garbage)
    broken_zip = tmp_path / "broken.keras"
    with zipfile.ZipFile(broken_zip, "w") as archive:
        archive.writestr("config.json", "{ this is not json")
    with pytest.raises(ModelError, match="broken.keras.*could not be loaded"):
        load_model(broken_zip)


def test_model_of_the_wrong_shape_is_refused(tmp_path):
    inputs = keras.Input((32, 32, 2))
    path = tmp_path / "two_d.keras"
    keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs)).save(path)
    with pytest.raises(ModelError, match="two_d.keras.*expected a 3D network"):
        load_model(path)


def test_card_that_disagrees_with_the_network_is_refused(tmp_path):
    path = save_model(build_unet(16, 2, 2), ModelCard(patch_size=16), tmp_path / "m.keras")
    with pytest.raises(ModelError, match="card says 32"):
        load_model(path, card=ModelCard(patch_size=32))


def test_percentile_normalisation_is_robust_to_hot_voxels(rng):
    volume = rng.normal(1000, 100, (30, 30, 30))
    volume[0, 0, :5] = 1e6  # a few hot voxels must not squash the range
    out = normalize_intensities(volume)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert 0.4 < float(np.median(out)) < 0.6


def test_divide_to_uint8_reproduces_8bit_images_divided_by_255():
    volume = np.array([[[0, 1000, 4095]]], dtype=np.uint16)
    out = normalize_intensities(volume, {"method": "divide", "to_uint8": True, "divisor": 255})
    np.testing.assert_allclose(out, np.array([[[0, round(1000 / 4095 * 255), 255]]]) / 255.0, rtol=1e-6)


def test_constant_volume_normalises_to_zeros_not_nan():
    assert not np.any(normalize_intensities(np.full((4, 4, 4), 7.0)))


def test_unknown_normalisation_method_is_refused():
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize_intensities(np.zeros((2, 2, 2)), {"method": "zscore-ish"})
