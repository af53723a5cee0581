"""The Slicer module's run handling, on real MRML nodes (slicer-core) and real worker processes.

What the panel offers while a run or an install is under way is decided by
``panel_state`` (``test_slicer_panel.py``) and the first-use install by
``ensure_requirements`` (``test_slicer_environment.py``); the widget only shows
their answers and its dialogs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import knee_phantom

slicer = pytest.importorskip("slicer", reason="needs the PyPI package slicer-core")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes (install slicer-core)", allow_module_level=True)

import vtk  # noqa: E402

from KneeBoneSegLib.options import SegmentOptions  # noqa: E402
from KneeBoneSegLib.slicer.logic import SegmentationRuns  # noqa: E402
from KneeBoneSegLib.slicer.mrml import volume_from_node, volume_to_node  # noqa: E402
from KneeBoneSegLib.slicer.panel import export_folder  # noqa: E402
from KneeBoneSegLib.volume import Volume  # noqa: E402

LIBRARY_FOLDER = str(Path(__file__).resolve().parents[2])
OPTIONS = SegmentOptions(
    projections=1, fusion="or", closing_radius=1.0, closing_units="voxels", smoothing_iterations=2, device="cpu"
)


def _work_folders(folder: Path) -> list:
    return sorted(path.name for path in folder.glob("KneeBoneSeg-*"))


def _phantom_volume(scene, name, origin_shift=0.0):
    image, _, geometry = knee_phantom(shape=(52, 48, 48))  # wider than one 64^3 sub-volume on the model's 0.7 mm grid
    geometry = type(geometry)(
        geometry.spacing, tuple(np.add(geometry.origin, (origin_shift, 0.0, 0.0))), geometry.direction
    )
    return volume_to_node(Volume(image, geometry), scene, name)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """One real network run (shipped model, one projection) on a small phantom, finished into its own node."""
    temporary = tmp_path_factory.mktemp("slicer-temp")
    scene = slicer.vtkMRMLScene()
    knee = _phantom_volume(scene, "knee")
    other = _phantom_volume(scene, "other knee", origin_shift=200.0)
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "knee bones")
    runs = SegmentationRuns([sys.executable], LIBRARY_FOLDER, str(temporary))
    progress = []
    run = runs.start(knee, target, OPTIONS, on_progress=lambda stage, fraction: progress.append(stage))
    # The user now picks the other volume and a new output; the run must not follow.
    run.worker.wait()
    assert run.worker.error is None, run.worker.error
    node = runs.finish(run, scene)
    return {
        "scene": scene,
        "runs": runs,
        "knee": knee,
        "other": other,
        "target": target,
        "node": node,
        "temporary": temporary,
        "progress": progress,
        "run": run,
    }


@pytest.mark.slow
def test_a_run_fills_the_nodes_it_started_with(segmented):
    scene, knee, target = segmented["scene"], segmented["knee"], segmented["target"]
    assert segmented["node"] is target
    assert target.GetSegmentation().GetNumberOfSegments() >= 1
    assert segmented["progress"], "no progress arrived from the worker"
    # The bones lie on the knee's grid, not on the other volume 200 mm away.
    centre = np.array(target.GetSegmentCenterRAS(target.GetSegmentation().GetNthSegmentID(0)))
    knee_bounds, other_bounds = [0.0] * 6, [0.0] * 6
    knee.GetRASBounds(knee_bounds)
    segmented["other"].GetRASBounds(other_bounds)
    assert all(knee_bounds[2 * a] <= centre[a] <= knee_bounds[2 * a + 1] for a in range(3))
    assert not all(other_bounds[2 * a] <= centre[a] <= other_bounds[2 * a + 1] for a in range(3))
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1
    assert segmented["run"].report["bones"] is not None


def test_kept_network_output_is_reused_only_while_the_volume_stays_where_it_was(segmented):
    runs, knee, scene = segmented["runs"], segmented["knee"], segmented["scene"]
    assert runs.can_reuse(knee, OPTIONS)
    # By construction: an option of the network's stage forces a new network run, one of the later stages does not.
    assert not runs.can_reuse(knee, OPTIONS.with_values(projections=3))
    assert not runs.can_reuse(knee, OPTIONS.with_values(precision="bf16"))
    assert runs.can_reuse(
        knee, OPTIONS.with_values(closing_radius=3.0, smoothing_iterations=5, threshold=0.4, device="auto", threads=1)
    )
    assert not runs.can_reuse(segmented["other"], OPTIONS)

    origin = knee.GetOrigin()
    knee.SetOrigin(origin[0] + 5.0, origin[1], origin[2])
    assert not runs.can_reuse(knee, OPTIONS), "a moved origin must force a new network run"
    knee.SetOrigin(*origin)
    assert runs.can_reuse(knee, OPTIONS)

    spacing = knee.GetSpacing()
    knee.SetSpacing(spacing[0] * 2, spacing[1], spacing[2])
    assert not runs.can_reuse(knee, OPTIONS), "a changed spacing must force a new network run"
    knee.SetSpacing(*spacing)

    directions = vtk.vtkMatrix4x4()
    knee.GetIJKToRASDirectionMatrix(directions)
    knee.SetIJKToRASDirections(0, 1, 0, 1, 0, 0, 0, 0, -1)
    assert not runs.can_reuse(knee, OPTIONS), "changed directions must force a new network run"
    knee.SetIJKToRASDirectionMatrix(directions)
    assert runs.can_reuse(knee, OPTIONS)

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    knee.SetAndObserveTransformNodeID(transform.GetID())
    assert runs.can_reuse(knee, OPTIONS), "an identity parent transform places the voxels where they were"
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 50.0)
    transform.SetMatrixTransformToParent(shift)
    assert not runs.can_reuse(knee, OPTIONS), "a parent transform change must force a new network run"
    knee.SetAndObserveTransformNodeID(None)
    assert runs.can_reuse(knee, OPTIONS)


def test_postprocessing_is_reapplied_only_when_it_changed_for_the_bones_it_made(segmented):
    """Slicer writes the node's values back into the widgets when it binds them: that must re-apply nothing."""
    runs, knee, target, scene = segmented["runs"], segmented["knee"], segmented["target"], segmented["scene"]
    assert not runs.reapplies(knee, target, OPTIONS), "the bones were made with these options"
    assert runs.reapplies(knee, target, OPTIONS.with_values(closing_radius=2.0))
    assert runs.reapplies(knee, target, OPTIONS.with_values(smoothing_iterations=5))
    assert not runs.reapplies(knee, target, OPTIONS.with_values(device="auto", threads=1)), (
        "a run option changes no bone"
    )
    assert not runs.reapplies(knee, target, OPTIONS.with_values(closing_radius=2.0, projections=3)), (
        "a network option needs the network"
    )
    assert not runs.reapplies(segmented["other"], target, OPTIONS.with_values(closing_radius=2.0))
    elsewhere = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "the user's own")
    assert not runs.reapplies(knee, elsewhere, OPTIONS.with_values(closing_radius=2.0)), (
        "only the segmentation the bones went to"
    )
    assert not runs.reapplies(knee, None, OPTIONS.with_values(closing_radius=2.0))
    scene.RemoveNode(elsewhere)


def test_an_edit_of_the_bones_is_told_from_a_view_of_them(segmented):
    """Replacing a segmentation asks first when someone changed it since KneeBoneSeg wrote it."""
    from KneeBoneSegLib.slicer.mrml import BINARY_LABELMAP, bone_segment_ids, edited_since_written

    scene, target = segmented["scene"], segmented["target"]
    segmentation = target.GetSegmentation()
    assert not edited_since_written(target)
    # Slice views and Show 3D make other representations; the source stays as written.
    target.CreateBinaryLabelmapRepresentation()
    target.CreateClosedSurfaceRepresentation()
    assert not edited_since_written(target)

    segment = segmentation.GetNthSegment(0)
    name = segment.GetName()
    segment.SetName("my femur")
    assert edited_since_written(target)
    segment.SetName(name)
    assert not edited_since_written(target)

    points = segment.GetRepresentation(segmentation.GetSourceRepresentationName()).GetPoints()
    point = points.GetPoint(0)
    points.SetPoint(0, point[0] + 1.0, point[1], point[2])
    assert edited_since_written(target)
    points.SetPoint(0, *point)
    assert not edited_since_written(target)

    # The Segment Editor makes the labelmap the source before it paints (on a copy: this drops the surfaces).
    copy = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "copy")
    copy.Copy(target)
    assert not edited_since_written(copy)
    copy.GetSegmentation().SetSourceRepresentationName(BINARY_LABELMAP)
    assert edited_since_written(copy)
    assert bone_segment_ids(copy) == bone_segment_ids(target)
    scene.RemoveNode(copy)

    someone_elses = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "never written by KneeBoneSeg")
    assert not edited_since_written(someone_elses), "an empty segmentation holds nothing to lose"
    someone_elses.GetSegmentation().AddEmptySegment("tumour")
    assert edited_since_written(someone_elses)
    scene.RemoveNode(someone_elses)


def test_flagged_bones_are_found_by_their_segment_ids(segmented):
    """The self-test finds each bone whatever its segment shows ("Tibia (review)")."""
    from KneeBoneSegLib.anatomy import BONES
    from KneeBoneSegLib.slicer.mrml import bone_segment_ids, mark_verdicts

    scene, target = segmented["scene"], segmented["target"]
    copy = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "copy")
    copy.Copy(target)
    present = bone_segment_ids(target)
    assert present and set(present) <= {bone.name for bone in BONES}
    verdict = {"run": "review", "reasons": ["a test"], "bones": {bone.key: {"verdict": "review"} for bone in BONES}}
    mark_verdicts(copy, verdict)
    shown = [copy.GetSegmentation().GetSegment(segment_id).GetName() for segment_id in present.values()]
    assert all(name.endswith(" (review)") for name in shown), shown
    assert bone_segment_ids(copy) == present
    scene.RemoveNode(copy)


def test_reapplying_postprocessing_reuses_the_kept_output_and_cleans_up(segmented):
    runs, knee, scene, temporary = segmented["runs"], segmented["knee"], segmented["scene"], segmented["temporary"]
    kept = _work_folders(temporary)
    assert len(kept) == 1, "only the kept network output may remain after a run"

    # Two post-processing runs at once: the first one's output node is deleted
    # while it runs (a new one is made), the second one's volume is (it fails).
    reapplied = runs.start(knee, segmented["target"], OPTIONS.with_values(closing_radius=0.0, smoothing_iterations=0))
    orphaned = runs.start(knee, None, OPTIONS)
    assert reapplied.reuse_key is None and "postprocess" in reapplied.worker._process.args
    scene.RemoveNode(segmented["target"])
    reapplied.worker.wait()
    orphaned.worker.wait()
    node = runs.finish(reapplied, scene)
    assert (
        node.GetName() == "knee bones"
        and node.GetScene() is scene
        and node.GetSegmentation().GetNumberOfSegments() >= 1
    )
    # The kept output now stands for the re-applied bones in the new node.
    assert not runs.reapplies(knee, node, OPTIONS.with_values(closing_radius=0.0, smoothing_iterations=0))
    assert runs.reapplies(knee, node, OPTIONS)

    scene.RemoveNode(knee)
    with pytest.raises(RuntimeError, match="removed from the scene"):
        runs.finish(orphaned, scene)
    assert _work_folders(temporary) == kept, "finished or failed post-processing runs must not leave their folders"

    runs.discard_kept()
    assert _work_folders(temporary) == [], "closing the scene must remove the kept output"


def test_close_stops_running_work_and_removes_every_folder(tmp_path):
    scene = slicer.vtkMRMLScene()
    knee = _phantom_volume(scene, "knee")
    runs = SegmentationRuns([sys.executable], LIBRARY_FOLDER, str(tmp_path))
    run = runs.start(knee, None, OPTIONS)
    assert _work_folders(tmp_path) and run.worker.poll()
    runs.close()
    assert _work_folders(tmp_path) == []
    assert run.worker.cancelled and not run.worker.poll()
    with pytest.raises(RuntimeError, match="cancelled"):
        runs.finish(run, scene)
    assert volume_from_node(knee).array.shape == (52, 48, 48)


def test_export_folder_is_never_the_working_directory(tmp_path):
    documents = str(tmp_path / "Documents")
    scene_folder = tmp_path / "scene"
    scene_folder.mkdir()
    assert export_folder("", ".", documents) == Path(documents)
    assert export_folder("", str(scene_folder), documents) == scene_folder
    assert export_folder(str(tmp_path), str(scene_folder), documents) == tmp_path
    assert export_folder(str(tmp_path / "gone"), str(scene_folder), documents) == scene_folder


@pytest.mark.slow
def test_a_batch_of_two_cases_ends_in_a_table_whose_rows_load_each_case(tmp_path):
    """The module's Batch section: the batch in a background process, its table as a node, a row loaded."""
    from KneeBoneSegLib.io.images import write_volume
    from KneeBoneSegLib.slicer.logic import finish_batch, load_case

    image, _, geometry = knee_phantom(shape=(52, 48, 48))
    for name, voxels in (("knee-a", image), ("knee-b", image[:, :, ::-1].copy())):
        write_volume(Volume(voxels, geometry), tmp_path / f"{name}.nrrd")
    (tmp_path / "temp").mkdir()
    runs = SegmentationRuns([sys.executable], LIBRARY_FOLDER, str(tmp_path / "temp"))
    stages = []
    worker = runs.start_batch(
        [str(tmp_path / "knee-a.nrrd"), str(tmp_path / "knee-b.nrrd")],
        str(tmp_path / "cohort"),
        OPTIONS,
        on_progress=lambda stage, fraction: stages.append(fraction),
    )
    worker.wait()
    scene = slicer.vtkMRMLScene()
    table = finish_batch(worker, scene)
    assert table.GetNumberOfRows() == 2 and table.GetCellText(0, 0) == "knee-a" and stages[-1] == 1.0
    assert not list((tmp_path / "temp").iterdir()), "the batch's work folder must be removed"

    volume_node, segmentation = load_case(scene, table, 1)
    assert volume_node.GetName() == "knee-b" and segmentation.GetName() == "knee-b bones"
    assert segmentation.GetSegmentation().GetNumberOfSegments() >= 1
    np.testing.assert_array_equal(volume_from_node(volume_node).array, image[:, :, ::-1])

    # Each click on a row (a double-click's first one too) shows the case; it is loaded once.
    def counts():
        return [
            scene.GetNodesByClass(name).GetNumberOfItems()
            for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode")
        ]

    loaded = counts()
    assert load_case(scene, table, 1) == (volume_node, segmentation) and counts() == loaded
    other_volume, other_segmentation = load_case(scene, table, 0)
    assert other_volume.GetName() == "knee-a" and counts() == [loaded[0] + 1, loaded[1] + 1]
    scene.RemoveNode(segmentation)  # half a case is loaded whole again, without a second volume
    again = load_case(scene, table, 1)
    assert (
        again[0].GetName() == "knee-b"
        and again[1].GetName() == "knee-b bones"
        and counts() == [loaded[0] + 1, loaded[1] + 1]
    )


def test_the_cases_table_uses_no_deprecated_call(tmp_path):
    """SetUseColumnNameAsColumnHeader logs a VTK warning at every batch end (deprecated since before Slicer 5.6)."""
    from KneeBoneSegLib.slicer.logic import cases_table_node

    (tmp_path / "cases.csv").write_text("id,status\nknee-a,ok\n", encoding="utf-8")
    window, previous = vtk.vtkStringOutputWindow(), vtk.vtkOutputWindow.GetInstance()
    vtk.vtkOutputWindow.SetInstance(window)
    try:
        node = cases_table_node(slicer.vtkMRMLScene(), tmp_path / "cases.csv")
    finally:
        vtk.vtkOutputWindow.SetInstance(previous)
    assert window.GetOutput() == ""
    assert node.GetUseColumnTitleAsColumnHeader()  # an empty title shows the column name (qMRMLTableModel)
