"""Outputs: the Slicer segmentation file, all-or-nothing output folders, atomic JSON."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import knee_phantom
from test_io import oblique_geometry

from KneeBoneSegLib.anatomy import ANATOMICAL_STRUCTURE, BONE_BY_LABEL, BONES
from KneeBoneSegLib.atomic import atomic_file, check_output_folder, output_directory
from KneeBoneSegLib.errors import Cancelled, OutputError
from KneeBoneSegLib.io.outputs import write_json, write_segmentation_nrrd
from KneeBoneSegLib.volume import Geometry


@pytest.fixture
def phantom_labels():
    """Femur, tibia and patella labels (k, j, i) on a non-axis-aligned, anisotropic grid."""
    _, labels, _ = knee_phantom(shape=(48, 40, 44))
    return labels, oblique_geometry(spacing=(0.45, 0.6, 1.8), origin=(-91.26, -93.23, -43.94))


# --- the .seg.nrrd -----------------------------------------------------------------------------


def test_segmentation_round_trips_through_slicerio(tmp_path, phantom_labels):
    import slicerio

    labels, geometry = phantom_labels
    path = write_segmentation_nrrd(labels, geometry, tmp_path / "bones.seg.nrrd")

    segmentation = slicerio.read_segmentation(str(path))

    np.testing.assert_array_equal(segmentation["voxels"], labels.transpose(2, 1, 0))
    np.testing.assert_allclose(segmentation["ijkToLPS"], geometry.ijk_to_lps, rtol=0, atol=1e-12)
    segments = segmentation["segments"]
    assert [segment["name"] for segment in segments] == ["Femur", "Tibia", "Patella"]
    for segment in segments:
        bone = BONE_BY_LABEL[segment["labelValue"]]
        assert segment["name"] == bone.name
        assert segment["color"] == pytest.approx(bone.color)
        assert segment["terminology"]["category"] == list(ANATOMICAL_STRUCTURE)
        assert segment["terminology"]["type"] == list(bone.snomed)
        assert segment["layer"] == 0


def test_segmentation_reads_with_simpleitk_on_the_same_grid(tmp_path, phantom_labels):
    labels, geometry = phantom_labels
    path = write_segmentation_nrrd(labels, geometry, tmp_path / "bones.seg.nrrd")

    image = sitk.ReadImage(str(path))

    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    np.testing.assert_allclose(image.GetSpacing(), geometry.spacing, rtol=0, atol=1e-12)
    np.testing.assert_allclose(image.GetOrigin(), geometry.origin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(image.GetDirection(), geometry.direction, rtol=0, atol=1e-12)


def test_segmentation_lists_only_the_bones_present(tmp_path, phantom_labels):
    import slicerio

    labels, geometry = phantom_labels
    without_patella = np.where(labels == 3, 0, labels).astype(np.uint8)

    path = write_segmentation_nrrd(without_patella, geometry, tmp_path / "bones.seg.nrrd")

    assert slicerio.segment_names(slicerio.read_segmentation(str(path), skip_voxels=True)) == ["Femur", "Tibia"]


def test_slicer_opens_the_segmentation_with_names_colours_codes_and_geometry(tmp_path, phantom_labels):
    slicer = pytest.importorskip("slicer", reason="slicer-core (3D Slicer's MRML libraries) is not installed")
    from vtk import vtkMatrix4x4
    from vtk.util.numpy_support import vtk_to_numpy

    labels, geometry = phantom_labels
    path = write_segmentation_nrrd(labels, geometry, tmp_path / "bones.seg.nrrd")
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))

    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(BONES)
    for number, bone in enumerate(BONES):
        segment = segmentation.GetNthSegment(number)
        assert segment.GetName() == bone.name
        assert segment.GetColor() == pytest.approx(bone.color)
        terminology = segment.GetTerminology()
        assert f"{'^'.join(ANATOMICAL_STRUCTURE)}~{'^'.join(bone.snomed)}" in terminology
        labelmap = segment.GetRepresentation("Binary labelmap")
        image_to_world = vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(image_to_world)
        matrix = np.array([[image_to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
        # Slicer's world is RAS; the labelmap starts at its extent's first voxel.
        start_ijk = np.array(labelmap.GetExtent()[::2], float)
        ras_start = geometry.ijk_to_ras @ np.append(start_ijk, 1)
        np.testing.assert_allclose(matrix[:3, :3], geometry.ijk_to_ras[:3, :3], rtol=0, atol=1e-9)
        np.testing.assert_allclose(matrix @ [0, 0, 0, 1], ras_start, rtol=0, atol=1e-9)
        voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars())
        assert np.count_nonzero(voxels == segment.GetLabelValue()) == np.count_nonzero(labels == bone.label)


def test_segmentation_refuses_labels_that_are_not_bones(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 1, 1] = 7
    with pytest.raises(ValueError, match="0..3"):
        write_segmentation_nrrd(labels, Geometry((1, 1, 1), (0, 0, 0)), tmp_path / "bad.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


# --- output_directory --------------------------------------------------------------------------


def names_in(folder):
    return sorted(path.name for path in folder.iterdir())


def test_outputs_appear_only_when_the_run_succeeds(tmp_path):
    outdir = tmp_path / "results"

    with output_directory(outdir) as staging:
        (staging / "labels.nrrd").write_text("labels")
        (staging / "femur.stl").write_text("femur")
        assert not outdir.exists()
        assert staging.parent == tmp_path and staging.name.startswith(".")

    assert names_in(outdir) == ["femur.stl", "labels.nrrd"]
    assert names_in(tmp_path) == ["results"]


@pytest.mark.parametrize(
    "stop", [RuntimeError("network failed"), Cancelled("stopped by the user"), KeyboardInterrupt()]
)
def test_a_failed_or_cancelled_run_leaves_nothing(tmp_path, stop):
    outdir = tmp_path / "results"

    with pytest.raises(type(stop)):
        with output_directory(outdir) as staging:
            (staging / "labels.nrrd").write_text("labels")
            raise stop

    assert names_in(tmp_path) == []


def test_a_failed_run_leaves_an_existing_folder_as_it_was(tmp_path):
    outdir = tmp_path / "results"
    outdir.mkdir()
    (outdir / "femur.stl").write_text("old femur")

    with pytest.raises(RuntimeError):
        with output_directory(outdir, overwrite=True) as staging:
            (staging / "femur.stl").write_text("new femur")
            raise RuntimeError("surface failed")

    assert names_in(tmp_path) == ["results"]
    assert (outdir / "femur.stl").read_text() == "old femur"


def test_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    outdir = tmp_path / "results"
    outdir.mkdir()
    (outdir / "notes.txt").write_text("mine")

    with pytest.raises(OutputError, match="already holds files") as raised:
        with output_directory(outdir):
            pytest.fail("the body must not run")

    assert str(outdir) in str(raised.value)
    assert names_in(outdir) == ["notes.txt"]
    assert names_in(tmp_path) == ["results"]


def test_the_folder_check_before_a_run_writes_nothing_and_names_what_to_do(tmp_path):
    outdir = tmp_path / "results"
    check_output_folder(outdir / "new" / "deeper")  # a folder still to be made is fine, and is not made yet
    assert names_in(tmp_path) == []
    outdir.mkdir()
    (outdir / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="already holds files.*--overwrite"):
        check_output_folder(outdir)
    check_output_folder(outdir, overwrite=True)
    with pytest.raises(OutputError, match="notes.txt is a file"):
        check_output_folder(outdir / "notes.txt")
    assert names_in(tmp_path) == ["results"] and (outdir / "notes.txt").read_text() == "mine"


def test_an_empty_existing_folder_is_used(tmp_path):
    outdir = tmp_path / "results"
    outdir.mkdir()

    with output_directory(outdir) as staging:
        (staging / "report.json").write_text("{}")

    assert names_in(outdir) == ["report.json"]
    assert names_in(tmp_path) == ["results"]


def test_overwrite_replaces_the_files_written_and_keeps_the_others(tmp_path):
    outdir = tmp_path / "results"
    (outdir / "stl").mkdir(parents=True)
    (outdir / "stl" / "femur.stl").write_text("old femur")
    (outdir / "notes.txt").write_text("mine")

    with output_directory(outdir, overwrite=True) as staging:
        (staging / "stl").mkdir()
        (staging / "stl" / "femur.stl").write_text("new femur")
        (staging / "report.json").write_text("{}")

    assert (outdir / "stl" / "femur.stl").read_text() == "new femur"
    assert (outdir / "notes.txt").read_text() == "mine"
    assert names_in(outdir) == ["notes.txt", "report.json", "stl"]
    assert names_in(tmp_path) == ["results"]


def test_refuses_to_overwrite_an_input(tmp_path):
    outdir = tmp_path / "results"
    outdir.mkdir()
    mask = outdir / "labels.nrrd"
    mask.write_text("the user's mask")

    with pytest.raises(OutputError, match="is an input of this run") as raised:
        with output_directory(outdir, overwrite=True, inputs=[mask]) as staging:
            (staging / "labels.nrrd").write_text("new labels")
            (staging / "femur.stl").write_text("femur")

    assert str(mask) in str(raised.value)
    assert mask.read_text() == "the user's mask"
    assert names_in(outdir) == ["labels.nrrd"]
    assert names_in(tmp_path) == ["results"]


def test_refuses_to_overwrite_a_file_of_an_input_dicom_folder(tmp_path):
    dicom = tmp_path / "series"
    dicom.mkdir()
    (dicom / "slice_001.dcm").write_text("a slice")

    with pytest.raises(OutputError, match="is an input of this run"):
        with output_directory(dicom, overwrite=True, inputs=[dicom, None]) as staging:
            (staging / "slice_001.dcm").write_text("an output")

    assert (dicom / "slice_001.dcm").read_text() == "a slice"


def test_an_input_inside_the_folder_that_is_not_overwritten_is_fine(tmp_path):
    outdir = tmp_path / "results"
    outdir.mkdir()
    mask = outdir / "edited_mask.nrrd"
    mask.write_text("the user's mask")

    with output_directory(outdir, overwrite=True, inputs=[mask]) as staging:
        (staging / "femur.stl").write_text("femur")

    assert names_in(outdir) == ["edited_mask.nrrd", "femur.stl"]
    assert mask.read_text() == "the user's mask"


def test_refuses_a_file_as_output_folder(tmp_path):
    not_a_folder = tmp_path / "results"
    not_a_folder.write_text("a file")

    with pytest.raises(OutputError, match="is a file"):
        with output_directory(not_a_folder, overwrite=True):
            pytest.fail("the body must not run")


def test_refuses_a_parent_that_cannot_hold_folders(tmp_path):
    # A file as parent stops even root, unlike permissions.
    parent = tmp_path / "plain_file"
    parent.write_text("not a folder")

    with pytest.raises(OutputError, match="cannot be made: .*plain_file is a file") as raised:
        with output_directory(parent / "results"):
            pytest.fail("the body must not run")

    assert str(parent) in str(raised.value)


def test_refuses_a_read_only_parent(tmp_path):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        probe = parent / "probe"
        try:
            probe.mkdir()
        except PermissionError:
            pass
        else:
            probe.rmdir()
            pytest.skip(
                "running with privileges that ignore folder permissions (root): chmod 0o500 does not stop writes"
            )

        with pytest.raises(OutputError, match="cannot write in") as raised:
            with output_directory(parent / "results"):
                pytest.fail("the body must not run")
        assert str(parent) in str(raised.value)
    finally:
        parent.chmod(0o700)


def test_creates_missing_parent_folders(tmp_path):
    outdir = tmp_path / "patient" / "knee" / "results"

    with output_directory(outdir) as staging:
        (staging / "report.json").write_text("{}")

    assert names_in(outdir) == ["report.json"]
    assert names_in(outdir.parent) == ["results"]


def test_new_folders_follow_the_umask_not_private_temp_modes(tmp_path):
    outdir = tmp_path / "results"
    old_umask = os.umask(0o022)
    try:
        with output_directory(outdir) as staging:
            (staging / "report.json").write_text("{}")
    finally:
        os.umask(old_umask)

    assert outdir.stat().st_mode & 0o777 == 0o755


# --- JSON and single files ---------------------------------------------------------------------


def test_write_json_converts_numpy_values_paths_and_non_finite_numbers(tmp_path):
    data = {
        "voxels": np.int64(3964981),
        "dice": np.float32(0.984375),
        "spacing": np.array([0.35, 0.35, 0.352]),
        "found": np.bool_(True),
        "input": tmp_path / "knee.nrrd",
        "surface_mm": (np.float64(1.5), float("nan")),
        np.int64(3): {"hausdorff": float("inf")},
    }

    path = write_json(data, tmp_path / "report.json")

    assert json.loads(path.read_text()) == {
        "voxels": 3964981,
        "dice": 0.984375,
        "spacing": [0.35, 0.35, 0.352],
        "found": True,
        "input": str(tmp_path / "knee.nrrd"),
        "surface_mm": [1.5, None],
        "3": {"hausdorff": None},
    }


def test_write_json_replaces_a_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "report.json"
    write_json({"run": 1}, path)

    with pytest.raises(TypeError):
        write_json({"run": 2, "model": object()}, path)
    assert json.loads(path.read_text()) == {"run": 1}

    write_json({"run": 3}, path)
    assert json.loads(path.read_text()) == {"run": 3}
    assert names_in(tmp_path) == ["report.json"]


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "labels.nii.gz"
    path.write_text("old")

    with pytest.raises(RuntimeError):
        with atomic_file(path) as temporary:
            assert temporary.name.endswith(".labels.nii.gz") and temporary.parent == tmp_path
            temporary.write_text("half")
            raise RuntimeError("disk full")

    assert path.read_text() == "old"
    assert names_in(tmp_path) == ["labels.nii.gz"]


@pytest.mark.parametrize("existing", [False, True])
def test_two_runs_into_the_same_new_or_empty_folder_do_not_replace_each_other(tmp_path, existing):
    outdir = tmp_path / "out"
    if existing:
        outdir.mkdir()
    first, second = output_directory(outdir), output_directory(outdir)
    first_staging, second_staging = first.__enter__(), second.__enter__()  # both started while the folder was empty
    (first_staging / "summary.json").write_text("first")
    (second_staging / "summary.json").write_text("second")
    first.__exit__(None, None, None)
    with pytest.raises(OutputError, match="already holds files"):
        second.__exit__(None, None, None)
    assert (outdir / "summary.json").read_text() == "first"
    assert sorted(p.name for p in outdir.iterdir()) == ["summary.json"] and not second_staging.exists()
