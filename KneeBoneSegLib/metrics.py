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

On request (``surfaces=True``), the distance between surfaces as they are
printed: from each vertex of the predicted bone's smoothed surface (its STL,
:func:`~KneeBoneSegLib.postprocess.surfaces.bone_surface`) to the nearest
point of the reference bone's surface made the same way, its mean
(``surface_mean_mm``) and 95th percentile (``surface_p95_mm``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkFiltersGeneral import vtkDistancePolyDataFilter

from .anatomy import BONES
from .postprocess.surfaces import Surface, bone_surface, to_vtk_polydata
from .volume import Geometry

METRICS = ("dice", "iou", "ahd_voxels", "ahd_mm", "hd95_mm")
SURFACE_METRICS = ("surface_mean_mm", "surface_p95_mm")


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


def surface_distances(surface: Surface, reference: Surface) -> np.ndarray:
    """Distance (mm) from each vertex of ``surface`` to the nearest point of ``reference``'s triangles (VTK)."""
    distance = vtkDistancePolyDataFilter()
    distance.SetInputData(0, to_vtk_polydata(surface))
    distance.SetInputData(1, to_vtk_polydata(reference))
    distance.SignedDistanceOff()
    distance.ComputeSecondDistanceOff()
    distance.Update()
    return np.abs(vtk_to_numpy(distance.GetOutput().GetPointData().GetScalars()))


def compare_surfaces(prediction: np.ndarray, reference: np.ndarray, spacing) -> dict:
    """:data:`SURFACE_METRICS` of two binary masks' smoothed surfaces; infinite when either mask is empty."""
    if not prediction.any() or not reference.any():
        return dict.fromkeys(SURFACE_METRICS, float("inf"))
    geometry = Geometry(tuple(spacing), (0.0, 0.0, 0.0))  # distances do not depend on where the grid lies
    box = _joint_box(prediction, reference)
    corner = tuple(part.start for part in box)
    predicted, truth = (bone_surface(mask[box], geometry, corner=corner)[0] for mask in (prediction, reference))
    distances = surface_distances(predicted, truth)
    return {"surface_mean_mm": float(distances.mean()), "surface_p95_mm": float(np.percentile(distances, 95))}


def evaluate_labels(prediction: np.ndarray, reference: np.ndarray, spacing, surfaces: bool = False) -> dict:
    """Metrics per bone (by label value) and for all bone (any label > 0).

    Returns a dict keyed by ``femur``, ``tibia``, ``patella`` and ``all``,
    each holding :data:`METRICS`, and with ``surfaces`` the bones also
    :data:`SURFACE_METRICS`.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} are not on the same grid")
    results = {}
    for bone in BONES:
        predicted, truth = prediction == bone.label, reference == bone.label
        results[bone.key] = compare_masks(predicted, truth, spacing)
        if surfaces:
            results[bone.key].update(compare_surfaces(predicted, truth, spacing))
    results["all"] = compare_masks(prediction > 0, reference > 0, spacing)
    return results


def format_metrics_table(results: dict) -> str:
    """A plain-text table of :func:`evaluate_labels` results (surface columns where they were measured)."""
    surfaces = any("surface_mean_mm" in values for values in results.values())
    header = f"{'':10}{'Dice':>8}{'IoU':>8}{'AHD vox':>10}{'AHD mm':>9}{'HD95 mm':>9}"
    rows = [header + (f"{'surf mm':>9}{'surf95 mm':>10}" if surfaces else "")]
    for name, values in results.items():
        row = (
            f"{name:10}{values['dice']:8.4f}{values['iou']:8.4f}{values['ahd_voxels']:10.4f}"
            f"{values['ahd_mm']:9.4f}{values['hd95_mm']:9.3f}"
        )
        if "surface_mean_mm" in values:
            row += f"{values['surface_mean_mm']:9.3f}{values['surface_p95_mm']:10.3f}"
        rows.append(row)
    return "\n".join(rows)


def _joint_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the voxels of either mask."""
    return ndimage.find_objects((a | b).astype(np.uint8))[0]


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it."""
    return mask & ~ndimage.binary_erosion(mask)
