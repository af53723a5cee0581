"""Dice, IoU and distances against hand-computed values and against pymia."""

from __future__ import annotations

import numpy as np
import pytest

from KneeBoneSegLib.metrics import average_hausdorff, dice, evaluate_labels, format_metrics_table, hausdorff_95, iou


def test_overlap_of_two_shifted_boxes():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = True  # 64 voxels
    b[2:6, 2:6, 3:7] = True  # 64 voxels, 48 shared
    assert dice(a, b) == pytest.approx(2 * 48 / 128)
    assert iou(a, b) == pytest.approx(48 / 80)
    # 16 voxels of each are 1 voxel (0.5 mm along i) from the other: 16 / 64 both ways.
    assert average_hausdorff(a, b) == pytest.approx(0.25)
    assert average_hausdorff(a, b, spacing=(0.5, 1, 1)) == pytest.approx(0.125)
    assert hausdorff_95(a, b, spacing=(0.5, 1, 1)) == pytest.approx(0.5)
    assert dice(a, a) == iou(a, a) == 1.0 and average_hausdorff(a, a) == hausdorff_95(a, a) == 0.0
    assert average_hausdorff(a, np.zeros_like(a)) == float("inf")


def test_average_hausdorff_equals_pymia(rng):
    from pymia.evaluation.metric import AverageDistance

    prediction = rng.random((20, 24, 28)) < 0.05
    reference = rng.random((20, 24, 28)) < 0.05
    prediction[:10] = False  # one directed distance much larger than the other
    spacing_kji = (0.8, 0.5, 0.35)
    metric = AverageDistance()
    metric.prediction, metric.reference, metric.spacing = (
        prediction.astype(np.uint8),
        reference.astype(np.uint8),
        spacing_kji,
    )
    assert average_hausdorff(prediction, reference, spacing_kji[::-1]) == pytest.approx(metric.calculate(), rel=1e-6)


@pytest.mark.slow
def test_evaluate_ground_truth_against_itself_and_a_perturbed_copy(sample_labels):
    truth, spacing = sample_labels.array, sample_labels.geometry.spacing
    perfect = evaluate_labels(truth, truth, spacing)
    assert set(perfect) == {"femur", "tibia", "patella", "all"}
    assert all(v["dice"] == 1.0 and v["ahd_mm"] == 0.0 and v["hd95_mm"] == 0.0 for v in perfect.values())

    shifted = np.roll(truth, 2, axis=2)  # two voxels along i
    result = evaluate_labels(shifted, truth, spacing)
    for bone in ("femur", "tibia", "patella", "all"):
        assert 0.9 < result[bone]["dice"] < 1.0 and result[bone]["iou"] < result[bone]["dice"]
        # No boundary voxel moved more than two voxels; most moved less (the surface is not all facing i).
        assert spacing[0] < result[bone]["hd95_mm"] <= 2 * spacing[0] + 1e-6
    assert result["patella"]["dice"] < result["femur"]["dice"]  # a smaller bone loses more to the same shift
    assert "patella" in format_metrics_table(result)


def test_surface_distances_run_from_the_predicted_bones_stl_to_the_references():
    k, j, i = np.indices((40, 40, 40))
    reference = ((k - 20) ** 2 + (j - 20) ** 2 + (i - 20) ** 2 <= 10**2).astype(np.uint8)
    grown = ((k - 20) ** 2 + (j - 20) ** 2 + (i - 20) ** 2 <= 12**2).astype(np.uint8)  # the same bone, 2 voxels larger
    spacing = (0.5, 0.5, 0.5)
    same = evaluate_labels(reference, reference, spacing, surfaces=True)["femur"]
    assert same["surface_mean_mm"] == 0.0 and same["surface_p95_mm"] == 0.0
    larger = evaluate_labels(grown, reference, spacing, surfaces=True)
    assert larger["femur"]["surface_mean_mm"] == pytest.approx(1.0, abs=0.1)  # 2 voxels of 0.5 mm
    assert larger["femur"]["surface_p95_mm"] >= larger["femur"]["surface_mean_mm"]
    assert larger["tibia"]["surface_mean_mm"] == float("inf")  # no tibia on either side
    assert (
        "surface_mean_mm" not in larger["all"]
        and "surface_mean_mm" not in evaluate_labels(grown, reference, spacing)["femur"]
    )
