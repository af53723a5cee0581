"""Moving a volume between the scan's grid and the grid a model was trained on.

A compact model can work on coarser voxels than the scan (its card's
``spacing_mm``); the image goes to that grid before the network and the
probability map comes back to the scan's grid before thresholding, so every
output lands exactly on the input's voxels. Both grids cover the same
physical box (voxel edges aligned, as ``scipy.ndimage.zoom`` with
``grid_mode=True``), which is what resampling a voxel grid means; the
training code uses these same functions, so the network sees at inference
exactly the grid it was trained on.

Linear interpolation, nearest-neighbour sampling and the Gaussian that keeps
fine noise from aliasing into a coarser grid all act on one axis at a time,
so the resampling is done axis by axis, shrinking axes first (each later
pass works on fewer voxels), and each pass is split over the run's threads
(:func:`~KneeBoneSegLib.threads.thread_count`). The result is that of
``ndimage.gaussian_filter`` and ``ndimage.zoom(order=1, mode="nearest",
grid_mode=True)`` on the whole volume to float32 rounding (within 1e-6 on
intensities in [0, 1]; exactly, for ``order=0``).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from ..threads import in_slabs, thread_count
from ..volume import Geometry


def grid_shape_for_spacing(shape_kji, spacing_ijk, target_spacing_ijk) -> tuple[int, int, int]:
    """Shape (k, j, i) of the same physical box sampled at ``target_spacing_ijk``."""
    spacing_kji = np.asarray(spacing_ijk, dtype=float)[::-1]
    target_kji = np.broadcast_to(np.asarray(target_spacing_ijk, dtype=float), (3,))[::-1]
    extent = np.asarray(shape_kji, dtype=float) * spacing_kji
    return tuple(int(n) for n in np.maximum(1, np.round(extent / target_kji)))


def resample_to_shape(array: np.ndarray, shape, order: int = 1) -> np.ndarray:
    """Resample ``array`` onto a grid of ``shape`` covering the same box.

    Parameters
    ----------
    array : ndarray
    shape : sequence of int
        The new grid's shape, one entry per axis of ``array``.
    order : {1, 0}
        1 (linear) for intensities and probabilities, 0 (nearest) for labels.
        Downsampling with ``order=1`` first smooths each shrinking axis with
        a Gaussian matched to the step (sigma = (step^2 - 1)^0.5 / 2, the
        usual anti-aliasing choice, as ``skimage.transform.rescale``), so
        that fine noise does not alias into the coarse grid.

    Returns
    -------
    ndarray
        float32 for ``order=1``; ``array``'s dtype for ``order=0``; ``array``
        itself when the shape is already ``shape``.
    """
    shape = tuple(int(n) for n in shape)
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), not {order}")
    if shape == array.shape:
        return array
    factors = np.asarray(shape, dtype=float) / np.asarray(array.shape, dtype=float)
    result = array if order == 0 else np.asarray(array, dtype=np.float32)
    # Shrinking axes first, so that later passes see fewer voxels; among them the
    # last (contiguous in memory, the cheapest to filter) while the volume is
    # largest, and among growing axes the last once it has grown most.
    shrinking = [axis for axis in reversed(range(array.ndim)) if shape[axis] < array.shape[axis]]
    growing = [axis for axis in range(array.ndim) if shape[axis] > array.shape[axis]]
    for axis in shrinking + growing:
        if order == 1 and factors[axis] < 1:
            sigma = np.sqrt(1.0 / factors[axis] ** 2 - 1.0) / 2.0
            result = _along_axis(result, axis, result.shape[axis], _smooth_lines, sigma)
        result = _along_axis(result, axis, shape[axis], _resample_lines, order)
    return result


def _along_axis(array: np.ndarray, axis: int, length: int, function, *args) -> np.ndarray:
    """``function(part, axis, length, out, *args)`` on slabs of ``array`` cut across another axis, in threads.

    Each call fills its slab of the output, whose ``axis`` has ``length``
    entries; the other axes are unchanged.
    """
    shape = list(array.shape)
    shape[axis] = length
    out = np.empty(shape, dtype=array.dtype)
    if array.ndim == 1:
        function(array, axis, length, out, *args)
        return out
    across = 1 if axis == 0 else 0  # slabs along the first axis are contiguous in memory
    in_slabs(lambda part: function(array[part], axis, length, out[part], *args), array.shape, across)
    return out


def _smooth_lines(part: np.ndarray, axis: int, length: int, out: np.ndarray, sigma: float) -> None:
    ndimage.gaussian_filter1d(part, sigma, axis=axis, mode="nearest", output=out)


def _resample_lines(part: np.ndarray, axis: int, length: int, out: np.ndarray, order: int) -> None:
    # Where the centres of the new voxels fall on the old axis, voxel edges
    # aligned (ndimage.zoom's grid_mode); beyond the outer centres the edge
    # voxel's value continues (mode "nearest").
    size = part.shape[axis]
    position = (np.arange(length) + 0.5) * (size / length) - 0.5
    if order == 0:
        nearest = np.clip(np.floor(position + 0.5), 0, size - 1).astype(np.intp)
        np.take(part, nearest, axis=axis, out=out, mode="clip")
        return
    below = np.floor(position)
    weight = _along(position - below, axis, part.ndim).astype(np.float32)
    low = np.clip(below, 0, size - 1).astype(np.intp)
    high = np.clip(below + 1, 0, size - 1).astype(np.intp)
    np.take(part, low, axis=axis, out=out, mode="clip")
    upper = np.take(part, high, axis=axis, mode="clip")
    upper -= out
    upper *= weight
    out += upper


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """``values`` shaped to broadcast along ``axis`` of an ``ndim``-dimensional array."""
    shape = [1] * ndim
    shape[axis] = len(values)
    return values.reshape(shape)


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
    # Reference (i, j, k, 1) -> LPS -> label map (i, j, k, 1); then in the arrays' (k, j, i) order.
    ijk_map = np.linalg.inv(labels.geometry.ijk_to_lps) @ reference.geometry.ijk_to_lps
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in reference.shape_ijk], indexing="ij")).reshape(3, -1)
    reached = ijk_map[:3, :3] @ corners + ijk_map[:3, 3:]
    extent = np.asarray(labels.shape_ijk)[:, None] - 0.5
    if np.any(reached.max(axis=1) < -0.5) or np.any(reached.min(axis=1) > extent[:, 0]):
        raise InputError(
            f"{names[0]} and {names[1]} do not overlap in patient space; check that they belong to the same scan"
        )
    matrix = ijk_map[:3, :3][::-1, ::-1]
    offset = ijk_map[:3, 3][::-1]
    return ndimage.affine_transform(
        labels.array, matrix, offset, output_shape=reference.array.shape, order=0, mode="constant", cval=0
    )


#: Scans whose image axes all lie within this angle of the patient's axes go to the model's grid along
#: their own axes; more oblique ones go onto a grid aligned with the patient. The networks were trained
#: with rotations of up to 10 degrees (``training.augmentation.Augmentation.rotation_deg``), so a few degrees of tilt
#: (the sample scan's axes are 2.6 degrees off) are inside what they learned.
MAX_ALIGNED_DEGREES = 5.0


def obliquity_degrees(direction) -> float:
    """The largest angle (degrees) between an image axis and the patient axis nearest it; 0 for an axis-aligned scan.

    ``direction`` is a direction matrix (3x3 or 9 values, columns the LPS directions of i, j, k).
    """
    cosines = np.abs(np.asarray(direction, dtype=float).reshape(3, 3)).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def resample_onto(
    array: np.ndarray, geometry, target, shape, order: int = 1, fill: float = 0.0, extrapolate: bool = False
) -> np.ndarray:
    """``array`` (on ``geometry``) sampled at the voxel centres of the grid ``target`` of ``shape`` (k, j, i).

    Any two grids in patient space, with any directions: SimpleITK's
    resampler on the run's threads. ``order`` 1 is linear (float32 out),
    0 nearest neighbour (``array``'s dtype out). Voxels of the target beyond
    ``array``'s voxel centres get ``fill``, or with ``extrapolate`` the
    nearest voxel's value (for a grid that covers the same box, whose outer
    half voxels lie beyond the outer centres). No anti-aliasing: smooth first
    when going to coarser voxels (:func:`smooth_for_spacing`).
    """
    source = np.asarray(array, dtype=np.float32) if order == 1 else np.ascontiguousarray(array)
    image = sitk.GetImageFromArray(np.ascontiguousarray(source))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    resample = sitk.ResampleImageFilter()
    resample.SetSize([int(n) for n in shape[::-1]])
    resample.SetOutputSpacing(target.spacing)
    resample.SetOutputOrigin(target.origin)
    resample.SetOutputDirection(target.direction)
    resample.SetInterpolator(sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor)
    resample.SetDefaultPixelValue(float(fill))
    resample.SetUseNearestNeighborExtrapolator(bool(extrapolate))
    resample.SetNumberOfThreads(thread_count())
    return sitk.GetArrayFromImage(resample.Execute(image))


def smooth_for_spacing(array: np.ndarray, spacing_ijk, target_spacing_ijk) -> np.ndarray:
    """``array`` smoothed along each axis that gets coarser voxels, as :func:`resample_to_shape` does before shrinking it.

    ``target_spacing_ijk`` is the spacing the array is going to (one value or three, along i, j, k).
    """
    step_kji = (
        np.broadcast_to(np.asarray(target_spacing_ijk, dtype=float), (3,))[::-1]
        / np.asarray(spacing_ijk, dtype=float)[::-1]
    )
    result = np.asarray(array, dtype=np.float32)
    for axis in reversed(range(3)):
        if step_kji[axis] > 1:
            sigma = np.sqrt(step_kji[axis] ** 2 - 1.0) / 2.0
            result = _along_axis(result, axis, result.shape[axis], _smooth_lines, sigma)
    return result


class ModelGrid:
    """The grid a model sees a scan on, and the way there and back.

    The scan's box at the model card's spacing (the scan's own where the card
    has none). A scan within :data:`MAX_ALIGNED_DEGREES` of the patient's
    axes keeps its axes (:func:`resample_to_shape`, the grid the models
    were trained on); a more oblique one goes onto a grid aligned with the
    patient's axes (LPS, as the training scan) that holds the whole scan,
    so the network always sees the knee upright as it learned it, and the
    axial, coronal and sagittal projections are the patient's planes. What
    that grid holds beyond the scan's box is :meth:`scanned` ``False`` and 0
    in the image (air after any of the cards' normalisations).
    """

    def __init__(self, geometry, scan_shape, spacing_mm=None):
        self.scan_geometry, self.scan_shape = geometry, tuple(int(n) for n in scan_shape)
        self.reoriented = obliquity_degrees(geometry.direction) > MAX_ALIGNED_DEGREES
        if not self.reoriented:
            self.shape = (
                grid_shape_for_spacing(self.scan_shape, geometry.spacing, spacing_mm) if spacing_mm else self.scan_shape
            )
            step = np.asarray(geometry.spacing) * np.asarray(self.scan_shape[::-1]) / np.asarray(self.shape[::-1])
            origin = geometry.index_to_lps((0.5 * step / np.asarray(geometry.spacing) - 0.5)[None])[0]
            self.geometry = Geometry(step, origin, geometry.direction)
            return
        if spacing_mm:
            spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
        else:  # each patient axis at the spacing of the image axis nearest it
            nearest = np.abs(geometry.direction_matrix).argmax(axis=1)
            spacing = np.asarray(geometry.spacing)[nearest]
        corners = (
            np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in self.scan_shape[::-1]], indexing="ij")).reshape(3, -1).T
        )
        lps = geometry.index_to_lps(corners)
        low, high = lps.min(axis=0), lps.max(axis=0)
        counts_ijk = np.maximum(1, np.ceil((high - low) / spacing - 1e-6)).astype(int)
        centre = (low + high) / 2
        self.geometry = Geometry(spacing, centre - spacing * (counts_ijk - 1) / 2)
        self.shape = tuple(int(n) for n in counts_ijk[::-1])

    @property
    def resamples(self) -> bool:
        """Whether the model's grid is not the scan's own: the image goes there and the maps come back."""
        return self.reoriented or self.shape != self.scan_shape

    @property
    def direction(self) -> np.ndarray:
        """The model grid's direction matrix, which names its projections."""
        return self.geometry.direction_matrix

    def from_scan(self, image: np.ndarray) -> np.ndarray:
        """A scan-grid ``image`` on the model's grid (linear, anti-aliased; float32)."""
        if not self.reoriented:
            return resample_to_shape(image, self.shape, order=1)
        smoothed = smooth_for_spacing(image, self.scan_geometry.spacing, self.geometry.spacing)
        return resample_onto(
            smoothed, self.scan_geometry, self.geometry, self.shape, order=1, fill=0.0, extrapolate=False
        )

    def to_scan(self, values: np.ndarray) -> np.ndarray:
        """A model-grid map (probability, disagreement) back on the scan's grid (linear; float32): the map
        itself where the model's grid is the scan's."""
        if not self.reoriented:
            return resample_to_shape(values, self.scan_shape, order=1)
        return resample_onto(values, self.geometry, self.scan_geometry, self.scan_shape, order=1, extrapolate=True)

    def scanned(self) -> np.ndarray | None:
        """Which model-grid voxels lie inside the scan's box (bool); ``None`` when all do."""
        if not self.reoriented:
            return None
        to_scan_ijk = np.linalg.inv(self.scan_geometry.ijk_to_lps) @ self.geometry.ijk_to_lps
        k, j, i = (np.arange(n, dtype=np.float32) for n in self.shape)
        inside = np.ones(self.shape, dtype=bool)
        for axis, size in enumerate(self.scan_shape[::-1]):  # scan axes i, j, k
            row = to_scan_ijk[axis].astype(np.float32)
            index = row[0] * i[None, None, :] + row[1] * j[None, :, None] + row[2] * k[:, None, None] + row[3]
            inside &= (index >= -0.5) & (index <= size - 0.5)
        return inside
