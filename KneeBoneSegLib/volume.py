"""A voxel array with the geometry that places it in patient space.

Arrays follow SimpleITK's index order: ``array[k, j, i]`` where ``i`` is the
image's first axis (columns). Geometry follows ITK/DICOM conventions: spacing
and origin in millimetres, ``direction`` a 3x3 matrix whose columns are the
unit vectors of the i, j, k axes in LPS patient coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid lies in LPS patient space (millimetres)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(float(d) for d in np.ravel(self.direction)))
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("Geometry needs 3 spacings, 3 origin values and a 3x3 direction")

    @property
    def direction_matrix(self) -> np.ndarray:
        """3x3 matrix; column n is the LPS direction of image axis n (i, j, k)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k, 1) to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_matrix * np.asarray(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k, 1) to RAS millimetres (Slicer's world)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.ijk_to_lps

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Map an (N, 3) array of continuous (i, j, k) indices to LPS millimetres."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ (self.direction_matrix * np.asarray(self.spacing)).T + np.asarray(self.origin)

    def turned(self, rotation, shape_kji) -> "Geometry":
        """This grid (of ``shape_kji`` voxels) turned by ``rotation`` (3x3, in LPS) about its centre.

        The same spacing and size; what was at the grid's centre stays there,
        as on a scan acquired on oblique planes through the same point.
        """
        rotation = np.asarray(rotation, dtype=float)
        centre = self.index_to_lps((np.asarray(shape_kji, dtype=float)[::-1] - 1)[None] / 2)[0]
        direction = rotation @ self.direction_matrix
        origin = centre - direction @ (np.asarray(self.spacing) * (np.asarray(shape_kji, dtype=float)[::-1] - 1) / 2)
        return Geometry(self.spacing, tuple(origin), direction.ravel())

    def cropped(self, start_kji) -> "Geometry":
        """Geometry of a sub-array that starts at array index ``start_kji`` (k, j, i)."""
        start_ijk = np.asarray(start_kji, dtype=float)[::-1]
        return Geometry(self.spacing, tuple(self.index_to_lps(start_ijk[None])[0]), self.direction)


@dataclass
class Volume:
    """A 3D image: ``array[k, j, i]`` plus its :class:`Geometry` and, from DICOM, a few acquisition tags."""

    array: np.ndarray
    geometry: Geometry
    tags: dict = field(default_factory=dict)  # DICOM keyword -> value (io.DICOM_TAGS); empty for other files

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape[::-1])
