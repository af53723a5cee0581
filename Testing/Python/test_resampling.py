"""Resampling between the scan's grid and the model's: scipy's Gaussian and zoom, axis by axis."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from KneeBoneSegLib.preprocess.resampling import grid_shape_for_spacing, resample_to_shape


def scipy_resample(array, shape, order):
    """The whole-volume reference: anti-aliasing Gaussian, then ``ndimage.zoom`` with voxel edges aligned."""
    factors = np.asarray(shape, float) / np.asarray(array.shape, float)
    source = array
    if order == 1 and np.any(factors < 1):
        sigma = np.sqrt(np.maximum(0.0, 1.0 / factors**2 - 1.0)) / 2.0
        source = ndimage.gaussian_filter(array.astype(np.float32), sigma, mode="nearest")
    return ndimage.zoom(
        source, factors, order=order, mode="nearest", grid_mode=True, output=array.dtype if order == 0 else np.float32
    )


@pytest.mark.parametrize("shape", [(9, 40, 33), (30, 12, 20), (17, 17, 17), (4, 3, 60)])
def test_linear_resampling_is_scipy_gaussian_and_zoom_to_float32_rounding(rng, shape):
    image = rng.random((17, 23, 31)).astype(np.float32)
    result = resample_to_shape(image, shape, order=1)
    assert result.dtype == np.float32 and result.shape == shape
    np.testing.assert_allclose(result, scipy_resample(image, shape, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(9, 40, 33), (30, 12, 20), (5, 5, 5)])
def test_nearest_resampling_of_labels_is_exactly_scipy_zoom(rng, shape):
    labels = rng.integers(0, 4, (17, 23, 31)).astype(np.uint8)
    result = resample_to_shape(labels, shape, order=0)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, scipy_resample(labels, shape, 0))


def test_an_image_on_the_target_grid_is_returned_as_it_is_and_other_orders_are_refused(rng):
    image = rng.random((5, 6, 7)).astype(np.float32)
    assert resample_to_shape(image, (5, 6, 7)) is image
    with pytest.raises(ValueError, match="order"):
        resample_to_shape(image, (3, 3, 3), order=3)


def test_the_sample_scan_goes_to_the_model_grid_and_back_as_scipy_would(sample_dir):
    from KneeBoneSegLib.io.images import read_volume
    from KneeBoneSegLib.preprocess.normalization import normalize_intensities

    volume = read_volume(sample_dir / "knee_mri.nrrd")
    crop = normalize_intensities(volume.array)[100:164, 150:278, 150:278]
    coarse_shape = grid_shape_for_spacing(crop.shape, volume.geometry.spacing, 0.7)
    coarse = resample_to_shape(crop, coarse_shape)
    np.testing.assert_allclose(coarse, scipy_resample(crop, coarse_shape, 1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        resample_to_shape(coarse, crop.shape), scipy_resample(coarse, crop.shape, 1), rtol=0, atol=1e-6
    )
