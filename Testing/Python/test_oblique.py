"""Scans acquired on oblique planes give the same bones as upright ones.

Each case turns a grid about the patient's axes around its centre (same
spacing and size, the knee where it was) and resamples a scan onto it, as a
scanner acquiring turned planes through the same point would; the ground
truth is moved the same way. On such grids an index-space box is up to 1.41
times larger than the bone it holds, the grid's planes are no longer the
patient's, and its corners are zero-filled beyond what was scanned.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import measure_components, patient_phantom, rotation, turned, write_threshold_onnx

from KneeBoneSegLib.io.images import read_volume
from KneeBoneSegLib.metrics import dice
from KneeBoneSegLib.network.models import ModelCard, default_model_path, load_model
from KneeBoneSegLib.pipeline import SegmentOptions, postprocess, segment
from KneeBoneSegLib.postprocess.components import label_bones, name_components
from KneeBoneSegLib.preprocess.resampling import MAX_ALIGNED_DEGREES, ModelGrid, obliquity_degrees
from KneeBoneSegLib.trust.plausibility import FieldOfView
from KneeBoneSegLib.trust.verdicts import FAILED, OK, REVIEW, judge
from KneeBoneSegLib.volume import Geometry, Volume

BONES = {1: "femur", 2: "tibia", 3: "patella"}
#: 10-45 degrees about each patient axis (left-right, anterior-posterior, superior-inferior), and a double oblique.
TURNS = [(axis, degrees) for axis in "xyz" for degrees in (10, 20, 30, 45)] + [("xy", (20, 25))]


def _turn_id(turn) -> str:
    axes, degrees = turn
    return "".join(f"{axis}{angle}" for axis, angle in zip(axes, np.atleast_1d(degrees)))


def _voxel_extent_mm(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """LR, AP, SI extent of a mask's voxels (their faces) from every voxel's corners: the definition, slowly."""
    centres = geometry.index_to_lps(np.argwhere(mask)[:, ::-1])
    corners = geometry.index_to_lps(
        np.array(np.meshgrid(*[[-0.5, 0.5]] * 3, indexing="ij")).reshape(3, -1).T
    ) - geometry.index_to_lps(np.zeros((1, 3)))
    return (centres.max(axis=0) + corners.max(axis=0)) - (centres.min(axis=0) + corners.min(axis=0))


def _phantom_grid(turn: np.ndarray, shape=(136, 136, 136), spacing=1.5) -> Geometry:
    return Geometry((spacing,) * 3, (-100.0, -100.0, -100.0)).turned(turn, shape)


# --- the measures on turned grids, without the sample scan ---------------------------------------------------


@pytest.mark.parametrize("turn", [("x", 45), ("y", 30), ("z", 45), ("xy", (20, 25))], ids=_turn_id)
def test_bone_extents_are_those_of_its_voxels_whatever_the_grid(turn):
    shape = (136, 136, 136)
    geometry = _phantom_grid(rotation(*turn), shape)
    _, labels = patient_phantom(shape, geometry)
    measures = measure_components(labels, [np.count_nonzero(labels == n) for n in (1, 2, 3)], geometry, 3)
    for label, measure in zip((1, 2, 3), measures):
        np.testing.assert_allclose(measure.extent_mm, _voxel_extent_mm(labels == label, geometry), atol=1e-6)
    # The phantom femur is an ellipsoid 90 x 70 x 80 mm in patient space (conftest.patient_phantom).
    np.testing.assert_allclose(measures[0].extent_mm, [90, 70, 80], atol=2 * 1.5 * np.sqrt(3))


@pytest.mark.parametrize("turn", [("x", 45), ("z", 45), ("xy", (20, 25))], ids=_turn_id)
def test_the_three_bones_are_named_on_turned_grids(turn):
    shape = (136, 136, 136)
    geometry = _phantom_grid(rotation(*turn), shape)
    _, truth = patient_phantom(shape, geometry)
    labels, report = label_bones(truth > 0, geometry)
    assert report["missing"] == [] and report["rejected"] == []
    np.testing.assert_array_equal(labels, truth)


def test_a_bone_running_into_the_zero_filled_margin_of_a_turned_scan_is_cut():
    # A scanned region (a turned box) inside an array whose corners the resampling filled with zeros.
    shape = (60, 60, 60)
    geometry = Geometry((1.0,) * 3, (0.0, 0.0, 0.0))
    image = np.full(shape, 300.0, np.float32)
    scan = turned(Volume(image, geometry), rotation("z", 40), order=1).array
    assert scan[0, 0, 0] == 0 and scan[30, 30, 30] == 300
    field_of_view = FieldOfView(scan)
    k, j, i = np.indices(shape)
    # A bone in the scanned region's corner that runs up to its edge, off the array's faces; another well inside.
    corner = (scan > 0) & (i >= 1) & (j >= 1) & (i + j < 25) & (np.abs(k - 30) < 20)
    inside = (np.abs(i - 30) < 6) & (np.abs(j - 30) < 6) & (np.abs(k - 30) < 20)
    components = (corner * 1 + inside * 2).astype(np.int32)
    cut_corner, cut_inside = measure_components(components, [corner.sum(), inside.sum()], geometry, 2, field_of_view)
    assert not components[:, 0].any() and not components[:, :, 0].any()
    assert cut_corner.cut
    assert not cut_inside.cut
    # A zero voxel beside a bone within the scan (noise in dark cortex) is no edge of the scan.
    dark_beside = scan.copy()
    dark_beside[30, 30, 36] = 0
    assert not measure_components(components, [corner.sum(), inside.sum()], geometry, 2, FieldOfView(dark_beside))[
        1
    ].cut


def _lone_bone(widens_superiorly: bool, geometry: Geometry, shape) -> np.ndarray:
    """A long bone that widens at one end: a tibia's plateau above its shaft, or a femur's condyles below it."""
    k, j, i = np.indices(shape, dtype=float)
    x, y, z = (
        geometry.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
        - geometry.index_to_lps([(np.asarray(shape[::-1]) - 1) / 2])
    ).T.reshape(3, *shape)
    shaft = (x**2 + y**2 <= 14**2) & (np.abs(z) <= 45)
    end = ((x / 38) ** 2 + (y / 28) ** 2 + ((z - (30 if widens_superiorly else -30)) / 18) ** 2) <= 1
    return shaft | end


@pytest.mark.parametrize("bone", ["femur", "tibia"])
def test_a_lone_bone_is_named_by_its_shape_and_is_never_ok(bone):
    shape = (100, 100, 100)
    geometry = _phantom_grid(rotation("xy", (20, 25)), shape, spacing=1.2)
    mask = _lone_bone(bone == "tibia", geometry, shape)
    labels, components = label_bones(mask, geometry)
    assert list(components["found"]) == [bone]
    assert any(f"called {bone}" in warning for warning in components["warnings"])
    assert np.array_equal(labels > 0, mask)
    verdict = judge({"bones": {bone: {}}, "components": components})
    assert verdict["bones"][bone]["verdict"] == REVIEW
    assert any(reason.startswith("name uncertain") for reason in verdict["bones"][bone]["reasons"])
    assert verdict["run"] != OK


def test_a_lone_component_without_a_known_shape_keeps_the_old_name():
    names, warnings = name_components(np.array([[0.0, 0.0, 10.0]]), [1000])
    assert names == ["femur"] and "called femur" in warnings[0]


def test_a_double_oblique_scan_goes_to_the_network_upright_and_comes_back_on_its_own_grid():
    shape = (40, 50, 60)
    scan_geometry = Geometry((0.8, 0.6, 1.1), (5.0, -20.0, 30.0)).turned(rotation("xy", (20, 25)), shape)
    assert obliquity_degrees(scan_geometry.direction) > MAX_ALIGNED_DEGREES
    grid = ModelGrid(scan_geometry, shape, spacing_mm=1.0)
    assert grid.reoriented
    np.testing.assert_allclose(grid.direction, np.eye(3))  # axial, coronal and sagittal are the patient's planes
    # The upright grid holds every corner of the scan's box.
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape[::-1]], indexing="ij")).reshape(3, -1).T
    inside_ijk = np.linalg.inv(grid.geometry.ijk_to_lps) @ np.c_[scan_geometry.index_to_lps(corners), np.ones(8)].T
    assert np.all(inside_ijk[:3].T >= -0.5 - 1e-6) and np.all(
        inside_ijk[:3].T <= np.asarray(grid.shape[::-1]) - 0.5 + 1e-6
    )
    scanned = grid.scanned()
    assert scanned[tuple(n // 2 for n in grid.shape)] and not scanned[0, 0, 0]
    # A smooth map in patient space comes back where it was.
    k, j, i = np.indices(grid.shape)
    lps = grid.geometry.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)).reshape(*grid.shape, 3)
    field = (np.sin(lps[..., 0] / 9.0) + lps[..., 2] / 50.0).astype(np.float32)
    k, j, i = np.indices(shape)
    scan_lps = scan_geometry.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)).reshape(*shape, 3)
    np.testing.assert_allclose(grid.to_scan(field), np.sin(scan_lps[..., 0] / 9.0) + scan_lps[..., 2] / 50.0, atol=0.02)


@pytest.fixture(scope="module")
def threshold_model(tmp_path_factory):
    card = ModelCard(
        name="threshold", patch_size=16, stride=8, spacing_mm=[1.5, 1.5, 1.5], normalization={"method": "percentile"}
    )
    return load_model(write_threshold_onnx(tmp_path_factory.mktemp("model") / "threshold.onnx", card))


@pytest.mark.parametrize("turn", [("x", 30), ("xy", (20, 25))], ids=_turn_id)
def test_the_pipeline_on_a_turned_phantom_scan(turn, threshold_model):
    """The whole run, three projections and their disagreement, on a phantom resampled onto a turned grid."""
    shape = (120, 120, 120)
    upright_geometry = Geometry((1.5,) * 3, (-90.0, -90.0, -90.0))
    image, truth = patient_phantom(shape, upright_geometry)
    scan, moved = (
        turned(Volume(image, upright_geometry), rotation(*turn)),
        turned(Volume(truth, upright_geometry), rotation(*turn), order=0),
    )
    result = segment(
        scan,
        threshold_model,
        SegmentOptions(projections=3, closing_radius=2, smoothing_iterations=5, keep_uncertainty=True),
    )
    assert result.report["missing"] == []
    for label, name in BONES.items():
        assert dice(result.labels == label, moved.array == label) > 0.95, name
        assert result.verdict["bones"][name]["verdict"] != FAILED
    assert result.uncertainty.shape == shape and 0 <= result.uncertainty.min() and result.uncertainty.max() <= 1
    assert all(bone["surface"]["watertight"] for bone in result.report["bones"].values())


# --- the sample's ground truth on turned grids, through every stage after the network --------------------------


def onto_turned_grid(volume: Volume, turn: np.ndarray) -> Volume:
    """A label map on a grid of its spacing turned by ``turn`` about its centre, large enough to hold all of it.

    Nothing is cut off, so what the stages measure on it must be what they
    measure on the upright grid, up to the resampling of the voxels. Each
    label is resampled linearly and kept from a half (nearest neighbour
    would leave a staircase on every surface, which a closing then fills).
    """
    from KneeBoneSegLib.preprocess.resampling import resample_onto

    geometry, shape_ijk = volume.geometry, np.asarray(volume.array.shape[::-1], dtype=float)
    spacing = np.asarray(geometry.spacing)
    direction = turn @ geometry.direction_matrix
    # The upright box's extent along each turned axis, in voxels of the turned grid.
    along = np.abs(direction.T @ geometry.direction_matrix) @ (spacing * shape_ijk) / spacing
    counts = np.ceil(along).astype(int) + 1
    centre = geometry.index_to_lps(((shape_ijk - 1) / 2)[None])[0]
    target = Geometry(
        tuple(spacing), tuple(centre - direction @ (spacing * (counts - 1) / 2)), tuple(direction.ravel())
    )
    labels = np.zeros(tuple(counts[::-1]), dtype=volume.array.dtype)
    for label in np.unique(volume.array[volume.array > 0]):
        labels[resample_onto(volume.array == label, geometry, target, labels.shape, order=1) >= 0.5] = label
    return Volume(labels, target)


@pytest.fixture(scope="module")
def coarse_truth(sample_labels):
    """The sample's ground truth at every third voxel: about 1.05 mm, so that each turned case runs in seconds."""
    geometry = sample_labels.geometry
    return Volume(
        np.ascontiguousarray(sample_labels.array[::3, ::3, ::3]),
        Geometry(tuple(3 * np.asarray(geometry.spacing)), geometry.origin, geometry.direction),
    )


#: Post-processing as a run does it, surfaces left out (they are checked on the turned phantom's whole run).
GEOMETRY_OPTIONS = SegmentOptions(surfaces=False)


@pytest.fixture(scope="module")
def upright_bones(coarse_truth):
    return postprocess(coarse_truth, GEOMETRY_OPTIONS)


@pytest.mark.sample
@pytest.mark.parametrize("turn", TURNS, ids=_turn_id)
def test_the_ground_truth_on_a_turned_grid_gives_the_upright_bones(turn, coarse_truth, upright_bones):
    """Components, naming, the plausibility rules, closing, hole filling and verdicts on an oblique grid."""
    moved = onto_turned_grid(coarse_truth, rotation(*turn))
    assert obliquity_degrees(moved.geometry.direction) > 5
    # What was scanned: the turned grid holds zeros beyond the upright scan's box, as a resampled scan does.
    scanned = onto_turned_grid(Volume(np.ones_like(coarse_truth.array), coarse_truth.geometry), rotation(*turn))
    result = postprocess(moved, GEOMETRY_OPTIONS, field_of_view=FieldOfView(scanned.array))
    assert sorted(result.report["bones"]) == ["femur", "patella", "tibia"], result.report["components"]["warnings"]
    for name in BONES.values():
        found, upright = result.report["components"]["found"][name], upright_bones.report["components"]["found"][name]
        # Named as what it is: most of what bears the name is that bone in the moved ground truth.
        label = {v: k for k, v in BONES.items()}[name]
        assert np.bincount(moved.array[result.labels == label], minlength=4).argmax() == label, name
        volume, upright_volume = (r.report["bones"][name]["volume_mm3"] for r in (result, upright_bones))
        assert abs(volume - upright_volume) <= 0.02 * upright_volume, (name, volume, upright_volume)
        extents = [
            [bone["extent_mm"][axis] for axis in ("left-right", "anterior-posterior", "superior-inferior")]
            for bone in (found, upright)
        ]
        np.testing.assert_allclose(*extents, atol=2.0, err_msg=name)
        assert result.verdict["bones"][name]["verdict"] != FAILED
    assert result.verdict["run"] != FAILED


def test_a_tibia_beside_a_femur_too_large_to_be_one_is_not_handed_over_as_a_femur():
    shape = (100, 100, 100)
    geometry = _phantom_grid(rotation("z", 30), shape, spacing=1.6)
    _, truth = patient_phantom(shape, geometry)
    # A femur merged with what surrounds it (as on thick slices): wider than any femur, so rejected.
    k, j, i = np.indices(shape, dtype=float)
    x, y, z = (
        geometry.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
        - geometry.index_to_lps([(np.asarray(shape[::-1]) - 1) / 2])
    ).T.reshape(3, *shape)
    swollen = ((x / 70) ** 2 + ((y - 10) / 40) ** 2 + ((z - 45) / 40) ** 2) <= 1
    mask = (truth == 2) | (swollen & (z > 20))
    labels, components = label_bones(mask, geometry)
    assert components["rejected"] and "femur" not in components["found"]
    assert list(components["found"]) == ["tibia"] and np.array_equal(labels == 2, truth == 2)
    verdict = judge({"bones": {"tibia": {}}, "components": components})
    assert verdict["bones"]["tibia"]["verdict"] == REVIEW and verdict["run"] != OK


# --- the shipped model on the sample scan, turned ------------------------------------------------------------

#: One projection: what is tested is the geometry around the network, and it halves the suite's time.
SAMPLE_OPTIONS = SegmentOptions(projections=1)


@pytest.fixture(scope="module")
def sample_scan(sample_dir):
    return read_volume(sample_dir / "knee_mri.nrrd")


@pytest.fixture(scope="module")
def shipped_model():
    return load_model(default_model_path())


@pytest.fixture(scope="module")
def upright_run(sample_scan, shipped_model):
    return segment(sample_scan, shipped_model, SAMPLE_OPTIONS)


@pytest.mark.sample
@pytest.mark.slow
@pytest.mark.parametrize("turn", [("z", 20), ("xy", (20, 25))], ids=_turn_id)
@pytest.mark.slow
def test_the_sample_scan_on_turned_grids_gives_the_same_bones(
    turn, sample_scan, sample_labels, shipped_model, upright_run
):
    scan, truth = turned(sample_scan, rotation(*turn)), turned(sample_labels, rotation(*turn), order=0)
    result = segment(scan, shipped_model, SAMPLE_OPTIONS)
    assert result.report["missing"] == [], result.report["components"]["rejected"]
    assert result.verdict["run"] != FAILED and all(
        bone["verdict"] != FAILED for bone in result.verdict["bones"].values()
    )
    assert dice(result.labels > 0, truth.array > 0) >= 0.97
    for label, name in BONES.items():
        found = result.labels == label
        # Named as what it is: most of what bears a bone's name is that bone in the moved ground truth.
        assert np.bincount(truth.array[found], minlength=4).argmax() == label, name
        # As good as on the upright scan (a training-scan figure; the patella scores 0.96 there with one projection).
        assert (
            dice(found, truth.array == label) >= dice(upright_run.labels == label, sample_labels.array == label) - 0.01
        ), name
