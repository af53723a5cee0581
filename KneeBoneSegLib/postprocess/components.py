"""Keep the bone components of a prediction and name them femur, tibia and patella.

Names come from anatomy in patient coordinates, never from array order, so a
scan stored with flipped or permuted axes is named the same. The three bones
are the largest components that sit where they should: the femur above the
tibia, the patella (the smallest) anterior to the femur and above the tibia.
Choosing by place as well as size, rather than taking the three largest,
keeps a false-positive blob of fat (bright like marrow, sometimes larger
than the patella, but beside or behind the femur) from being called a bone.
A component is named only if its size and place fit that bone as well
(:mod:`~KneeBoneSegLib.trust.plausibility`); one that does not is reported as
rejected, with the reasons. LPS: +y is posterior, +z is superior.
"""

from __future__ import annotations

import logging
from itertools import permutations
from typing import Callable

import numpy as np

from ..anatomy import BONE_BY_KEY, BONES
from ..trust.plausibility import FieldOfView, assignment_reasons, bone_reasons, measure_boxes
from ..volume import Geometry
from .morphology import bounding_box

log = logging.getLogger(__name__)

#: Components smaller than this fraction of the largest are specks, not bones.
#: (In the sample scan the patella is 13 % of the femur's part in view.)
MIN_BONE_FRACTION = 0.01


def largest_in_box(
    mask: np.ndarray, count: int | None = 3, min_fraction: float = 0.0
) -> tuple[tuple[slice, ...] | None, np.ndarray | None, list[int]]:
    """Label the face-connected components of ``mask`` in its bounding box and keep the ``count`` largest (all if None).

    Components smaller than ``min_fraction`` of the largest are dropped.
    Face (6-) connectivity keeps two bones apart when a prediction touches
    them only along an edge or a corner. Labelled with connected-components-3d
    (``cc3d``), which numbers components as ``scipy.ndimage.label`` does.
    Every component lies in the box (a quarter of a knee scan), and labelling
    there numbers them as in the whole volume; the later stages work there too.

    Returns
    -------
    box : tuple of slice, or None
        The mask's bounding box (None for an empty mask).
    components : ndarray of int32, or None
        The box's labels: 0 background, 1..n the kept components by decreasing size (n <= count).
    sizes : list of int
        Their voxel counts.
    """
    box = bounding_box(mask)
    if box is None:
        return None, None, []
    import cc3d  # on use, as the other compiled packages; twice as fast as ndimage.label, the same numbering

    labelled, found = cc3d.connected_components(mask[box], connectivity=6, return_N=True)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1][: found if count is None else count]
    order = [int(n) for n in order if sizes[n] >= min_fraction * sizes[order[0]]]
    relabel = np.zeros(found + 1, np.int32)
    relabel[order] = np.arange(1, len(order) + 1)
    return box, relabel[labelled], [int(sizes[n]) for n in order]


def component_statistics(components: np.ndarray, count: int) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """Centroids (count, 3; mean voxel index k, j, i) and bounding boxes of components 1..count of a labelled array.

    One pass over the array (``cc3d.statistics``).
    """
    import cc3d

    found = cc3d.statistics(components)
    centroids = np.asarray(found["centroids"], dtype=float)[1 : count + 1]
    return centroids, list(found["bounding_boxes"][1 : count + 1])


#: How many of the largest components are tried as bones.
CANDIDATES = 8


def name_components(
    centroids_lps: np.ndarray,
    sizes,
    candidates: int = CANDIDATES,
    fits: Callable[[dict], bool] | None = None,
    widest_at=None,
) -> tuple[list[str], list[str]]:
    """Bone names for components from their LPS centroids (mm) and sizes.

    Of the ``candidates`` largest components, the femur, tibia and patella are
    the three with the largest total size whose places are anatomical: the
    femur above the tibia; the patella the smallest of the three, anterior to
    the femur and above the tibia. Without such a triple, the largest pair
    with the femur above the tibia (patella missing). Without a pair, one
    component has no other bone to be placed against, so it is named by its
    own shape: a femur widens towards the knee at its lower end, a tibia at
    its upper end (``widest_at``, per component, where its widest
    cross-section lies: 0 inferior, 1 superior; without it, femur).
    ``fits({"femur": n, ...})`` says whether components may bear those names
    (their size and place); only fitting choices are made. Returns one name
    per component (``""`` for a component that is not one of the bones) and
    the warnings.
    """
    sizes = np.asarray(sizes)
    fits = fits or (lambda assignment: True)
    names = [""] * len(sizes)
    warnings: list[str] = []
    top = range(min(len(sizes), candidates))
    superior, posterior = centroids_lps[:, 2], centroids_lps[:, 1]
    triples = [
        (femur, tibia, patella)
        for femur, tibia, patella in permutations(top, 3)
        if superior[femur] > superior[tibia] < superior[patella]
        and posterior[patella] < posterior[femur]
        and sizes[patella] < min(sizes[femur], sizes[tibia])
        and fits({"femur": femur, "tibia": tibia, "patella": patella})
    ]
    pairs = [
        (femur, tibia)
        for femur, tibia in permutations(top, 2)
        if superior[femur] > superior[tibia] and fits({"femur": femur, "tibia": tibia})
    ]
    singles = [(n, _lone_bone_name(n, widest_at)) for n in top]
    singles = [(n, name) for n, name in singles if fits({name: n})]
    if triples:
        chosen = max(triples, key=lambda triple: sizes[list(triple)].sum())
    elif pairs:
        chosen = max(pairs, key=lambda pair: sizes[list(pair)].sum())
        if len(sizes) > 2:
            warnings.append(
                "no component lies where the patella should (anterior to the femur, above the tibia); none is called patella"
            )
    elif singles:
        index, name = singles[0]
        names[index] = name
        widening = "lower" if name == "femur" else "upper"
        warnings.append(
            f"only one component fits a bone (it may be several bones joined); it widens at its {widening} end, so it is called {name}"
        )
        return names, warnings
    else:
        chosen = ()
    for index, name in zip(chosen, ("femur", "tibia", "patella")):
        names[index] = name
    return names, warnings


def _lone_bone_name(n: int, widest_at) -> str:
    """Femur or tibia for a component with no other bone beside it, by which end is its wider."""
    return "tibia" if widest_at is not None and widest_at[n] > 0.5 else "femur"


def label_bones(
    mask: np.ndarray,
    geometry: Geometry,
    min_fraction: float = MIN_BONE_FRACTION,
    field_of_view: FieldOfView | None = None,
) -> tuple[np.ndarray, dict]:
    """Keep the femur, tibia and patella among the components of a bone ``mask``, labelled by anatomy.

    Parameters
    ----------
    mask : ndarray of bool, shape (k, j, i)
    geometry : Geometry
        Places the voxels in LPS space, which decides the names.
    min_fraction : float
        Components smaller than this fraction of the largest are not bones.
    field_of_view : FieldOfView, optional
        The scan's, so that a bone running into a turned scan's empty margin
        counts as cut (:class:`~KneeBoneSegLib.trust.plausibility.FieldOfView`).

    Returns
    -------
    labels : ndarray of uint8
        0 background, 1 femur, 2 tibia, 3 patella (see :data:`~KneeBoneSegLib.anatomy.BONES`).
    report : dict
        ``found`` (per bone: voxels, LPS centroid, volume and extent),
        ``missing`` (bone names not found), ``dropped_voxels`` (in components
        that are not bones), ``dropped_components`` (bone-sized ones among
        them), ``rejected`` (those of them that no bone's size fits, with
        the reasons per bone) and ``warnings``.
    """
    box, components, sizes = largest_in_box(mask, None, min_fraction)
    labels = np.zeros(mask.shape, np.uint8)
    report = {"found": {}, "missing": [], "dropped_voxels": 0, "dropped_components": [], "rejected": [], "warnings": []}
    if sizes:
        start = np.array([s.start for s in box])
        centroids_kji, boxes = component_statistics(components, len(sizes))
        centroids_lps = geometry.index_to_lps((centroids_kji + start)[:, ::-1])
        measures = measure_boxes(components, start, boxes[:CANDIDATES], sizes, geometry, mask.shape, field_of_view)
        names, report["warnings"] = name_components(
            centroids_lps,
            sizes,
            fits=lambda assignment: not assignment_reasons(assignment, measures),
            widest_at=[m.widest_at for m in measures],
        )
        lookup = np.zeros(len(sizes) + 1, np.uint8)
        for n, name in enumerate(names):
            entry = {"voxels": sizes[n], "centroid_lps_mm": [round(float(c), 2) for c in centroids_lps[n]]}
            if n < len(measures):
                entry.update(measures[n].to_dict())
            if name:
                lookup[n + 1] = BONE_BY_KEY[name].label
                report["found"][name] = entry
            else:
                report["dropped_components"].append(entry)
                reasons = {bone.key: bone_reasons(bone.key, measures[n]) for bone in BONES} if n < len(measures) else {}
                if reasons and all(reasons.values()):
                    report["rejected"].append({**entry, "reasons": reasons})
        labels[box] = lookup[components]
    report["dropped_voxels"] = int(np.count_nonzero(mask) - np.count_nonzero(labels))
    report["missing"] = [bone.key for bone in BONES if bone.key not in report["found"]]
    if report["missing"]:  # why components were not taken for the missing bones
        report["warnings"] += [rejection_warning(entry) for entry in report["rejected"]]
        report["warnings"].append(
            f"not found: {', '.join(report['missing'])} (no component of that bone's size where it should be)"
        )
    for warning in report["warnings"]:
        log.warning(warning)
    return labels, report


def rejection_warning(entry: dict) -> str:
    """One line saying why a component was not named a bone, from its ``rejected`` report entry."""
    why = "; ".join(f"not a {bone}: {reasons[0]}" for bone, reasons in entry["reasons"].items())
    return f"a component of {entry['volume_cm3']:g} cm3 was not named a bone ({why})"
