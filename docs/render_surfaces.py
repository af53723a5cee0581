"""Render bone surfaces into a PNG with VTK off screen: the STL files of a segmentation, or a label map's bones.

Makes the README's pictures (the STL files ``kneeboneseg segment`` wrote, and
the annotated sample scan's ground truth) and the Slicer module's icon::

    python docs/render_surfaces.py knee_bones/ docs/images/segmented_stl.png

    python docs/render_surfaces.py $KNEEBONESEG_SAMPLE_DIR/knee_bones_labels.nrrd docs/images/kneeboneseg_3d.png
    python docs/render_surfaces.py $KNEEBONESEG_SAMPLE_DIR/knee_bones_labels.nrrd \
        KneeBoneSeg/Resources/Icons/KneeBoneSeg.png --size 128 --background none

A folder is read as its ``femur.stl``, ``tibia.stl`` and ``patella.stl``; a
label map's surfaces come from :func:`KneeBoneSegLib.postprocess.surfaces.bone_surface`
(the library's own, as written to the STL files). Colours from :mod:`KneeBoneSegLib.anatomy`.
The view looks at the knee from the front (anterior), slightly from the
patient's right and above, in LPS millimetres. Off-screen rendering needs
VTK's EGL or OSMesa back end (the PyPI VTK wheels have EGL); without a GPU or
EGL, run it under ``xvfb-run``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

from KneeBoneSegLib.anatomy import BONES
from KneeBoneSegLib.io.images import read_volume
from KneeBoneSegLib.io.meshes import read_stl
from KneeBoneSegLib.postprocess.surfaces import Surface, bone_surface, to_vtk_polydata

log = logging.getLogger("render_surfaces")


def surface_actor(surface: Surface, color) -> vtk.vtkActor:
    """A lit, smooth-shaded actor of a surface."""
    polydata = to_vtk_polydata(surface)
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(polydata)
    normals.SplittingOff()
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(normals.GetOutputPort())
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*color)
    actor.GetProperty().SetSpecular(0.25)
    actor.GetProperty().SetSpecularPower(20)
    return actor


def render(surfaces: dict, size: int, background: str) -> vtk.vtkImageData:
    """Render ``surfaces`` (bone key -> Surface) into an RGBA image of ``size`` x ``size`` pixels."""
    renderer = vtk.vtkRenderer()
    for bone in BONES:
        if bone.key in surfaces:
            renderer.AddActor(surface_actor(surfaces[bone.key], bone.color))
    transparent = background == "none"
    renderer.SetBackground(*(0.0, 0.0, 0.0) if transparent else vtk.vtkNamedColors().GetColor3d(background))
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetAlphaBitPlanes(1)
    window.SetMultiSamples(8)
    window.SetSize(size, size)
    window.AddRenderer(renderer)

    # LPS: the camera stands in front of the knee (-P = anterior), well to the
    # patient's right (-L) and above (+S); superior is up on screen.
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(0, 0, 0)
    camera.SetPosition(-0.9, -1.0, 0.3)
    camera.SetViewUp(0, 0, 1)
    renderer.ResetCamera()
    camera.Zoom(1.35)
    window.Render()

    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.SetInputBufferTypeToRGBA()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    if not transparent:
        return image
    # The background is cleared to black; lit bone surfaces never are exactly black.
    rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    rgba[:, 3] = np.where(rgba[:, :3].any(axis=1), 255, 0)
    return image


def label_surfaces(labels, smoothing_iterations: int) -> dict:
    """Bone key -> smoothed surface of each bone present in a label map."""
    surfaces = {}
    for bone in BONES:
        mask = labels.array == bone.label
        if mask.any():
            surfaces[bone.key], report = bone_surface(mask, labels.geometry, smoothing_iterations=smoothing_iterations)
            log.info(
                "%s: %d triangles, %.1f cm3, watertight %s",
                bone.name,
                report["faces"],
                report["volume_mm3"] / 1000,
                report["watertight"],
            )
    return surfaces


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "labels",
        type=Path,
        help="label map (1 femur, 2 tibia, 3 patella), or a folder with femur.stl, tibia.stl, patella.stl",
    )
    parser.add_argument("output", type=Path, help="PNG file to write")
    parser.add_argument("--size", type=int, default=800, help="width and height in pixels (default: 800)")
    parser.add_argument(
        "--background", default="white", help="a VTK colour name, or 'none' for transparent (default: white)"
    )
    parser.add_argument("--smoothing-iterations", type=int, default=20, help="Laplacian smoothing steps (default: 20)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.labels.is_dir():
        surfaces = {
            bone.key: read_stl(args.labels / f"{bone.key}.stl")
            for bone in BONES
            if (args.labels / f"{bone.key}.stl").is_file()
        }
        log.info("Read %s from %s", ", ".join(f"{key}.stl" for key in surfaces), args.labels)
    else:
        surfaces = label_surfaces(read_volume(args.labels), args.smoothing_iterations)
    image = render(surfaces, args.size, args.background)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(args.output))
    writer.SetInputData(image)
    writer.Write()
    log.info("Wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
