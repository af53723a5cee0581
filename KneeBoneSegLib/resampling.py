"""Moving a volume between the scan's grid and the grid a model was trained on.

A compact model can work on coarser voxels than the scan (its card's
``spacing_mm``); the image goes to that grid before the network and the
probability map comes back to the scan's grid before thresholding, so every
output lands exactly on the input's voxels. Both grids cover the same
physical box (voxel edges aligned, ``grid_mode=True``), which is what
resampling a voxel grid means; the training code uses these same functions,
so the network sees at inference exactly the grid it was trained on.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def grid_shape_for_spacing(shape_kji, spacing_ijk, target_spacing_ijk) -> tuple[int, int, int]:
    """Shape (k, j, i) of the same physical box sampled at ``target_spacing_ijk``."""
    spacing_kji = np.asarray(spacing_ijk, dtype=float)[::-1]
    target_kji = np.broadcast_to(np.asarray(target_spacing_ijk, dtype=float), (3,))[::-1]
    extent = np.asarray(shape_kji, dtype=float) * spacing_kji
    return tuple(int(n) for n in np.maximum(1, np.round(extent / target_kji)))


def resample_to_shape(array: np.ndarray, shape, order: int = 1) -> np.ndarray:
    """Resample ``array`` onto a grid of ``shape`` covering the same box.

    ``order=1`` (linear) for intensities and probabilities, ``order=0`` for labels.
    Downsampling intensities first smooths with a Gaussian matched to the
    step so that fine noise does not alias into the coarse grid.
    """
    shape = tuple(int(n) for n in shape)
    if shape == array.shape:
        return array
    factors = np.asarray(shape, dtype=float) / np.asarray(array.shape, dtype=float)
    source = array
    if order > 0 and np.any(factors < 1):
        # sigma = (step^2 - 1)^0.5 / 2 is the usual anti-aliasing choice (skimage.transform.rescale).
        sigma = np.sqrt(np.maximum(0.0, (1.0 / factors) ** 2 - 1.0)) / 2.0
        source = ndimage.gaussian_filter(array.astype(np.float32, copy=False), sigma, mode="nearest")
    return ndimage.zoom(source, factors, order=order, mode="nearest", grid_mode=True, output=array.dtype if order == 0 else np.float32)
