"""The bridge between Slicer's scene and the library, on real MRML nodes from the PyPI package slicer-core."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import knee_phantom

slicer = pytest.importorskip("slicer", reason="needs the PyPI package slicer-core")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes (install slicer-core)", allow_module_level=True)

from KneeBoneSegLib.anatomy import BONES  # noqa: E402
from KneeBoneSegLib.errors import InputError  # noqa: E402
from KneeBoneSegLib.io.images import volume_to_image  # noqa: E402
from KneeBoneSegLib.io.meshes import read_stl  # noqa: E402
from KneeBoneSegLib.postprocess.surfaces import bone_surface, enclosed_volume  # noqa: E402
from KneeBoneSegLib.slicer.mrml import (  # noqa: E402
    CLOSED_SURFACE,
    export_segments_to_stl,
    labels_to_segmentation_node,
    volume_from_node,
    volume_to_node,
)
from KneeBoneSegLib.volume import Geometry, Volume  # noqa: E402

# SNOMED CT codes of the three bones, as published (not read from the code under test).
SNOMED_BONE_STRUCTURE = {"Femur": "71341001", "Tibia": "12611008", "Patella": "64234005"}
SNOMED_ANATOMICAL_STRUCTURE = "123037004"


def _rotation(axis, degrees):
    """Rodrigues' rotation matrix about ``axis``."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


ROTATION = _rotation((1.0, 2.0, 0.5), 33.0)
#: Non-axis-aligned and anisotropic; left-handed (one axis flipped), as some NRRD files are.
OBLIQUE_LEFT_HANDED = Geometry((0.4, 0.75, 1.9), (12.5, -40.0, 7.25), (ROTATION @ np.diag([1.0, -1.0, 1.0])).ravel())
#: Non-axis-aligned and anisotropic, right-handed, as scanners write them.
OBLIQUE = Geometry((0.6, 0.45, 0.9), (12.5, -40.0, 7.25), ROTATION.ravel())


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def _lps_of_indices(geometry: Geometry, ijk: np.ndarray) -> np.ndarray:
    """LPS positions of (i, j, k) indices, computed by SimpleITK (independently of the code under test)."""
    image = volume_to_image(Volume(np.zeros((2, 2, 2), np.uint8), geometry))
    return np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, index))) for index in ijk])


def _ras_of_indices(node, ijk: np.ndarray) -> np.ndarray:
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    return np.array([ijk_to_ras.MultiplyPoint((*map(float, index), 1.0))[:3] for index in ijk])


CORNERS_AND_MORE = np.array([[0, 0, 0], [6, 0, 0], [0, 5, 0], [0, 0, 4], [6, 5, 4], [2.5, 1.25, 3.5]])


def test_oblique_anisotropic_volume_survives_the_round_trip(scene, rng):
    oblique = OBLIQUE_LEFT_HANDED
    array = rng.integers(0, 4000, size=(5, 6, 7), dtype=np.uint16)  # k, j, i: all sizes different
    node = volume_to_node(Volume(array, oblique), scene, "oblique")

    # Slicer places each voxel where ITK does, with x and y negated (RAS vs LPS).
    expected_lps = _lps_of_indices(oblique, CORNERS_AND_MORE)
    np.testing.assert_allclose(_ras_of_indices(node, CORNERS_AND_MORE), expected_lps * [-1, -1, 1], atol=1e-9)
    np.testing.assert_allclose(node.GetSpacing(), oblique.spacing)
    assert node.GetImageData().GetDimensions() == (7, 6, 5)

    back = volume_from_node(node)
    np.testing.assert_array_equal(back.array, array)
    assert back.array.dtype == np.uint16
    np.testing.assert_allclose(back.geometry.spacing, oblique.spacing, atol=1e-12)
    np.testing.assert_allclose(back.geometry.origin, oblique.origin, atol=1e-12)
    np.testing.assert_allclose(back.geometry.direction, oblique.direction, atol=1e-12)


def test_a_volume_built_the_slicer_way_reads_with_itk_geometry(scene):
    # Built with Slicer's own setters, as a DICOM or NRRD reader in Slicer would.
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "native")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 3, 2)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.5, 0.8, 2.0)
    node.SetOrigin(-10.0, 20.0, 30.0)  # RAS
    node.SetIJKToRASDirections(0, -1, 0, 1, 0, 0, 0, 0, 1)  # rows R, A, S; columns i, j, k

    geometry = volume_from_node(node).geometry
    # i runs towards A (LPS -y), j towards -R (LPS +x); the origin's x and y change sign in LPS.
    np.testing.assert_allclose(geometry.direction_matrix[:, 0], [0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(geometry.direction_matrix[:, 1], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(geometry.origin, (10.0, -20.0, 30.0))
    np.testing.assert_allclose(geometry.spacing, (0.5, 0.8, 2.0))
    assert volume_from_node(node).array.shape == (2, 3, 4)


def test_volume_from_node_refuses_empty_and_colour_volumes(scene):
    import vtk

    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="'empty' holds no image data"):
        volume_from_node(empty)
    colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
    image = vtk.vtkImageData()
    image.SetDimensions(3, 3, 3)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    colour.SetAndObserveImageData(image)
    with pytest.raises(InputError, match="3 components"):
        volume_from_node(colour)


@pytest.fixture(scope="module")
def phantom():
    return knee_phantom(shape=(40, 36, 36))


def test_segments_are_named_coloured_and_coded(scene, phantom):
    _, labels, geometry = phantom
    node = labels_to_segmentation_node(labels, geometry, scene, name="knee")
    segmentation = node.GetSegmentation()

    assert node.GetName() == "knee" and node.GetScene() is scene
    assert [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())] == [
        "Femur",
        "Tibia",
        "Patella",
    ]
    for bone in BONES:
        segment = segmentation.GetSegment(bone.name)
        assert segment.GetColor() == pytest.approx(bone.color)
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()

        import vtk

        tag = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        tag = str(tag)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(tag, entry), tag
        assert entry.GetCategoryObject().GetCodingSchemeDesignator() == "SCT"
        assert entry.GetCategoryObject().GetCodeValue() == SNOMED_ANATOMICAL_STRUCTURE
        assert entry.GetTypeObject().GetCodingSchemeDesignator() == "SCT"
        assert entry.GetTypeObject().GetCodeValue() == SNOMED_BONE_STRUCTURE[bone.name]
        assert entry.GetTypeObject().GetCodeMeaning() == f"Bone structure of {bone.name.lower()}"
        assert entry.GetTerminologyContextName().startswith("Segmentation category and type")

        # The segment holds exactly the bone's voxels, and a closed surface.
        labelmap = segment.GetRepresentation(
            slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        )
        from vtk.util.numpy_support import vtk_to_numpy

        voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars())
        assert np.count_nonzero(voxels == segment.GetLabelValue()) == np.count_nonzero(labels == bone.label)
        surface = segment.GetRepresentation(CLOSED_SURFACE)
        assert surface is not None and surface.GetNumberOfPoints() > 100
    assert node.GetDisplayNode().GetPreferredDisplayRepresentationName3D() == CLOSED_SURFACE


def test_refilling_a_node_replaces_its_segments(scene, phantom):
    _, labels, geometry = phantom
    node = labels_to_segmentation_node(labels, geometry, scene)
    without_patella = np.where(labels == 3, 0, labels)
    same = labels_to_segmentation_node(without_patella, geometry, node)
    assert same is node
    assert node.GetSegmentation().GetNumberOfSegments() == 2
    assert node.GetSegmentation().GetSegment("Patella") is None


def test_exported_stl_lies_where_the_bone_is(scene, phantom, tmp_path):
    _, labels, _ = phantom
    geometry = OBLIQUE
    node = labels_to_segmentation_node(labels, geometry, scene, name="knee")
    written = export_segments_to_stl(node, tmp_path / "stl")

    assert sorted(path.name for path in written) == ["knee_Femur.stl", "knee_Patella.stl", "knee_Tibia.stl"]
    assert sorted(tmp_path.joinpath("stl").iterdir()) == sorted(written)  # no staging left behind
    voxel_mm3 = float(np.prod(geometry.spacing))
    for bone in BONES:
        path = tmp_path / "stl" / f"knee_{bone.name}.stl"
        assert b"SPACE=LPS" in path.read_bytes()[:80]
        surface = read_stl(path)
        # Voxel centres of the bone in LPS, placed by SimpleITK.
        centres = _lps_of_indices(geometry, np.argwhere(labels == bone.label)[:, ::-1])
        np.testing.assert_allclose(surface.vertices.mean(axis=0), centres.mean(axis=0), atol=1.0)
        assert np.all(surface.vertices.min(axis=0) > centres.min(axis=0) - 2.0)
        assert np.all(surface.vertices.max(axis=0) < centres.max(axis=0) + 2.0)
        volume = enclosed_volume(surface)
        assert volume == pytest.approx(np.count_nonzero(labels == bone.label) * voxel_mm3, rel=0.15)


def test_library_surfaces_are_the_ones_shown_and_exported(scene, phantom, tmp_path):
    _, labels, _ = phantom
    geometry = Geometry((0.6, 0.45, 0.9), OBLIQUE_LEFT_HANDED.origin, OBLIQUE_LEFT_HANDED.direction)
    surfaces = {bone.key: bone_surface(labels == bone.label, geometry, smoothing_iterations=5)[0] for bone in BONES}
    node = labels_to_segmentation_node(labels, geometry, scene, surfaces=surfaces, name="knee")
    export_segments_to_stl(node, tmp_path, segment_ids=["Femur"])

    assert [path.name for path in tmp_path.iterdir()] == ["knee_Femur.stl"]
    exported = read_stl(tmp_path / "knee_Femur.stl")
    original = surfaces["femur"]
    assert len(exported.faces) == len(original.faces)

    # Same points in the same place (STL stores float32), same orientation (volume sign).
    def by_position(vertices):
        return vertices[np.lexsort(vertices.T[::-1])]

    np.testing.assert_allclose(by_position(exported.vertices), by_position(original.vertices), atol=1e-4)
    # Outward normals (positive volume) even on a left-handed grid, where Slicer's own
    # labelmap-to-surface conversion turns its triangles inside out.
    assert enclosed_volume(exported) > 0
    assert enclosed_volume(exported) == pytest.approx(enclosed_volume(original), rel=1e-4)


def test_segmentation_follows_the_reference_volume(scene, phantom):
    image, labels, _ = phantom
    geometry = OBLIQUE
    volume_node = volume_to_node(Volume(image, geometry), scene, "knee MRI")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume_node.SetAndObserveTransformNodeID(transform.GetID())

    node = labels_to_segmentation_node(
        labels, volume_from_node(volume_node).geometry, scene, reference_volume_node=volume_node
    )
    assert node.GetTransformNodeID() == transform.GetID()
    # The patella's centre, as the segmentation node reports it, is the centre of its voxels.
    centre_ras = np.array(node.GetSegmentCenterRAS("Patella"))
    centres = _lps_of_indices(geometry, np.argwhere(labels == 3)[:, ::-1]) * [-1, -1, 1]
    assert np.linalg.norm(centre_ras - centres.mean(axis=0)) < 2.0


def test_console_workflow_from_volume_node_to_stl(scene, tmp_path):
    """What logic.segment + logic.exportSTL do in Slicer, minus the background process."""
    from conftest import write_threshold_onnx

    from KneeBoneSegLib.network.models import ModelCard, load_model
    from KneeBoneSegLib.pipeline import SegmentOptions, segment

    image, truth, geometry = knee_phantom()
    volume_node = volume_to_node(Volume(image, geometry), scene, "knee MRI")
    model = load_model(
        write_threshold_onnx(
            tmp_path / "threshold.onnx",
            ModelCard(name="threshold", patch_size=16, stride=8, normalization={"method": "minmax"}),
        )
    )

    options = SegmentOptions(projections=1, closing_radius=1, smoothing_iterations=5)
    result = segment(volume_from_node(volume_node), model, options)
    node = labels_to_segmentation_node(
        result.labels, result.geometry, scene, reference_volume_node=volume_node, surfaces=result.surfaces
    )
    written = export_segments_to_stl(node, tmp_path)

    assert node.GetSegmentation().GetNumberOfSegments() == 3
    assert len(written) == 3
    for bone in BONES:
        found, expected = result.labels == bone.label, truth == bone.label
        assert 2 * np.count_nonzero(found & expected) / (np.count_nonzero(found) + np.count_nonzero(expected)) > 0.9


TERMINOLOGY_FILE = (
    Path(__file__).resolve().parents[2]
    / "KneeBoneSeg"
    / "Resources"
    / "Terminologies"
    / "SegmentationCategoryType-KneeBoneSeg.term.json"
)


def _segment_tag(segment) -> str:
    import vtk

    tag = vtk.reference("")
    assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
    return str(tag)


def test_every_bone_resolves_in_the_terminology_the_extension_ships(scene, phantom):
    """Slicer's terminology logic, given the extension's file, finds each segment's category and type."""
    _, labels, geometry = phantom
    node = labels_to_segmentation_node(labels, geometry, scene)
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    loaded = logic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
    assert loaded, f"Slicer cannot load {TERMINOLOGY_FILE.name}"

    categories = []
    for n in range(logic.GetNumberOfCategoriesInTerminology(loaded)):
        category = slicer.vtkSlicerTerminologyCategory()
        assert logic.GetNthCategoryInTerminology(loaded, n, category)
        categories.append(category)
    for bone in BONES:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
            _segment_tag(node.GetSegmentation().GetSegment(bone.name)), entry
        )
        assert entry.GetTerminologyContextName() == loaded, (
            "the segment names a terminology the extension does not ship"
        )
        (category,) = [
            c
            for c in categories
            if (c.GetCodingSchemeDesignator(), c.GetCodeValue()) == ("SCT", SNOMED_ANATOMICAL_STRUCTURE)
        ]
        types = []
        for n in range(logic.GetNumberOfTypesInTerminologyCategory(loaded, category)):
            found = slicer.vtkSlicerTerminologyType()
            assert logic.GetNthTypeInTerminologyCategory(loaded, category, n, found)
            types.append(found)
        (bone_type,) = [
            t
            for t in types
            if (t.GetCodingSchemeDesignator(), t.GetCodeValue()) == ("SCT", SNOMED_BONE_STRUCTURE[bone.name])
        ]
        assert bone_type.GetCodeMeaning() == entry.GetTypeObject().GetCodeMeaning()
        np.testing.assert_allclose(
            np.array(bone_type.GetRecommendedDisplayRGBValue()) / 255, bone.color, atol=0.5 / 255
        )


def test_reference_geometry_of_a_transformed_oblique_volume_is_the_volume_grid(scene, phantom):
    import vtk

    image, labels, _ = phantom
    volume_node = volume_to_node(Volume(image, OBLIQUE), scene, "knee MRI")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved = vtk.vtkMatrix4x4()
    moved.DeepCopy(
        np.block([[ROTATION.T, np.array([[50.0], [-20.0], [10.0]])], [np.zeros((1, 3)), np.ones((1, 1))]]).ravel()
    )
    transform.SetMatrixTransformToParent(moved)
    volume_node.SetAndObserveTransformNodeID(transform.GetID())

    node = labels_to_segmentation_node(
        labels, volume_from_node(volume_node).geometry, scene, reference_volume_node=volume_node
    )
    reference = slicer.vtkOrientedImageData()
    parameter = node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    )
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(parameter, reference)
    reference_to_local = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(reference_to_local)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    # The segmentation sits under the volume's transform, so its reference grid is the volume's own, untransformed.
    from KneeBoneSegLib.slicer.mrml import matrix_to_array

    np.testing.assert_allclose(matrix_to_array(reference_to_local), matrix_to_array(ijk_to_ras), atol=1e-6)
    assert reference.GetDimensions() == volume_node.GetImageData().GetDimensions()


def _show_3d_off_and_on(node):
    """What Slicer's Show 3D button does when toggled off then on, then its smoothing menu (qMRMLSegmentationShow3DButton)."""
    segmentation = node.GetSegmentation()
    if segmentation.GetSourceRepresentationName() != CLOSED_SURFACE:
        segmentation.RemoveRepresentation(CLOSED_SURFACE)
    segmentation.CreateRepresentation(CLOSED_SURFACE)
    segmentation.SetConversionParameter("Smoothing factor", "0.9")
    if segmentation.ContainsRepresentation(CLOSED_SURFACE):
        segmentation.CreateRepresentation(CLOSED_SURFACE, True)


def test_library_surfaces_survive_show_3d_and_smoothing_toggles(scene, phantom, tmp_path):
    _, labels, geometry = phantom
    surfaces = {bone.key: bone_surface(labels == bone.label, geometry, smoothing_iterations=5)[0] for bone in BONES}
    node = labels_to_segmentation_node(labels, geometry, scene, surfaces=surfaces, name="knee")
    before = {path.name: read_stl(path) for path in export_segments_to_stl(node, tmp_path / "before")}

    _show_3d_off_and_on(node)
    after = {path.name: read_stl(path) for path in export_segments_to_stl(node, tmp_path / "after")}
    assert sorted(after) == sorted(before) == ["knee_Femur.stl", "knee_Patella.stl", "knee_Tibia.stl"]
    for name, mesh in before.items():
        np.testing.assert_array_equal(after[name].vertices, mesh.vertices, err_msg=name)
        np.testing.assert_array_equal(after[name].faces, mesh.faces, err_msg=name)
    for bone in BONES:
        assert len(after[f"knee_{bone.name}.stl"].faces) == len(surfaces[bone.key].faces), "not the library's surface"
        assert enclosed_volume(after[f"knee_{bone.name}.stl"]) == pytest.approx(
            enclosed_volume(surfaces[bone.key]), rel=1e-4
        )
    # The labels stay what the 2D views show.
    labelmap = (
        node.GetSegmentation()
        .GetSegment("Femur")
        .GetRepresentation(slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
    )
    assert labelmap is not None
