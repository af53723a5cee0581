"""Sub-volume inference: tile a volume, predict the tiles in batches, put them back.

The paper tiles the volume into 64-voxel cubes with a stride of 32, padding it
to fit. The tile grid is a view (numpy's ``sliding_window_view`` taken at the
stride: what scikit-image's ``view_as_windows`` gives, of which the
``patchify`` package the paper used is a thin alias that pins numpy<2), so
tiles are copied only one batch at a time. Tiles of pure air, about half
of a knee scan's field of view, can be left out of the network altogether
(:func:`~KneeBoneSegLib.preprocess.normalization.air_level`).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..options import AGGREGATIONS

log = logging.getLogger(__name__)


def padded_shape(shape, patch_size: int, stride: int) -> tuple[int, ...]:
    """The smallest shape >= ``shape`` that whole tiles of ``patch_size`` at ``stride`` cover."""
    return tuple(patch_size + max(0, int(np.ceil((n - patch_size) / stride))) * stride for n in shape)


def tile_weights(patch_size: int) -> np.ndarray:
    """Weights of a tile's voxels when overlapping tiles are averaged.

    A Gaussian centred on the tile (sigma a quarter of its side), floored at
    1e-3 so every voxel still counts: predictions near a tile's border, where
    the network saw the least context, weigh less than those at its centre.
    """
    position = np.arange(patch_size) - (patch_size - 1) / 2
    profile = np.exp(-0.5 * (position / (patch_size / 4)) ** 2)
    weights = profile[:, None, None] * profile[None, :, None] * profile[None, None, :]
    return np.maximum(weights / weights.max(), 1e-3).astype(np.float32)


def tile_corners(shape, patch_size: int, stride: int) -> np.ndarray:
    """(N, 3) corners of the tiles covering a volume of ``padded_shape``."""
    axes = [np.arange(0, n - patch_size + 1, stride) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def predict_volume(
    image: np.ndarray,
    network,
    patch_size: int = 64,
    stride: int = 32,
    batch_size: int = 2,
    aggregate: str = "mean",
    progress: Callable[[int, int], None] | None = None,
    skip_below: float | None = None,
) -> np.ndarray:
    """Bone probability of every voxel of ``image``, predicted tile by tile.

    Parameters
    ----------
    image : ndarray, shape (k, j, i)
        Normalised intensities.
    network : keras.Model
        Maps a batch (B, p, p, p, 1) to probabilities of the same shape.
    patch_size, stride : int
        Tile side and step; the volume is zero-padded (after its last voxel)
        so the tiles cover it.
    aggregate : {"mean", "or"}
        ``"mean"``: Gaussian-weighted average of the overlapping tiles'
        probabilities. ``"or"`` (the paper's): threshold each tile at 0.5 and
        OR the overlaps; the result is then 0 or 1.
    progress : callable, optional
        ``progress(done, total)`` after each batch; an exception raised from it
        stops the prediction.
    skip_below : float, optional
        Tiles none of whose voxels reaches this intensity (air, see
        :func:`~KneeBoneSegLib.preprocess.normalization.air_level`) are not run through the network and count as
        background, probability 0, in the aggregation.

    Returns
    -------
    ndarray of float32, the shape of ``image``
    """
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATIONS)}, not {aggregate!r}")
    padded = np.zeros(padded_shape(image.shape, patch_size, stride), np.float32)
    padded[tuple(slice(0, n) for n in image.shape)] = image
    windows = sliding_window_view(padded, (patch_size,) * 3)[::stride, ::stride, ::stride]
    corners = tile_corners(padded.shape, patch_size, stride)
    weights = tile_weights(patch_size) if aggregate == "mean" else None
    total = np.zeros(padded.shape, np.float32)
    weight_sum = np.zeros(padded.shape, np.float32) if aggregate == "mean" else None
    if skip_below is not None:
        holds_tissue = windows.max(axis=(3, 4, 5))[tuple((corners // stride).T)] >= skip_below
        if aggregate == "mean":
            for corner in corners[~holds_tissue]:
                weight_sum[tuple(slice(c, c + patch_size) for c in corner)] += weights
        log.debug("Leaving out %d of %d tiles that hold only air", np.count_nonzero(~holds_tissue), len(corners))
        corners = corners[holds_tissue]
    batches = range(0, len(corners), batch_size)
    log.debug("Predicting %d tiles of %d^3 in %d batches", len(corners), patch_size, len(batches))
    for done, first in enumerate(batches, start=1):
        batch_corners = corners[first : first + batch_size]
        grid = tuple((batch_corners // stride).T)
        batch = windows[grid][..., None]
        if len(batch) < batch_size:  # a full last batch keeps the compiled network's input shape
            batch = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
        predicted = np.asarray(network.predict_on_batch(batch), dtype=np.float32)[: len(batch_corners), ..., 0]
        for corner, tile in zip(batch_corners, predicted):
            region = tuple(slice(c, c + patch_size) for c in corner)
            if aggregate == "mean":
                total[region] += tile * weights
                weight_sum[region] += weights
            else:
                np.maximum(total[region], tile >= 0.5, out=total[region])
        if progress is not None:
            progress(done, len(batches))
    del windows, padded  # the padded copy of the image, before the division needs no more memory
    if aggregate == "mean":
        np.divide(total, weight_sum, out=total, where=weight_sum > 0)
        del weight_sum
    if total.shape == image.shape:
        return total
    # A copy of the image's part, so that the padded sums are released on return.
    return total[tuple(slice(0, n) for n in image.shape)].copy()


def predict_slices(
    image: np.ndarray,
    network,
    multiple: int = 16,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
    skip_below: float | None = None,
) -> np.ndarray:
    """Bone probability of every voxel of ``image``, predicted whole slice by whole slice along its first axis.

    Parameters
    ----------
    image : ndarray, shape (n, rows, columns)
        Normalised intensities; each ``image[s]`` is one slice.
    network
        A 2D network of free sides: maps a batch (B, rows, columns, 1) to probabilities of the same shape.
    multiple : int
        What the network's poolings need the sides to divide by (``2**depth``); each slice
        is grown after its last row and column, repeating them, and the growth is cut off
        the prediction.
    batch_size : int
        Slices per network call.
    progress, skip_below
        As :func:`predict_volume`: a slice none of whose voxels reaches ``skip_below`` is
        not run through the network and is background, probability 0.

    Returns
    -------
    ndarray of float32, the shape of ``image``
    """
    rows, columns = image.shape[1:]
    padded = np.pad(image, [(0, 0), (0, -rows % multiple), (0, -columns % multiple)], mode="edge")
    wanted = np.arange(len(image))
    if skip_below is not None:
        wanted = wanted[image.reshape(len(image), -1).max(axis=1) >= skip_below]
        log.debug("Leaving out %d of %d slices that hold only air", len(image) - len(wanted), len(image))
    probability = np.zeros(image.shape, np.float32)
    batches = range(0, len(wanted), batch_size)
    for done, first in enumerate(batches, start=1):
        indices = wanted[first : first + batch_size]
        predicted = np.asarray(network.predict_on_batch(padded[indices][..., None]), dtype=np.float32)
        probability[indices] = predicted[:, :rows, :columns, 0]
        if progress is not None:
            progress(done, len(batches))
    return probability


def predict_whole_volume(image: np.ndarray, network, multiple: int) -> np.ndarray:
    """A fully convolutional 3D network run once on the whole ``image``, not in sub-volumes.

    ``network`` takes a batch (1, k, j, i, 1) of free sides
    (:meth:`~KneeBoneSegLib.network.engines.KerasNetwork.with_free_sides`);
    ``image`` is grown after its last voxels along each axis, repeating them
    (as :func:`predict_slices` grows slices), to sides that ``multiple``
    (``2**depth``, what its poolings need) divides, and the growth is cut
    off the prediction. Float32, the shape of ``image``.
    """
    padded = np.pad(image, [(0, -side % multiple) for side in image.shape], mode="edge")
    predicted = np.asarray(network.predict_on_batch(padded[None, ..., None]), dtype=np.float32)[0, ..., 0]
    return np.ascontiguousarray(predicted[tuple(slice(0, side) for side in image.shape)])
