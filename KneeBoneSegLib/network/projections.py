"""The paper's three projections and their fusion.

A 3D network sees a sub-volume in one axis order; feeding it the same volume
with its axes permuted (the axial, coronal and sagittal "projections") gives
three different predictions of the same voxels, which are brought back to one
grid and fused voxel-wise.

The projections are named by patient orientation, not by array axis: the
image axis nearest the patient's superior-inferior direction (from the scan's
direction matrix) is the one the axial projection presents first, whatever
plane the scan was acquired in. On an axially acquired scan (the paper's and
the sample's) that is the slice axis ``k``; on a sagittal one it is an
in-plane axis.
"""

from __future__ import annotations

from itertools import permutations
from typing import Callable, Iterable, Iterator

import numpy as np

from ..options import FUSIONS

#: Patient axes (LPS: 0 left-right, 1 anterior-posterior, 2 inferior-superior)
#: in the order each projection presents them to the network, first to last.
#: On an axial scan (identity direction) these are the array orders the
#: shipped models were trained and scored with: (k, j, i), (j, k, i), (i, k, j).
VIEW_PATIENT_AXES = {
    "axial": (2, 1, 0),
    "coronal": (1, 2, 0),
    "sagittal": (0, 2, 1),
}


_IDENTITY = np.eye(3)


def patient_axes(direction=_IDENTITY) -> tuple[int, int, int]:
    """The LPS axis (0 L-R, 1 A-P, 2 S-I) that each array axis (k, j, i) runs along.

    Parameters
    ----------
    direction : array_like, shape (3, 3) or (9,)
        Columns are the LPS directions of image axes i, j, k
        (:attr:`~KneeBoneSegLib.volume.Geometry.direction_matrix`).

    Returns
    -------
    tuple of 3 int
        A permutation of (0, 1, 2): for an oblique scan, the assignment whose
        axes are closest to the patient's (largest summed absolute cosines).
    """
    cosines_kji = np.abs(np.asarray(direction, dtype=float).reshape(3, 3))[:, ::-1]  # column a: array axis a
    return max(permutations(range(3)), key=lambda axes: sum(cosines_kji[axes[a], a] for a in range(3)))


def view_orders(direction=_IDENTITY) -> dict[str, tuple[int, int, int]]:
    """Array axis orders (of ``array[k, j, i]``) that present each projection's slices first.

    >>> view_orders()
    {'axial': (0, 1, 2), 'coronal': (1, 0, 2), 'sagittal': (2, 0, 1)}
    """
    array_axis = {patient: axis for axis, patient in enumerate(patient_axes(direction))}
    return {name: tuple(array_axis[p] for p in axes) for name, axes in VIEW_PATIENT_AXES.items()}


def iter_projections(
    image: np.ndarray,
    predict: Callable[[np.ndarray, str], np.ndarray],
    projections: int = 3,
    direction=_IDENTITY,
) -> Iterator[np.ndarray]:
    """Predict ``image`` in 1 (axial) or 3 projections, yielding each map on ``image``'s grid.

    One map at a time, so that a caller fusing them never holds all three.

    Parameters
    ----------
    image : ndarray, shape (k, j, i)
    predict : callable
        ``predict(view, name)`` returns a probability map of the same shape as
        ``view``; ``name`` is ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    projections : {1, 3}
    direction : array_like, shape (3, 3)
        The scan's direction matrix, which names the projections (:func:`view_orders`).
    """
    if projections not in (1, 3):
        raise ValueError(f"projections must be 1 or 3, not {projections}")
    for name, order in list(view_orders(direction).items())[:projections]:
        probability = predict(np.ascontiguousarray(image.transpose(order)), name)
        yield np.ascontiguousarray(probability.transpose(np.argsort(order)))


def fuse_probabilities(maps: Iterable[np.ndarray], method: str = "mean") -> np.ndarray:
    """Fuse per-projection probability maps voxel by voxel.

    ``"or"`` (the paper's) keeps a voxel that any projection calls bone: the
    maximum, so that thresholding it at 0.5 is the OR of the thresholded maps.
    ``"vote"`` keeps what most projections call bone: the median of 1 or 3
    maps, which is at least 0.5 exactly where a majority is. ``"mean"``
    averages the probabilities. All three return a new float32 map whose 0.5
    level is the fused decision; ``"or"`` and ``"mean"`` fold the maps into it
    one at a time, so ``maps`` may be a generator and only the fused map and
    the current one are held (``"vote"`` needs all three at once).
    """
    if method not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {method!r}")
    if method == "vote":
        return _median_of_one_or_three([np.asarray(p, dtype=np.float32) for p in maps])
    fused, count = None, 0
    for probability in maps:
        count += 1
        if fused is None:
            fused = np.array(probability, dtype=np.float32)  # a copy: the caller's maps are left alone
        elif method == "or":
            np.maximum(fused, probability, out=fused)
        else:
            np.add(fused, probability, out=fused, casting="unsafe")
    if fused is None:
        raise ValueError("no probability maps to fuse")
    if method == "mean" and count > 1:
        fused /= count
    return fused


def _median_of_one_or_three(maps: list[np.ndarray]) -> np.ndarray:
    """Voxel-wise median of 1 or 3 maps, without stacking them: max(min(a, b), min(max(a, b), c))."""
    if len(maps) == 1:
        return maps[0].copy()
    if len(maps) != 3:
        raise ValueError(f"the vote fusion takes 1 or 3 maps, not {len(maps)}")
    first, second, third = maps
    high = np.maximum(first, second)
    low = np.minimum(first, second)
    np.minimum(high, third, out=high)
    return np.maximum(low, high, out=low)
