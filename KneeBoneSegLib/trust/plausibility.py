"""Could this component be that bone? Size and place rules from adult knee anatomy.

A network that has never seen a kind of scan can mark a litre of muscle as
bone; taking the largest component as the femur then hands a clinician a
wrong bone. A component is named femur, tibia or patella only if its volume
and its extent in millimetres, and its place relative to the other bones,
fit that bone in a knee field of view (:func:`assignment_reasons`).

All the numbers are in :data:`RULES`, each with its source. They are adult
sizes from morphometric studies, widened by a margin for large knees, a
knee slightly rotated in the coil (extents are measured along the patient's
left-right, anterior-posterior and superior-inferior axes) and a
segmentation that runs a few millimetres over the bone. Extents are
those of the component's voxels in patient space, so a scan acquired on
turned (oblique) planes is measured as an upright one. The sample scan's
bones (ground truth, 0.3 T KneeBones3Dify scan) are given for comparison.

A scan cuts the femur and tibia: whatever lies above or below the field of
view is missing. A bone is never rejected for being *small* when it touches
the edge of the field of view; it is rejected for being too *large* wherever
it lies, since no cut makes a bone wider or bigger.

Volume limits follow from the extents rather than from a second set of
numbers: the most a femur or tibia can hold over the height it shows is an
elliptic cylinder of the largest end (condyles or plateau) up to the height
of the widened end, then an elliptic cylinder of the widest shaft; a whole
patella is at least the ellipsoid of its smallest dimensions and at most
the ellipsoid of its largest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..volume import Geometry

AXES = ("left-right", "anterior-posterior", "superior-inferior")

# Sources, cited by key in RULES.
SOURCES = {
    "mahfouz2012": "Mahfouz M et al., Three-dimensional morphology of the knee reveals ethnic differences, "
    "Clin Orthop Relat Res 2012;470:172-185 (CT of 1,000 adult knees: femoral epicondylar width about 70-95 mm, "
    "femoral AP about 55-75 mm, tibial plateau width about 65-90 mm, AP about 40-60 mm)",
    "cheng2009": "Cheng FB et al., Three dimensional morphometry of the knee to design the total knee arthroplasty "
    "for Chinese population, Knee 2009;16:341-347 (smaller knees: femoral width from about 62 mm, "
    "tibial width from about 62 mm)",
    "iranpour2008": "Iranpour F et al., The width:thickness ratio of the patella, Clin Orthop Relat Res "
    "2008;466:1198-1203, and Baldwin JL, House CK, Anthropometric measurements of the patella, "
    "Am J Knee Surg 2005 (patellar width about 36-55 mm, height about 32-55 mm, thickness about 18-28 mm)",
    "shaft": "Gray's Anatomy, 41st ed., 2016, and CT morphometry of the femoral and tibial diaphysis (outer "
    "diameter of the adult femoral shaft about 24-33 mm, tibial shaft about 20-30 mm); the metaphysis widens "
    "into the condyles or plateau over about 60-90 mm",
    "joint": "Knee joint space on MRI about 3-8 mm between femoral and tibial bone, plus cartilage "
    "(about 2-4 mm on each side); the tibial spines (intercondylar eminence) rise about 10 mm into the femoral "
    "notch; the patella articulates with the femoral trochlea",
}


@dataclass(frozen=True)
class BoneRule:
    """Size limits of one bone in millimetres (largest values widened by a margin)."""

    min_extent_mm: tuple[float, float, float]  # whole bone (not cut by the field of view): LR, AP, SI at least
    max_extent_mm: tuple[float, float, float]  # LR, AP, SI at most, cut or not (None: no limit)
    end_height_mm: float | None  # femur/tibia: height of the widened end; None: patella, an ellipsoid
    max_shaft_mm: float | None  # outer diameter of the shaft above or below it
    min_cut_volume_cm3: float  # a piece cut by the field of view smaller than this is not recognisable
    sources: tuple[str, ...]


# One table: the numbers of every rule. Sample scan (ground truth, in view):
# femur 88.6 x 71.4 x 68.3 mm, 172.5 cm3 (cut above); tibia 84.7 x 64.0 x
# 36.3 mm, 99.0 cm3 (cut below); patella 46.4 x 24.6 x 44.4 mm, 18.6 cm3.
RULES = {
    #                min extent LR, AP, SI     max extent LR, AP, SI     end   shaft  min cut
    "femur": BoneRule(
        (55.0, 45.0, 40.0), (105.0, 90.0, float("inf")), 100.0, 38.0, 5.0, ("mahfouz2012", "cheng2009", "shaft")
    ),
    "tibia": BoneRule(
        (55.0, 35.0, 30.0), (100.0, 75.0, float("inf")), 90.0, 35.0, 5.0, ("mahfouz2012", "cheng2009", "shaft")
    ),
    "patella": BoneRule((28.0, 12.0, 25.0), (65.0, 38.0, 65.0), None, None, 2.0, ("iranpour2008",)),
}

#: Largest bone-to-bone gaps (mm) between bounding boxes: the femur's lowest point above the
#: tibia's highest (joint space and cartilage, widened), and the patella from the femur; and how far
#: the tibia's highest point may rise above the femur's lowest (the tibial spines, widened) (source: "joint").
#: Sample scan (ground truth): the tibia rises 9.7 mm above the femur's lowest point; the patella's box meets the femur's.
MAX_FEMUR_TIBIA_GAP_MM = 25.0
MAX_FEMUR_TIBIA_OVERLAP_MM = 20.0
MAX_PATELLA_FEMUR_GAP_MM = 25.0


@dataclass(frozen=True)
class ComponentMeasure:
    """A component's size and place in patient space."""

    volume_mm3: float
    extent_mm: np.ndarray  # (3,) LR, AP, SI
    box_lps: np.ndarray  # (2, 3) lowest and highest LPS coordinates of its voxels (their outer faces)
    cut: bool  # touches the edge of the field of view
    widest_at: float = 0.5  # height of its widest cross-section, from 0 at its inferior end to 1 at its superior end

    def to_dict(self) -> dict:
        return {
            "volume_cm3": round(self.volume_mm3 / 1000, 1),
            "extent_mm": {axis: round(float(e), 1) for axis, e in zip(AXES, self.extent_mm)},
            "cut_by_field_of_view": self.cut,
        }


class FieldOfView:
    """What of a scan's array was scanned: where a bone running out of it is cut, as at the array's edge.

    A scan resampled onto a turned grid (by a scanner console, Slicer or
    this project's tests) is filled with a constant, its lowest value,
    where the grid reaches beyond what was scanned. A voxel lies outside the
    field of view when a straight run of that value joins it to the array's
    edge along one of the axes: every voxel outside a convex scanned region
    has such a run (a separating plane leaves one axis direction free of the
    region). Exactly-zero air around the knee (the sample scan's air is) is
    outside by this rule, and no bone borders on air; zero-valued voxels
    inside a bone (noise in dark cortex) are not, since tissue lies between
    them and the edge.

    The runs are found on first use (about 1.5 s for a 512 x 512 x 286
    scan), and only where a bone borders on the lowest value at all.
    """

    def __init__(self, image: np.ndarray):
        self.image = np.asarray(image)
        self.lowest = self.image.min()
        self._reach = None

    def _scanned_reach(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per axis, the first and last index along each line that holds a value above the lowest."""
        if self._reach is None:
            scanned = self.image != self.lowest
            self._reach = []
            for axis, size in enumerate(scanned.shape):
                holds = scanned.any(axis=axis)
                first = np.where(holds, scanned.argmax(axis=axis), size)
                last = np.where(holds, size - 1 - np.flip(scanned, axis=axis).argmax(axis=axis), -1)
                self._reach.append((first, last))
        return self._reach

    def outside(self, kji: np.ndarray) -> np.ndarray:
        """Whether each voxel of ``kji`` ((N, 3) indices) is joined to the array's edge by a run of the lowest value."""
        kji = np.asarray(kji, dtype=np.intp).reshape(-1, 3)
        result = np.zeros(len(kji), dtype=bool)
        if len(kji) == 0:
            return result
        for axis, (first, last) in enumerate(self._scanned_reach()):
            line = tuple(kji[:, other] for other in range(3) if other != axis)
            result |= (kji[:, axis] < first[line]) | (kji[:, axis] > last[line])
        return result

    def outside_in(self, box) -> np.ndarray:
        """:meth:`outside` for every voxel of ``box`` (slices of the array): a bool array of the box's shape."""
        lowest = self.image[box] == self.lowest
        result = np.zeros(lowest.shape, dtype=bool)
        if lowest.any():
            candidates = np.argwhere(lowest)
            result[tuple(candidates.T)] = self.outside(candidates + [s.start for s in box])
        return result

    def touches(self, mask: np.ndarray, corner) -> bool:
        """Whether a voxel of ``mask`` (a crop of the scan's array at index ``corner``) has a face neighbour outside."""
        grown = tuple(slice(max(0, c - 1), c + m + 1) for c, m in zip(corner, mask.shape))
        lowest = self.image[grown] == self.lowest
        if not lowest.any():
            return False
        inside = np.zeros(lowest.shape, dtype=bool)
        inside[tuple(slice(c - g.start, c - g.start + m) for c, g, m in zip(corner, grown, mask.shape))] = mask
        beside = ndimage.binary_dilation(inside) & lowest & ~inside  # face neighbours (the default structure)
        return bool(self.outside(np.argwhere(beside) + [g.start for g in grown]).any())


def measure_boxes(
    components: np.ndarray, start, boxes, sizes, geometry: Geometry, shape, field_of_view: FieldOfView | None = None
) -> list[ComponentMeasure]:
    """Volume, LPS extent and field-of-view contact of the components of a crop of a scan.

    Parameters
    ----------
    components : ndarray of int
        Labelled components 1..n of a crop that starts at index ``start`` (k, j, i)
        of a scan array of ``shape``.
    boxes : list of tuple of slice
        Bounding box of component n + 1 in ``components``, for the components to measure.
    sizes : sequence of int
        Voxel count of each component.
    field_of_view : FieldOfView, optional
        The scan's; without it, only the array's edge cuts a bone.

    Extents are those of the voxels themselves in patient space, whatever
    the grid's directions: on a turned grid an index-space bounding box is
    up to 1.41 times larger than the bone. The extreme patient coordinates of
    a set of voxels lie at the ends of its rows (a coordinate is linear in
    the index along a row), so the rows' first and last voxels are all
    that is mapped to LPS.
    """
    voxel_mm3 = float(np.prod(geometry.spacing))
    to_lps = geometry.direction_matrix * np.asarray(geometry.spacing)
    half_voxel = 0.5 * np.abs(to_lps).sum(axis=1)  # how far a voxel's faces reach beyond its centre, per LPS axis
    start = np.asarray(start, dtype=int)
    measures = []
    for n, box in enumerate(boxes):
        corner = start + [s.start for s in box]
        mask = components[box] == n + 1
        ends_lps = geometry.index_to_lps((row_ends(mask) + corner)[:, ::-1])
        box_lps = np.stack([ends_lps.min(axis=0) - half_voxel, ends_lps.max(axis=0) + half_voxel])
        cut = any(c == 0 or c + m == size for c, m, size in zip(corner, mask.shape, shape)) or (
            field_of_view is not None and field_of_view.touches(mask, corner)
        )
        measures.append(
            ComponentMeasure(
                sizes[n] * voxel_mm3, box_lps[1] - box_lps[0], box_lps, cut, _widest_at(mask, corner, geometry)
            )
        )
    return measures


def row_ends(mask: np.ndarray) -> np.ndarray:
    """(N, 3) indices (k, j, i) of the first and last voxel of every row (along i) of a 3D ``mask`` that holds any."""
    rows = mask.any(axis=2)
    k, j = np.nonzero(rows)
    first = mask.argmax(axis=2)[k, j]
    last = mask.shape[2] - 1 - mask[:, :, ::-1].argmax(axis=2)[k, j]
    return np.concatenate([np.stack([k, j, first], axis=1), np.stack([k, j, last], axis=1)])


#: Height of the slabs (mm) in which a component's cross-section is measured along the patient's axis.
_SLAB_MM = 4.0


def _widest_at(mask: np.ndarray, corner, geometry: Geometry) -> float:
    """Where along the superior axis a component is widest: 0 at its inferior end, 1 at its superior end.

    From the voxel count per slab of :data:`_SLAB_MM` in patient space (every
    second voxel along each axis, enough for a profile).
    """
    k, j, i = np.nonzero(mask[::2, ::2, ::2])
    if len(k) == 0:
        return 0.5
    to_lps = geometry.direction_matrix * np.asarray(geometry.spacing)
    corner = np.asarray(corner, dtype=float)
    superior = (
        to_lps[2, 0] * (2 * i + corner[2]) + to_lps[2, 1] * (2 * j + corner[1]) + to_lps[2, 2] * (2 * k + corner[0])
    )
    low, high = float(superior.min()), float(superior.max())
    if high - low < 2 * _SLAB_MM:
        return 0.5
    counts = np.bincount(((superior - low) // _SLAB_MM).astype(int))
    return float((np.argmax(counts) + 0.5) * _SLAB_MM / (high - low))


def max_volume_mm3(rule: BoneRule, height_mm: float) -> float:
    """The most a bone of ``rule`` can hold over ``height_mm`` of its length (see module doc)."""
    width, depth, most_height = rule.max_extent_mm
    if rule.end_height_mm is None:
        return np.pi / 6 * width * depth * most_height
    end = min(height_mm, rule.end_height_mm)
    return np.pi / 4 * (width * depth * end + rule.max_shaft_mm**2 * max(height_mm - end, 0.0))


def bone_reasons(bone: str, measure: ComponentMeasure) -> list[str]:
    """Why a component cannot be ``bone`` by its size, in plain words; empty if it can."""
    rule = RULES[bone]
    reasons = []
    for axis, extent, most in zip(AXES, measure.extent_mm, rule.max_extent_mm):
        if extent > most:
            reasons.append(f"{extent:.0f} mm {axis}, more than a {bone} spans ({most:.0f} mm at most)")
    most_volume = max_volume_mm3(rule, float(measure.extent_mm[2]))
    if measure.volume_mm3 > most_volume:
        reasons.append(
            f"{measure.volume_mm3 / 1000:.0f} cm3, more than a {bone} holds over {measure.extent_mm[2]:.0f} mm "
            f"of its length ({most_volume / 1000:.0f} cm3 at most)"
        )
    if measure.cut:
        if measure.volume_mm3 < 1000 * rule.min_cut_volume_cm3:
            reasons.append(
                f"{measure.volume_mm3 / 1000:.1f} cm3 at the edge of the field of view, too little to tell it is a {bone}"
            )
    else:
        for axis, extent, least in zip(AXES, measure.extent_mm, rule.min_extent_mm):
            if extent < least:
                reasons.append(f"{extent:.0f} mm {axis}, less than a whole {bone} spans ({least:.0f} mm at least)")
    return reasons


def assignment_reasons(assignment: dict, measures: list[ComponentMeasure]) -> list[str]:
    """Why naming components as ``assignment`` (bone -> component index) is implausible; empty if it is not.

    Checks each bone's size (:func:`bone_reasons`) and where the bones lie
    relative to each other: the femur at most :data:`MAX_FEMUR_TIBIA_GAP_MM`
    above the tibia, which rises at most :data:`MAX_FEMUR_TIBIA_OVERLAP_MM`
    above the femur's lowest point; the patella within
    :data:`MAX_PATELLA_FEMUR_GAP_MM` of the femur.
    """
    reasons = [reason for bone, n in assignment.items() for reason in bone_reasons(bone, measures[n])]
    boxes = {bone: measures[n].box_lps for bone, n in assignment.items()}
    if "femur" in boxes and "tibia" in boxes:
        gap = boxes["femur"][0, 2] - boxes["tibia"][1, 2]  # LPS +z is superior
        if gap > MAX_FEMUR_TIBIA_GAP_MM:
            reasons.append(
                f"femur {gap:.0f} mm above the tibia, more than a knee joint's gap ({MAX_FEMUR_TIBIA_GAP_MM:.0f} mm)"
            )
        if -gap > MAX_FEMUR_TIBIA_OVERLAP_MM:
            reasons.append(
                f"tibia reaching {-gap:.0f} mm above the femur's lowest point, more than the tibial spines do ({MAX_FEMUR_TIBIA_OVERLAP_MM:.0f} mm)"
            )
    if "femur" in boxes and "patella" in boxes:
        gap = box_gap_mm(boxes["femur"], boxes["patella"])
        if gap > MAX_PATELLA_FEMUR_GAP_MM:
            reasons.append(
                f"patella {gap:.0f} mm from the femur, too far to articulate with it ({MAX_PATELLA_FEMUR_GAP_MM:.0f} mm at most)"
            )
    return reasons


def box_gap_mm(first: np.ndarray, second: np.ndarray) -> float:
    """Shortest distance between two axis-aligned boxes given as (2, 3) low/high corners; 0 if they overlap."""
    gaps = np.maximum(0.0, np.maximum(first[0] - second[1], second[0] - first[1]))
    return float(np.linalg.norm(gaps))
