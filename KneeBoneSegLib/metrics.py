"""Overlap and distance between a predicted and a reference label map.

Distances follow pymia (the paper's tool), which calls ITK: the average
Hausdorff distance is ``(d(A, B) + d(B, A)) / 2`` where ``d(A, B)`` is the
mean, over *all* voxels of ``A``, of the distance to the nearest voxel of
``B`` (ITK averages the two directed distances, although pymia's docstring
says maximum). With unit spacing
(``ahd_voxels``) it is comparable with the paper's 0.0223; ``ahd_mm`` uses
the scan's spacing. ``hd95_mm`` is the larger of the two directed 95th
percentiles of boundary-to-boundary distances, in millimetres. Distance
transforms are computed in the objects' joint bounding box only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .anatomy import BONES

METRICS = ("dice", "iou", "ahd_voxels", "ahd_mm", "hd95_mm")


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice similarity coefficient of two binary masks (1.0 when both are empty)."""
    total = np.count_nonzero(prediction) + np.count_nonzero(reference)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(prediction & reference) / total


def iou(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Intersection over union (Jaccard index) of two binary masks (1.0 when both are empty)."""
    union = np.count_nonzero(prediction | reference)
    return 1.0 if union == 0 else np.count_nonzero(prediction & reference) / union


def average_hausdorff(prediction: np.ndarray, reference: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """pymia's average (Hausdorff) distance between the voxels of two masks; ``spacing`` along (i, j, k).

    Infinite when either mask is empty.
    """
    if not prediction.any() or not reference.any():
        return float("inf")
    box = _joint_box(prediction, reference)
    prediction, reference = prediction[box], reference[box]
    sampling = np.asarray(spacing, float)[::-1]
    to_reference = ndimage.distance_transform_edt(~reference, sampling=sampling)[prediction].mean()
    to_prediction = ndimage.distance_transform_edt(~prediction, sampling=sampling)[reference].mean()
    return float((to_reference + to_prediction) / 2)


def hausdorff_95(prediction: np.ndarray, reference: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """95th-percentile Hausdorff distance between the boundaries of two masks (the larger directed one)."""
    if not prediction.any() or not reference.any():
        return float("inf")
    box = _joint_box(prediction, reference)
    sampling = np.asarray(spacing, float)[::-1]
    edges = [_boundary(np.pad(mask[box], 1)) for mask in (prediction, reference)]
    directed = [
        np.percentile(ndimage.distance_transform_edt(~target, sampling=sampling)[source], 95)
        for source, target in (edges, edges[::-1])
    ]
    return float(max(directed))


def compare_masks(prediction: np.ndarray, reference: np.ndarray, spacing) -> dict:
    """All of :data:`METRICS` for two binary masks; ``spacing`` along (i, j, k) in mm."""
    return {
        "dice": dice(prediction, reference),
        "iou": iou(prediction, reference),
        "ahd_voxels": average_hausdorff(prediction, reference),
        "ahd_mm": average_hausdorff(prediction, reference, spacing),
        "hd95_mm": hausdorff_95(prediction, reference, spacing),
    }


def evaluate_labels(prediction: np.ndarray, reference: np.ndarray, spacing) -> dict:
    """Metrics per bone (by label value) and for all bone (any label > 0).

    Returns a dict keyed by ``femur``, ``tibia``, ``patella`` and ``all``,
    each holding :data:`METRICS`.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} are not on the same grid")
    results = {bone.key: compare_masks(prediction == bone.label, reference == bone.label, spacing) for bone in BONES}
    results["all"] = compare_masks(prediction > 0, reference > 0, spacing)
    return results


def format_metrics_table(results: dict) -> str:
    """A plain-text table of :func:`evaluate_labels` results."""
    header = f"{'':10}{'Dice':>8}{'IoU':>8}{'AHD vox':>10}{'AHD mm':>9}{'HD95 mm':>9}"
    rows = [header]
    for name, values in results.items():
        rows.append(
            f"{name:10}{values['dice']:8.4f}{values['iou']:8.4f}{values['ahd_voxels']:10.4f}"
            f"{values['ahd_mm']:9.4f}{values['hd95_mm']:9.3f}"
        )
    return "\n".join(rows)


def _joint_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the voxels of either mask."""
    return ndimage.find_objects((a | b).astype(np.uint8))[0]


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it."""
    return mask & ~ndimage.binary_erosion(mask)
