"""Right on any scan geometry: thick, sagittal, oblique slices; grids that differ; the model's own grid.

The sample scan is nearly isotropic and axial, where array axes and patient
axes coincide and voxels are cubes; these tests use a 0.4 x 0.4 x 3 mm
sagittal grid tilted 10 degrees, on which a swapped i/k order, a radius in the
wrong units or a projection chosen by array axis gives a different answer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import knee_phantom, patient_phantom, position_network, sagittal_geometry, threshold_network

from KneeBoneSegLib.cli import main
from KneeBoneSegLib.errors import InputError
from KneeBoneSegLib.io.images import read_mask, write_volume
from KneeBoneSegLib.io.meshes import read_stl
from KneeBoneSegLib.io.outputs import SEGMENTATION_FILE, write_outputs
from KneeBoneSegLib.metrics import dice, evaluate_labels
from KneeBoneSegLib.network.engines import KerasNetwork
from KneeBoneSegLib.network.models import Model, ModelCard
from KneeBoneSegLib.network.projections import iter_projections, view_orders
from KneeBoneSegLib.pipeline import SegmentOptions, postprocess, segment
from KneeBoneSegLib.preprocess.resampling import MAX_ALIGNED_DEGREES, grid_shape_for_spacing
from KneeBoneSegLib.volume import Geometry, Volume

MINMAX = {"method": "minmax"}
THICK_SHAPE = (40, 450, 300)  # k: 40 slices of 3 mm (left-right), j: 450 x 0.4 mm (superior-inferior), i: 300 x 0.4 mm


@pytest.fixture(scope="module")
def thick():
    geometry = sagittal_geometry()
    image, labels = patient_phantom(THICK_SHAPE, geometry)
    return image, labels, geometry


def test_the_sagittal_test_grid_is_what_it_says():
    # i runs anterior-posterior (LPS y), j superior-inferior (z), k left-right (x), whatever the tilt.
    assert view_orders(sagittal_geometry().direction_matrix) == {
        "axial": (1, 2, 0),
        "coronal": (2, 1, 0),
        "sagittal": (0, 1, 2),
    }


def test_projections_are_named_by_patient_orientation_on_a_sagittal_scan():
    image = np.zeros((3, 5, 7), np.float32)  # k (left-right), j (superior-inferior), i (anterior-posterior)
    seen = {}

    def predict(view, name):
        seen[name] = view.shape
        return view

    maps = list(iter_projections(image, predict, projections=3, direction=sagittal_geometry().direction_matrix))
    # The axial projection presents axial slices (constant superior-inferior position, j) first.
    assert seen == {"axial": (5, 7, 3), "coronal": (7, 5, 3), "sagittal": (3, 5, 7)}
    assert all(m.shape == image.shape for m in maps)


def test_one_projection_is_axial_whatever_plane_the_scan_was_stored_in():
    image, _, axial = knee_phantom()
    # The same voxels stored as a sagittal series: array axes (i, k, j) of the axial one.
    sagittal = Geometry(
        (axial.spacing[1], axial.spacing[2], axial.spacing[0]),
        axial.origin,
        np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float).ravel(),
    )
    stored = np.ascontiguousarray(image.transpose(2, 0, 1))
    np.testing.assert_allclose(sagittal.index_to_lps([[3, 5, 7]]), axial.index_to_lps([[7, 3, 5]]))
    model = Model(KerasNetwork(position_network(16)), ModelCard(patch_size=16, stride=8, normalization=MINMAX))
    options = SegmentOptions(projections=1, closing_radius=0, fill_holes=False, surfaces=False)
    from_axial = segment(Volume(image, axial), model, options).probability
    from_sagittal = segment(Volume(stored, sagittal), model, options).probability
    np.testing.assert_allclose(from_sagittal.transpose(1, 2, 0), from_axial, atol=1e-6)


def test_the_models_grid_follows_each_axis_spacing():
    # Tilted less than MAX_ALIGNED_DEGREES, the scan goes to the model's grid along its own axes:
    # 40 x 3 mm, 450 x 0.4 mm and 300 x 0.4 mm at 2 mm: 60, 90 and 60 voxels (k, j, i).
    geometry = sagittal_geometry(tilt_deg=MAX_ALIGNED_DEGREES - 1)
    image, labels = patient_phantom(THICK_SHAPE, geometry)
    assert grid_shape_for_spacing(THICK_SHAPE, geometry.spacing, 2.0) == (60, 90, 60)
    model = Model(
        KerasNetwork(threshold_network(16)),
        ModelCard(patch_size=16, stride=8, normalization=MINMAX, spacing_mm=[2.0, 2.0, 2.0]),
    )
    totals = []
    options = SegmentOptions(projections=1, skip_air_tiles=False, batch_size=1, closing_radius=0, surfaces=False)
    result = segment(
        Volume(image, geometry),
        model,
        options,
        progress=lambda s, f: totals.append(f) if s == "network: axial" else None,
    )
    assert (
        round(1 / min(f for f in totals if f > 0)) == 7 * 11 * 7
    )  # tiles of 16 at stride 8 over 60 x 90 x 60 (padded to 64 x 96 x 64)
    assert result.labels.shape == THICK_SHAPE and result.report["missing"] == []
    for label in (1, 2, 3):
        assert dice(result.labels == label, labels == label) > 0.85, label


def test_the_default_closing_is_the_papers_sphere_in_millimetres_on_thick_slices(thick):
    _, _, geometry = thick
    # One femur-sized bone: two plates 3 slices (9 mm) apart across the thick slices, joined along one
    # edge by a bar that gives the bone a femur's 60 mm from left to right.
    bone = np.zeros(THICK_SHAPE, np.uint8)
    bone[2:5, 20:140, 20:140] = 1
    bone[8:11, 20:140, 20:140] = 1
    bone[2:22, 20:40, 20:140] = 1
    gap = (slice(5, 8), slice(70, 130), slice(30, 110))  # 12 mm and more from the joined edge, 4 mm from the others
    options = SegmentOptions(surfaces=False)
    assert (options.closing_radius, options.closing_units) == (3.2, "mm")
    closed = postprocess(Volume(bone, geometry), options).labels
    assert not closed[gap].any()  # a 3.2 mm ball passes through a 9 mm gap
    papers_rule = postprocess(
        Volume(bone, geometry), SegmentOptions(closing_radius=9, closing_units="voxels", surfaces=False)
    ).labels
    assert papers_rule[gap].all()  # 9 voxels reach 27 mm across 3 mm slices


def test_outputs_keep_a_thick_oblique_sagittal_grid(thick, tmp_path):
    _, labels, geometry = thick
    result = postprocess(Volume(labels, geometry), SegmentOptions(closing_radius=0, smoothing_iterations=0, nifti=True))
    write_outputs(result, tmp_path / "out")
    for name in (SEGMENTATION_FILE, "labels.nii.gz"):
        written = read_mask(tmp_path / "out" / name)
        np.testing.assert_array_equal(written.array, result.labels, err_msg=name)
        np.testing.assert_allclose(written.geometry.ijk_to_lps, geometry.ijk_to_lps, atol=1e-4, err_msg=name)
    for bone in ("femur", "tibia", "patella"):
        label = {"femur": 1, "tibia": 2, "patella": 3}[bone]
        voxels = geometry.index_to_lps(np.argwhere(result.labels == label)[:, ::-1])
        points = read_stl(tmp_path / "out" / f"{bone}.stl").vertices
        # The surface wraps the bone's voxels in patient space: same centre, within the voxels' box grown by a voxel.
        np.testing.assert_allclose(points.mean(axis=0), voxels.mean(axis=0), atol=1.0, err_msg=bone)
        assert np.all(points >= voxels.min(axis=0) - 3.0) and np.all(points <= voxels.max(axis=0) + 3.0), bone


def test_an_input_smaller_than_a_sub_volume_on_the_models_grid_is_refused():
    image, _, _ = knee_phantom(shape=(24, 24, 24))
    model = Model(
        KerasNetwork(threshold_network(16)),
        ModelCard(patch_size=16, stride=8, normalization=MINMAX, spacing_mm=[1.0, 1.0, 1.0]),
    )
    # 24 voxels of 0.5 mm are 12 of the model's 1 mm voxels: less than one 16-voxel sub-volume.
    with pytest.raises(
        InputError, match="12 x 12 x 12 voxels on the model's 1 x 1 x 1 mm grid, smaller than the model's 16 x 16 x 16"
    ):
        segment(Volume(image, Geometry((0.5, 0.5, 0.5), (0, 0, 0))), model, SegmentOptions())


@pytest.fixture(scope="module")
def truth_file(tmp_path_factory):
    _, labels, geometry = knee_phantom()
    path = tmp_path_factory.mktemp("evaluate") / "truth.nrrd"
    write_volume(Volume(labels, geometry), path)
    return path, labels, geometry


def _evaluate(prediction, reference, capsys):
    code = main(["evaluate", str(prediction), str(reference), "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_evaluate_scores_a_prediction_where_it_lies_not_where_its_array_starts(truth_file, tmp_path, capsys):
    path, labels, geometry = truth_file
    step = int(round(10.0 / geometry.spacing[0]))  # 10 mm along i, in voxels
    moved = Geometry(
        geometry.spacing, np.add(geometry.origin, (step * geometry.spacing[0], 0.0, 0.0)), geometry.direction
    )
    write_volume(Volume(labels, moved), tmp_path / "moved.nrrd")
    code, metrics, err = _evaluate(tmp_path / "moved.nrrd", path, capsys)
    assert code == 0 and "resampled" in err
    shifted = np.zeros_like(labels)
    shifted[..., step:] = labels[..., :-step]  # where the moved prediction's voxels lie on the reference grid
    expected = evaluate_labels(shifted, labels, geometry.spacing)
    assert metrics["all"]["dice"] == pytest.approx(expected["all"]["dice"]) and metrics["all"]["dice"] < 0.9


def test_evaluate_resamples_a_finer_grid_of_the_same_bones(truth_file, tmp_path, capsys):
    path, labels, geometry = truth_file
    finer = np.repeat(np.repeat(np.repeat(labels, 2, 0), 2, 1), 2, 2)  # each voxel as 2 x 2 x 2 half-size voxels
    fine_geometry = Geometry(
        np.divide(geometry.spacing, 2), np.subtract(geometry.origin, np.divide(geometry.spacing, 4)), geometry.direction
    )
    write_volume(Volume(finer, fine_geometry), tmp_path / "fine.nrrd")
    code, metrics, _ = _evaluate(tmp_path / "fine.nrrd", path, capsys)
    assert code == 0 and all(metrics[key]["dice"] == 1.0 for key in ("femur", "tibia", "patella", "all"))


def test_evaluate_refuses_grids_that_do_not_overlap(truth_file, tmp_path, capsys):
    path, labels, geometry = truth_file
    write_volume(
        Volume(labels, Geometry(geometry.spacing, np.add(geometry.origin, (0.0, 500.0, 0.0)))), tmp_path / "far.nrrd"
    )
    code, _, err = _evaluate(tmp_path / "far.nrrd", path, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "do not overlap" in err and "far.nrrd" in err
