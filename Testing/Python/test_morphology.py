"""Closing with a ball: identical to scikit-image, per bone, in voxels or millimetres."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import ball, closing

from KneeBoneSegLib.postprocess.morphology import bone_boxes, bounding_box, close_bones, fill_bone_holes, fill_holes


def closing_ball(mask, radius, spacing=None):
    """The pipeline's closing (:func:`close_bones`) of one bone given as a binary mask; ``spacing``: radius in mm."""
    units = "voxels" if spacing is None else "mm"
    return close_bones(mask.astype(np.uint8), radius, spacing or (1.0, 1.0, 1.0), units=units) == 1


@pytest.mark.parametrize("radius", [1, 2, 3, 5, 9])
def test_closing_is_voxel_for_voxel_skimage_closing_with_a_ball(rng, radius):
    for density in (0.003, 0.02):
        mask = ndimage.binary_dilation(rng.random((34, 30, 26)) < density)
        mask[0, 5:9, 5:9] = True  # bone cut by the image border
        np.testing.assert_array_equal(closing_ball(mask, radius), closing(mask, ball(radius)).astype(bool))


def test_closing_fills_a_gap_narrower_than_the_ball_and_keeps_a_wider_one():
    mask = np.zeros((40, 40, 60), bool)
    mask[10:30, 10:30, 5:25] = True
    mask[10:30, 10:30, 29:49] = True  # 4-voxel gap
    assert closing_ball(mask, 3)[20, 20, 26] and not closing_ball(mask, 1)[20, 20, 26]


def test_radius_in_millimetres_is_a_sphere_on_an_anisotropic_grid():
    point = np.zeros((21, 21, 21), bool)
    point[10, 10, 10] = True
    spacing = (0.5, 0.5, 2.0)  # i, j, k
    dilated = ndimage.distance_transform_edt(~point, sampling=spacing[::-1]) <= 4.0
    assert dilated[10, 10, 18] and not dilated[10, 10, 19] and dilated[12, 10, 10] and not dilated[13, 10, 10]
    # A 2 mm-wide slit along k is one voxel; a 3 mm ball closes it, a 1.5 mm one does not.
    mask = np.ones((12, 12, 12), bool)
    mask[6, :, :] = False
    mask[:, :, :2] = mask[:, :, -2:] = False
    assert closing_ball(mask, 3.0, spacing)[6, 6, 6] and not closing_ball(mask, 1.5, spacing)[6, 6, 6]


def test_close_bones_grows_each_bone_into_background_only():
    labels = np.zeros((30, 30, 40), np.uint8)
    labels[5:25, 5:25, 2:15] = 1
    labels[5:25, 5:25, 18:30] = 2  # femur and tibia 3 voxels apart
    labels[12, 12, 8] = 0  # a hole in the femur
    labels[5:25, 5:25, 16] = 3  # a thin plate between them
    closed = close_bones(labels, 3)
    assert closed[12, 12, 8] == 1
    np.testing.assert_array_equal(closed[labels > 0], labels[labels > 0])
    np.testing.assert_array_equal(close_bones(labels, 0), labels)
    with pytest.raises(ValueError, match="units"):
        close_bones(labels, 3, units="cm")


@pytest.mark.slow
def test_closing_the_ground_truth_bones_of_the_sample_scan(sample_labels):
    labels = sample_labels.array
    patella = labels == 3
    box = tuple(slice(max(0, s.start - 10), s.stop + 10) for s in ndimage.find_objects(patella.astype(np.uint8))[0])
    np.testing.assert_array_equal(closing_ball(patella, 9)[box], closing(patella[box], ball(9)).astype(bool))
    closed = close_bones(labels, 9)
    for label in (1, 2, 3):
        assert np.count_nonzero(closed == label) >= np.count_nonzero(labels == label)


def test_fill_holes_fills_marrow_open_to_the_outside_but_not_a_notch():
    bone = np.zeros((30, 30, 30), bool)
    bone[5:25, 5:25, 5:25] = True
    bone[10:20, 10:20, 10:20] = False  # missed marrow...
    bone[14:16, 14:16, 20:25] = False  # ...with a tunnel to the outside: not a hole in 3D
    notch = np.zeros_like(bone)
    notch[5:25, 12:18, 5:12] = True  # a groove cut into one face
    bone &= ~notch
    filled = fill_holes(bone)
    assert filled[15, 15, 15] and filled[15, 15, 22]
    assert not filled[notch].any()
    np.testing.assert_array_equal(filled[bone], True)


def test_fill_bone_holes_fills_into_background_only():
    labels = np.zeros((20, 20, 40), np.uint8)
    labels[2:18, 2:18, 2:18] = 1
    labels[6:14, 6:14, 6:14] = 0
    labels[9:11, 9:11, 9:11] = 3  # another bone inside the hole keeps its voxels
    filled = fill_bone_holes(labels)
    assert (filled[6:14, 6:14, 6:14] == 1).sum() == 8**3 - 8 and (filled == 3).sum() == 8


def test_fill_bone_holes_barely_changes_the_ground_truth(sample_labels):
    truth = sample_labels.array
    changed = np.count_nonzero(fill_bone_holes(truth) != truth)
    assert changed < 1e-3 * np.count_nonzero(truth)


def test_fill_holes_is_scipy_binary_fill_holes_in_3d_and_in_every_slice_of_each_orientation(rng):
    for density in (0.55, 0.7, 0.85):
        mask = rng.random((24, 20, 28)) < density
        expected = ndimage.binary_fill_holes(mask)
        for axis in range(3):
            planes = [ndimage.binary_fill_holes(plane) for plane in np.moveaxis(mask, axis, 0)]
            expected |= np.moveaxis(np.stack(planes), 0, axis)
        filled = fill_holes(mask)
        assert np.count_nonzero(filled & ~mask) > 10  # there were holes to fill
        np.testing.assert_array_equal(filled, expected)


def test_bounding_box_is_where_the_voxels_are_grown_and_clipped():
    mask = np.zeros((10, 12, 14), bool)
    assert bounding_box(mask) is None
    mask[2, 5, 13] = mask[6, 3, 4] = True
    assert bounding_box(mask) == (slice(2, 7), slice(3, 6), slice(4, 14))
    assert bounding_box(mask, (1, 4, 2)) == (slice(1, 8), slice(0, 10), slice(2, 14))


def test_bone_boxes_are_each_bones_bounding_box_grown_and_clipped(rng):
    labels = np.zeros((30, 40, 50), np.uint8)
    labels[3:9, 10:30, 0:12] = 1
    labels[20:29, 5:7, 30:50] = 3  # no tibia
    labels[rng.random(labels.shape) < 0.001] = 2
    for margin in ((0, 0, 0), (2, 3, 4)):
        boxes = bone_boxes(labels, margin)
        expected = {label: bounding_box(labels == label, margin) for label in (1, 2, 3) if np.any(labels == label)}
        assert boxes == expected
    assert bone_boxes(np.zeros((4, 4, 4), np.uint8)) == {}
