"""Keeping the three largest components and naming them by anatomy, whatever the image orientation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import knee_phantom, largest_components
from scipy import ndimage

from KneeBoneSegLib.postprocess.components import component_statistics, label_bones
from KneeBoneSegLib.volume import Geometry


def test_largest_components_drops_specks_and_orders_by_size():
    mask = np.zeros((20, 20, 20), bool)
    mask[1:9, 1:9, 1:9] = True  # 512
    mask[12:18, 12:18, 12:18] = True  # 216
    mask[1:4, 14:17, 1:4] = True  # 27
    mask[18, 1, 18] = True  # 1: a speck
    mask[10, 10, 10] = mask[11, 11, 11] = True  # touching only at a corner: two components
    components, sizes = largest_components(mask, count=3, min_fraction=0.01)
    assert sizes == [512, 216, 27]
    assert components[5, 5, 5] == 1 and components[15, 15, 15] == 2 and components[2, 15, 2] == 3
    assert components[18, 1, 18] == 0 and components[10, 10, 10] == 0


def test_largest_components_are_scipys_face_connected_components_by_size(rng):
    mask = rng.random((30, 26, 34)) < 0.3
    mask[:3] = False  # the components' box is smaller than the volume
    labelled, found = ndimage.label(mask)
    sizes = np.bincount(labelled.ravel())[1:]
    components, kept = largest_components(mask, count=None)
    assert kept == sorted(sizes.tolist(), reverse=True)
    for rank in (1, 2, len(kept)):
        voxels = components == rank
        assert np.count_nonzero(voxels) == kept[rank - 1] and len(np.unique(labelled[voxels])) == 1


def test_component_statistics_match_scipy_center_of_mass_and_find_objects(rng):
    components, sizes = largest_components(rng.random((30, 25, 20)) > 0.6, count=None)
    expected = ndimage.center_of_mass(components > 0, components, range(1, len(sizes) + 1))
    centroids, boxes = component_statistics(components, len(sizes))
    np.testing.assert_allclose(centroids, expected, atol=1e-9)
    assert boxes == ndimage.find_objects(components, max_label=len(sizes))


def _reoriented(labels, geometry, permutation, flips):
    """The same anatomy stored with permuted and flipped array axes, and the geometry that says so."""
    array = labels
    for axis in flips:
        array = np.flip(array, axis)
    array = np.ascontiguousarray(array.transpose(permutation))
    # Array axis a of the new array is old axis permutation[a]; image axes are the reverse of array axes.
    old_ijk_axes = [2 - permutation[2 - n] for n in range(3)]
    direction = geometry.direction_matrix[:, old_ijk_axes].copy()
    spacing = [geometry.spacing[a] for a in old_ijk_axes]
    origin = np.array(geometry.origin, float)
    for axis in flips:
        ijk_axis = 2 - axis
        origin += geometry.direction_matrix[:, ijk_axis] * geometry.spacing[ijk_axis] * (labels.shape[axis] - 1)
        direction[:, old_ijk_axes.index(ijk_axis)] *= -1
    return array, Geometry(spacing, origin, direction)


@pytest.mark.parametrize(
    "permutation,flips",
    [((0, 1, 2), ()), ((0, 1, 2), (0,)), ((2, 0, 1), (1,)), ((1, 2, 0), (0, 2)), ((2, 1, 0), (0, 1, 2))],
)
def test_bones_are_named_from_patient_coordinates_not_array_order(permutation, flips):
    _, truth, geometry = knee_phantom()
    stored, stored_geometry = _reoriented(truth, geometry, permutation, flips)
    # The reoriented grid puts every voxel at the same patient position as before.
    index = np.argwhere(stored == 3)[0]
    assert stored[tuple(index)] == 3
    labels, report = label_bones(stored > 0, stored_geometry)
    np.testing.assert_array_equal(labels, stored)
    assert report["missing"] == [] and report["warnings"] == []
    assert report["found"]["femur"]["centroid_lps_mm"][2] > report["found"]["tibia"]["centroid_lps_mm"][2]


def test_missing_bones_are_reported_not_invented():
    _, truth, geometry = knee_phantom()
    labels, report = label_bones((truth == 1) | (truth == 2), geometry)
    assert report["missing"] == ["patella"] and any("patella" in w for w in report["warnings"])
    np.testing.assert_array_equal(labels, np.where(truth == 3, 0, truth))
    labels, report = label_bones(np.zeros_like(truth, bool), geometry)
    assert report["missing"] == ["femur", "tibia", "patella"] and not labels.any()


def test_a_component_behind_the_femur_is_not_called_patella():
    _, truth, geometry = knee_phantom()
    moved = truth.copy()
    moved[truth == 3] = 0
    moved[np.roll(truth == 3, 50, axis=1)] = 3  # now posterior to the femur and tibia, touching neither
    labels, report = label_bones(moved > 0, geometry)
    assert report["missing"] == ["patella"] and any("anterior" in w for w in report["warnings"])
    assert not (labels == 3).any() and len(report["dropped_components"]) == 1


def test_the_patella_is_the_anterior_component_even_when_a_larger_blob_lies_behind():
    _, truth, geometry = knee_phantom()
    blob = np.zeros_like(truth, bool)
    k, j, i = np.nonzero(truth == 3)
    # A posterior false positive (like fat, bright as marrow) twice the patella's size.
    blob[k.min() : k.max() + 1, -12:-2, i.min() : i.max() + 1] = True
    assert blob.sum() > 2 * (truth == 3).sum() and not (blob & (truth > 0)).any()
    labels, report = label_bones((truth > 0) | blob, geometry)
    np.testing.assert_array_equal(labels, truth)
    assert report["missing"] == [] and report["dropped_voxels"] == blob.sum()


def test_sample_ground_truth_is_named_as_annotated(sample_labels):
    labels, report = label_bones(sample_labels.array > 0, sample_labels.geometry)
    assert report["missing"] == []
    for label in (1, 2, 3):
        assert np.array_equal(labels == label, sample_labels.array == label)
