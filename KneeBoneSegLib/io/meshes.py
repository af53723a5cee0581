"""Surface files: binary STL in LPS millimetres, through VTK's writer and reader."""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from ..atomic import atomic_file
from ..errors import InputError
from ..postprocess.surfaces import Surface, to_vtk_polydata


def write_stl(surface: Surface, path) -> None:
    """Write ``surface`` as a binary STL in LPS millimetres (VTK's writer), whole or not at all.

    The header says ``SPACE=LPS``, which 3D Slicer reads to place the model.
    """
    writer = vtk.vtkSTLWriter()
    writer.SetInputData(to_vtk_polydata(surface))
    writer.SetFileTypeToBinary()
    writer.SetHeader("KneeBoneSeg surface SPACE=LPS units=mm")
    with atomic_file(path) as temporary:
        writer.SetFileName(str(temporary))
        if not writer.Write():
            raise OSError(f"VTK could not write {temporary.name}")


def read_stl(path) -> Surface:
    """Read an STL file (VTK's reader, vertices merged by position)."""
    reader = vtk.vtkSTLReader()
    reader.SetFileName(str(path))
    reader.Update()
    polydata = reader.GetOutput()
    if polydata.GetNumberOfPolys() == 0:
        raise InputError(f"{path} holds no triangles; it is not an STL surface")
    vertices = numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()).astype(np.float64)
    faces = numpy_support.vtk_to_numpy(polydata.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return Surface(vertices, faces.astype(np.int64))
