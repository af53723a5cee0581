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


def same_grid(volume, other) -> bool:
    """Whether two :class:`~KneeBoneSegLib.volume.Volume` s have the same voxels in patient space
    (shape, and the index-to-LPS mapping to a thousandth of a voxel)."""
    return volume.array.shape == other.array.shape and np.allclose(
        volume.geometry.ijk_to_lps, other.geometry.ijk_to_lps, atol=1e-3 * min(other.geometry.spacing)
    )


def labels_onto_grid(labels, reference, names=("the label map", "the reference image")):
    """A label map resampled onto ``reference``'s grid with nearest neighbour; 0 outside it.

    Parameters
    ----------
    labels, reference : Volume
        Any two grids (origin, spacing, direction, shape) that share part of
        patient space; only ``reference``'s shape and geometry are used.

    Returns
    -------
    ndarray, ``reference``'s shape, ``labels``' dtype

    Raises
    ------
    InputError
        The two grids do not overlap in patient space.
    """
    from .errors import InputError

    # Reference (i, j, k, 1) -> LPS -> label map (i, j, k, 1); then in the arrays' (k, j, i) order.
    ijk_map = np.linalg.inv(labels.geometry.ijk_to_lps) @ reference.geometry.ijk_to_lps
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in reference.shape_ijk], indexing="ij")).reshape(3, -1)
    reached = ijk_map[:3, :3] @ corners + ijk_map[:3, 3:]
    extent = np.asarray(labels.shape_ijk)[:, None] - 0.5
    if np.any(reached.max(axis=1) < -0.5) or np.any(reached.min(axis=1) > extent[:, 0]):
        raise InputError(f"{names[0]} and {names[1]} do not overlap in patient space; check that they belong to the same scan")
    matrix = ijk_map[:3, :3][::-1, ::-1]
    offset = ijk_map[:3, 3][::-1]
    return ndimage.affine_transform(labels.array, matrix, offset, output_shape=reference.array.shape, order=0, mode="constant", cval=0)
