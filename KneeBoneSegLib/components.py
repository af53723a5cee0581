"""Keep the three largest bone components and name them femur, tibia and patella.

Names come from anatomy in patient coordinates, never from array order, so a
scan stored with flipped or permuted axes is named the same: the patella is
the smallest of the three (and should be the most anterior), the femur is
the more superior of the other two. LPS: +y is posterior, +z is superior.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from .anatomy import BONE_BY_KEY, BONES
from .volume import Geometry

log = logging.getLogger(__name__)

#: Components smaller than this fraction of the largest are specks, not bones.
#: (In the sample scan the patella is 13 % of the femur's part in view.)
MIN_BONE_FRACTION = 0.01


def largest_components(mask: np.ndarray, count: int = 3, min_fraction: float = 0.0) -> tuple[np.ndarray, list[int]]:
    """Label the face-connected components of ``mask`` and keep the ``count`` largest.

    Components smaller than ``min_fraction`` of the largest are dropped.

    Face (6-) connectivity keeps two bones apart when a prediction touches
    them only along an edge or a corner.

    Returns
    -------
    components : ndarray of int32
        0 background, 1..n the kept components by decreasing size (n <= count).
    sizes : list of int
        Their voxel counts.
    """
    labelled, found = ndimage.label(mask)
    if found == 0:
        return np.zeros(mask.shape, np.int32), []
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1][:count]
    order = [int(n) for n in order if sizes[n] >= min_fraction * sizes[order[0]]]
    relabel = np.zeros(found + 1, np.int32)
    relabel[order] = np.arange(1, len(order) + 1)
    return relabel[labelled], [int(sizes[n]) for n in order]


def name_components(centroids_lps: np.ndarray, sizes) -> tuple[list[str], list[str]]:
    """Bone names for components from their LPS centroids (mm) and sizes.

    Returns the names (one per component) and warnings where the anatomy is
    unusual. Three components: the smallest is the patella, the more superior
    of the others the femur. Two: femur above tibia, patella missing. One:
    called femur, with a warning.
    """
    count = len(sizes)
    warnings: list[str] = []
    names = [""] * count
    remaining = list(range(count))
    if count == 3:
        patella = int(np.argmin(sizes))
        names[patella] = "patella"
        remaining.remove(patella)
        if centroids_lps[patella, 1] > min(centroids_lps[n, 1] for n in remaining):
            warnings.append("the smallest bone, named patella, is not the most anterior one; check the names")
    if len(remaining) == 2:
        upper, lower = sorted(remaining, key=lambda n: -centroids_lps[n, 2])
        names[upper], names[lower] = "femur", "tibia"
    elif len(remaining) == 1:
        names[remaining[0]] = "femur"
        warnings.append("only one bone-sized component was found (it may be several bones joined); it is called femur")
    return names, warnings


def label_bones(mask: np.ndarray, geometry: Geometry, min_fraction: float = MIN_BONE_FRACTION) -> tuple[np.ndarray, dict]:
    """Keep the three largest components of a bone ``mask`` and label them by anatomy.

    Parameters
    ----------
    mask : ndarray of bool, shape (k, j, i)
    geometry : Geometry
        Places the voxels in LPS space, which decides the names.
    min_fraction : float
        Components smaller than this fraction of the largest are not bones.

    Returns
    -------
    labels : ndarray of uint8
        0 background, 1 femur, 2 tibia, 3 patella (see :data:`~KneeBoneSegLib.anatomy.BONES`).
    report : dict
        ``found`` (per bone: voxels and LPS centroid), ``missing`` (bone
        names not found), ``dropped_voxels`` and ``warnings``.
    """
    components, sizes = largest_components(mask, count=3, min_fraction=min_fraction)
    labels = np.zeros(mask.shape, np.uint8)
    report = {"found": {}, "missing": [], "dropped_voxels": int(np.count_nonzero(mask) - sum(sizes)), "warnings": []}
    if sizes:
        centroids_kji = np.array(ndimage.center_of_mass(mask, components, range(1, len(sizes) + 1)))
        centroids_lps = geometry.index_to_lps(centroids_kji[:, ::-1])
        names, report["warnings"] = name_components(centroids_lps, sizes)
        lookup = np.zeros(len(sizes) + 1, np.uint8)
        for n, name in enumerate(names):
            lookup[n + 1] = BONE_BY_KEY[name].label
            report["found"][name] = {"voxels": sizes[n], "centroid_lps_mm": [round(float(c), 2) for c in centroids_lps[n]]}
        labels = lookup[components]
    report["missing"] = [bone.key for bone in BONES if bone.key not in report["found"]]
    if report["missing"]:
        report["warnings"].append(f"not found: {', '.join(report['missing'])} (fewer than three bone-sized components)")
    for warning in report["warnings"]:
        log.warning(warning)
    return labels, report
