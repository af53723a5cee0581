"""The three knee bones: label values, names, display colours and terminology codes.

Codes are SNOMED CT, as Slicer's terminology module and DICOM SEG expect
(category "Anatomical Structure", type "Bone structure of ..."). This table is
the one place that says which label is which bone: the label map, the
``.seg.nrrd`` writer, the STL names and the Slicer module all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")


@dataclass(frozen=True)
class Bone:
    label: int
    name: str
    color: tuple[float, float, float]  # RGB in [0, 1]
    snomed: tuple[str, str, str]  # (coding scheme, code value, code meaning)

    @property
    def key(self) -> str:
        """Lower-case name used in file names and JSON keys."""
        return self.name.lower()


BONES = (
    Bone(1, "Femur", (0.94, 0.84, 0.57), ("SCT", "71341001", "Bone structure of femur")),
    Bone(2, "Tibia", (0.56, 0.74, 0.86), ("SCT", "12611008", "Bone structure of tibia")),
    Bone(3, "Patella", (0.86, 0.50, 0.45), ("SCT", "64234005", "Bone structure of patella")),
)

BONE_BY_LABEL = {bone.label: bone for bone in BONES}
BONE_BY_KEY = {bone.key: bone for bone in BONES}
