"""Sub-volume tiling, batching and aggregation, and the three projections."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_keras, position_network, position_network_tile

from KneeBoneSegLib.network.inference import padded_shape, predict_slices, predict_volume, tile_corners, tile_weights
from KneeBoneSegLib.network.projections import fuse_probabilities, iter_projections, view_orders
from KneeBoneSegLib.options import AGGREGATIONS
from KneeBoneSegLib.preprocess.normalization import air_level


def identity_network(patch_size: int):
    """A real Keras model whose output is its input (a 1x1x1 linear convolution of weight 1)."""
    keras = needs_keras()

    inputs = keras.Input((patch_size, patch_size, patch_size, 1))
    layer = keras.layers.Conv3D(1, 1, use_bias=False)
    network = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.ones((1, 1, 1, 1, 1), np.float32)])
    return network


@pytest.mark.parametrize("shape,patch,stride", [((40, 33, 20), 16, 8), ((16, 16, 16), 16, 16), ((50, 17, 31), 16, 12)])
def test_tiles_cover_the_padded_volume(shape, patch, stride):
    padded = padded_shape(shape, patch, stride)
    assert all(p >= n and (p - patch) % stride == 0 for p, n in zip(padded, shape))
    assert all(p - n < stride for p, n in zip(padded, shape) if n > patch)
    covered = np.zeros(padded, bool)
    for corner in tile_corners(padded, patch, stride):
        covered[tuple(slice(c, c + patch) for c in corner)] = True
    assert covered.all()


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_mean_aggregation_puts_every_voxel_back_where_it_came_from(rng, batch_size):
    image = rng.random((37, 29, 22)).astype(np.float32)
    calls = []
    result = predict_volume(
        image, identity_network(16), 16, 8, batch_size, "mean", progress=lambda d, t: calls.append((d, t))
    )
    np.testing.assert_allclose(result, image, atol=1e-5)
    tiles = len(tile_corners(padded_shape(image.shape, 16, 8), 16, 8))
    assert calls[-1] == (-(-tiles // batch_size),) * 2 and [d for d, _ in calls] == list(range(1, len(calls) + 1))


def test_or_aggregation_thresholds_each_tile_then_ors_them(rng):
    image = rng.random((30, 30, 30)).astype(np.float32)
    result = predict_volume(image, identity_network(16), 16, 8, 4, "or")
    np.testing.assert_array_equal(result, (image >= 0.5).astype(np.float32))


@pytest.mark.parametrize("aggregate", AGGREGATIONS)
def test_air_tiles_are_left_out_of_the_network_and_come_out_as_background(rng, aggregate):
    image = np.zeros((48, 48, 48), np.float32)
    image[:20, :20, :20] = rng.uniform(0.55, 1.0, (20, 20, 20))  # tissue in one corner, air elsewhere
    image[32:, 32:, 32:] = rng.uniform(0.01, 0.05, (16, 16, 16))  # dark noise, in no tile that reaches the tissue
    batches = {}

    def predict(skip_below):
        calls = []
        result = predict_volume(
            image,
            identity_network(16),
            16,
            8,
            1,
            aggregate,
            progress=lambda d, t: calls.append(t),
            skip_below=skip_below,
        )
        batches[skip_below] = calls[-1]
        return result

    every_tile, tissue_tiles = predict(None), predict(air_level(image))
    assert batches[None] == len(tile_corners(padded_shape(image.shape, 16, 8), 16, 8)) == 125
    assert batches[air_level(image)] == 27  # the tiles that reach into the tissue corner
    expected = every_tile.copy()
    expected[32:, 32:, 32:] = 0  # the identity network returns the noise; a left-out tile is background
    np.testing.assert_allclose(tissue_tiles, expected, atol=1e-6)


def test_air_level_is_a_tenth_of_the_bright_tissue_level(rng):
    image = rng.uniform(0, 400, (30, 30, 30)).astype(np.float32)
    assert air_level(image) == pytest.approx(0.1 * np.percentile(image[::3, ::3, ::3], 99.5))


def test_a_raising_progress_callback_stops_the_prediction(rng):
    def stop(done, total):
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        predict_volume(rng.random((32, 32, 32)).astype(np.float32), identity_network(16), 16, 8, 2, progress=stop)


def test_tile_weights_peak_in_the_centre_and_never_vanish():
    weights = tile_weights(16)
    assert weights.shape == (16, 16, 16) and weights.min() >= 1e-3
    assert weights[7, 7, 7] == weights.max() and weights[0, 0, 0] < weights[4, 4, 4]
    np.testing.assert_array_equal(weights, weights.transpose(2, 0, 1))


def test_projections_come_back_on_the_input_grid(rng):
    image = rng.random((6, 7, 8)).astype(np.float32)
    seen = {}

    def predict(view, name):
        seen[name] = view.shape
        return view * 2

    maps = list(iter_projections(image, predict, projections=3))
    assert seen == {name: tuple(image.shape[a] for a in order) for name, order in view_orders().items()}
    assert len(set(seen.values())) == 3
    for fused in maps:
        np.testing.assert_array_equal(fused, image * 2)
    assert len(list(iter_projections(image, predict, projections=1))) == 1


def test_fusion_rules_are_or_majority_and_mean():
    maps = [np.array([0.9, 0.2, 0.6, 0.1]), np.array([0.1, 0.7, 0.6, 0.2]), np.array([0.2, 0.8, 0.1, 0.3])]
    np.testing.assert_array_equal(fuse_probabilities(maps, "or") >= 0.5, [True, True, True, False])
    np.testing.assert_array_equal(fuse_probabilities(maps, "vote") >= 0.5, [False, True, True, False])
    np.testing.assert_allclose(fuse_probabilities(maps, "mean"), [0.4, 0.5666667, 0.4333333, 0.2], atol=1e-6)
    with pytest.raises(ValueError, match="fusion"):
        fuse_probabilities(maps, "and")


def test_overlapping_tiles_are_weighted_by_place_then_averaged_or_ored(rng):
    # A network whose answer for a voxel depends on where it lies in the tile: tiles disagree
    # where they overlap, so each aggregation gives its own, computable answer.
    image = (rng.random((24, 24, 40)) > 0.6).astype(np.float32)
    patch, stride = 16, 8
    padded = np.zeros(padded_shape(image.shape, patch, stride), np.float32)
    padded[: image.shape[0], : image.shape[1], : image.shape[2]] = image
    weights = tile_weights(patch).astype(np.float64)
    weighted, weight_sum, uniform, count = (np.zeros(padded.shape) for _ in range(4))
    ored = np.zeros(padded.shape, bool)
    for corner in tile_corners(padded.shape, patch, stride):
        region = tuple(slice(c, c + patch) for c in corner)
        tile = position_network_tile(padded[region])
        weighted[region] += weights * tile
        weight_sum[region] += weights
        uniform[region] += tile
        count[region] += 1
        ored[region] |= tile >= 0.5
    crop = tuple(slice(0, n) for n in image.shape)
    network = position_network(patch)
    mean = predict_volume(image, network, patch, stride, 4, "mean")
    np.testing.assert_allclose(mean, (weighted / weight_sum)[crop], atol=1e-5)
    assert np.abs(mean - (uniform / count)[crop]).max() > 0.05  # the Gaussian weights matter here
    np.testing.assert_array_equal(predict_volume(image, network, patch, stride, 4, "or"), ored[crop])


@pytest.mark.parametrize("batch_size", [1, 4, 9])
def test_slices_are_predicted_whole_and_put_back_in_place_and_air_slices_are_left_out(rng, batch_size):
    keras = needs_keras()

    inputs = keras.Input((None, None, 1))
    layer = keras.layers.Conv2D(1, 1, use_bias=False)
    identity = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.ones((1, 1, 1, 1), np.float32)])
    image = rng.random((9, 13, 18), dtype=np.float32) + 1.0
    image[[0, 4]] = 0.05  # slices of air
    calls = []
    predicted = predict_slices(
        image,
        identity,
        multiple=8,
        batch_size=batch_size,
        progress=lambda done, total: calls.append((done, total)),
        skip_below=0.1,
    )
    expected = image.copy()
    expected[[0, 4]] = 0.0
    np.testing.assert_allclose(predicted, expected, atol=1e-6)
    assert calls[-1] == (len(range(0, 7, batch_size)),) * 2


def test_a_2d_unet_takes_slices_whose_sides_its_poolings_do_not_divide(rng):
    needs_keras()
    from KneeBoneSegLib.network.unet import build_unet

    network = build_unet(None, base_filters=2, depth=3, dimensions=2)
    image = rng.random((3, 13, 18), dtype=np.float32)
    predicted = predict_slices(image, network, multiple=8)
    assert predicted.shape == image.shape and np.all((predicted > 0) & (predicted < 1))


def test_a_whole_volume_runs_in_one_call_on_the_same_weights(rng):
    needs_keras()
    from KneeBoneSegLib.network.engines import KerasNetwork
    from KneeBoneSegLib.network.inference import predict_whole_volume
    from KneeBoneSegLib.network.unet import build_unet

    network = KerasNetwork(build_unet(16, base_filters=2, depth=2))
    free = network.with_free_sides()
    cube = rng.random((16, 16, 16), dtype=np.float32)
    # On a sub-volume's own size the free network is the tiled one, weights and all.
    np.testing.assert_allclose(
        predict_whole_volume(cube, free, 4), network.predict_on_batch(cube[None, ..., None])[0, ..., 0], atol=1e-5
    )
    odd = rng.random((18, 21, 30), dtype=np.float32)  # sides the poolings do not divide: grown, then cut back
    whole = predict_whole_volume(odd, free, 4)
    assert whole.shape == odd.shape and whole.dtype == np.float32 and np.all((whole >= 0) & (whole <= 1))
