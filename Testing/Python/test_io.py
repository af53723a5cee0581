"""Reading scans and masks: formats, DICOM series, geometry, and refusals with useful messages."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk

from KneeBoneSegLib.errors import InputError, OutputError
from KneeBoneSegLib.io.images import check_volume, read_mask, read_volume, write_volume
from KneeBoneSegLib.volume import Geometry, Volume


def oblique_geometry(spacing=(0.4, 0.7, 2.5), origin=(-12.5, 40.25, 7.0)) -> Geometry:
    """A non-axis-aligned frame: rotations of 20 deg about z then 35 deg about x."""
    a, b = np.radians(20), np.radians(35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return Geometry(spacing, origin, tuple((rx @ rz).ravel()))


def write_with_sitk(path, array, geometry: Geometry | None = None, vector=False):
    """Write a test image with SimpleITK directly, independently of the code under test."""
    image = sitk.GetImageFromArray(array, isVector=vector)
    if geometry is not None:
        image.SetSpacing(geometry.spacing)
        image.SetOrigin(geometry.origin)
        image.SetDirection(geometry.direction)
    sitk.WriteImage(image, str(path), True)
    return path


def write_dicom_series(folder, series_uid, values, z0, spacing=(0.5, 0.6), step=1.5):
    """One single-frame MR slice file per value, filled with that value, stacked along +z."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for number, value in enumerate(values):
        slice_image = sitk.GetImageFromArray(np.full((12, 10), value, np.int16))
        slice_image.SetSpacing(spacing)
        tags = {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{number + 1}",
            "0020|0013": str(number + 1),
            "0020|0032": f"1\\2\\{z0 + step * number}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(step),
        }
        for tag, value_text in tags.items():
            slice_image.SetMetaData(tag, value_text)
        writer.SetFileName(str(folder / f"{series_uid.rsplit('.', 1)[-1]}_{number:03d}.dcm"))
        writer.Execute(slice_image)


def assert_same_geometry(actual: Geometry, expected: Geometry, tolerance=1e-9):
    np.testing.assert_allclose(actual.spacing, expected.spacing, rtol=0, atol=tolerance)
    np.testing.assert_allclose(actual.origin, expected.origin, rtol=0, atol=tolerance)
    np.testing.assert_allclose(actual.direction, expected.direction, rtol=0, atol=tolerance)


# --- reading: formats and geometry -------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha", ".mhd"])
def test_read_volume_keeps_simpleitk_geometry_and_voxels(tmp_path, rng, suffix):
    array = rng.integers(0, 4000, (9, 11, 13)).astype(np.int16)
    path = write_with_sitk(tmp_path / f"scan{suffix}", array, oblique_geometry())
    reference = sitk.ReadImage(str(path))

    volume = read_volume(path)

    np.testing.assert_array_equal(volume.array, array)
    assert volume.geometry == Geometry(reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection())


@pytest.mark.parametrize("suffix, tolerance", [(".nrrd", 1e-12), (".mha", 1e-12), (".nii.gz", 1e-5)])
def test_write_then_read_keeps_geometry_of_an_oblique_anisotropic_volume(tmp_path, rng, suffix, tolerance):
    # NIfTI stores its affine in float32, hence the looser tolerance there.
    original = Volume(rng.normal(100, 30, (7, 8, 9)).astype(np.float32), oblique_geometry())

    written = write_volume(original, tmp_path / f"out{suffix}")
    back = read_volume(written)

    np.testing.assert_array_equal(back.array, original.array)
    assert_same_geometry(back.geometry, original.geometry, tolerance)


def test_write_volume_stores_boolean_masks_as_uint8(tmp_path):
    mask = np.zeros((6, 7, 8), bool)
    mask[2:4, 3:5, 1:6] = True

    back = read_volume(write_volume(Volume(mask, Geometry((1, 1, 1), (0, 0, 0))), tmp_path / "mask.nrrd"))

    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, mask)


def test_write_volume_refuses_unknown_suffix(tmp_path):
    volume = Volume(np.ones((3, 3, 3), np.uint8), Geometry((1, 1, 1), (0, 0, 0)))
    with pytest.raises(OutputError, match="labels.png"):
        write_volume(volume, tmp_path / "labels.png")


# --- DICOM -------------------------------------------------------------------------------------


def test_dicom_subset_matches_the_same_slices_of_the_nrrd(sample_dir, sample_dicom):
    nrrd = read_volume(sample_dir / "knee_mri.nrrd")
    dicom = read_volume(sample_dicom)

    assert dicom.array.shape == (16, 512, 512)
    np.testing.assert_allclose(dicom.geometry.spacing, nrrd.geometry.spacing, rtol=0, atol=1e-5)
    np.testing.assert_allclose(dicom.geometry.direction, nrrd.geometry.direction, rtol=0, atol=1e-9)
    # Where the DICOM's first slice lies on the NRRD's grid, from the two origins.
    offset_ijk = np.linalg.solve(
        nrrd.geometry.direction_matrix * nrrd.geometry.spacing,
        np.subtract(dicom.geometry.origin, nrrd.geometry.origin),
    )
    np.testing.assert_allclose(offset_ijk[:2], 0, atol=1e-3)
    first_k = int(round(offset_ijk[2]))
    assert abs(offset_ijk[2] - first_k) < 1e-3
    # Instance 1 is the most superior of 286 slices and the volume runs inferior to superior,
    # so instances 136..151 are slices 286 - 151 .. 286 - 136.
    assert first_k == 286 - 151
    np.testing.assert_array_equal(dicom.array, nrrd.array[first_k : first_k + 16])


def test_one_dicom_slice_reads_its_whole_series(sample_dicom):
    one_file = sorted(sample_dicom.iterdir())[0]

    volume = read_volume(one_file)

    assert volume.array.shape == (16, 512, 512)


def test_folder_with_two_series_reads_the_larger_and_says_so(tmp_path, caplog):
    write_dicom_series(tmp_path, "1.2.826.0.1.3680043.2.1125.101", [100, 101, 102], z0=0.0)
    write_dicom_series(tmp_path, "1.2.826.0.1.3680043.2.1125.202", [200, 201, 202, 203, 204], z0=10.0)

    with caplog.at_level(logging.WARNING, logger="KneeBoneSegLib.io.images"):
        volume = read_volume(tmp_path)

    assert volume.array.shape == (5, 12, 10)
    np.testing.assert_array_equal(volume.array[:, 0, 0], [200, 201, 202, 203, 204])
    assert volume.geometry.spacing == pytest.approx((0.5, 0.6, 1.5))
    assert volume.geometry.origin == pytest.approx((1.0, 2.0, 10.0))
    assert "1.2.826.0.1.3680043.2.1125.202 (5 slices)" in caplog.text
    assert "skipping 1 other series (3 slices)" in caplog.text


def test_a_slice_of_the_smaller_series_reads_that_series(tmp_path):
    write_dicom_series(tmp_path, "1.2.826.0.1.3680043.2.1125.101", [100, 101, 102], z0=0.0)
    write_dicom_series(tmp_path, "1.2.826.0.1.3680043.2.1125.202", [200, 201, 202, 203, 204], z0=10.0)

    volume = read_volume(tmp_path / "101_001.dcm")

    np.testing.assert_array_equal(volume.array[:, 0, 0], [100, 101, 102])


# --- refusals ----------------------------------------------------------------------------------


def assert_input_error_names(path, *words):
    with pytest.raises(InputError) as raised:
        read_volume(path)
    message = str(raised.value)
    assert str(path) in message
    assert "\n" not in message
    for word in words:
        assert word in message
    return message


def test_missing_path(tmp_path):
    assert_input_error_names(tmp_path / "no_such_scan.nrrd", "does not exist")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not a slice")
    (tmp_path / "sub").mkdir()
    write_dicom_series(tmp_path / "sub", "1.2.826.0.1.3680043.2.1125.7", [1, 2, 3], z0=0.0)

    assert_input_error_names(tmp_path, "no DICOM", "sub-folders")


@pytest.mark.parametrize(
    "name, content",
    [
        ("scan.nrrd", b"not an image at all"),
        ("scan.nii.gz", b"\x1f\x8b not gzip either"),
        ("scan.mha", b"ObjectType = "),
    ],
)
def test_unreadable_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert_input_error_names(path, "cannot be read")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.uint8)), str(path))
    assert_input_error_names(path, "not a supported image type")


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_cut_off_file_is_refused_not_zero_filled(tmp_path, rng, suffix):
    whole = write_with_sitk(tmp_path / f"whole{suffix}", rng.integers(1, 1000, (20, 30, 40)).astype(np.int16))
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 2 // 3])

    with pytest.raises(InputError, match="cut off|cannot be read") as raised:
        read_volume(cut)
    assert str(cut) in str(raised.value)


def test_2d_image(tmp_path):
    path = write_with_sitk(tmp_path / "slice.nrrd", np.arange(30, dtype=np.int16).reshape(5, 6))
    assert_input_error_names(path, "2D")


def test_single_slice_volume_counts_as_2d(tmp_path):
    path = write_with_sitk(tmp_path / "one_slice.nii.gz", np.arange(30, dtype=np.int16).reshape(1, 5, 6))
    assert_input_error_names(path, "2D")


def test_4d_image(tmp_path):
    frame = sitk.GetImageFromArray(np.ones((4, 5, 6), np.int16))
    path = tmp_path / "dynamic.nii"
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(path))
    assert_input_error_names(path, "4D")


def test_vector_image(tmp_path):
    path = write_with_sitk(tmp_path / "colour.nrrd", np.zeros((4, 5, 6, 3), np.uint8), vector=True)
    assert_input_error_names(path, "3 values per voxel")


# --- check_volume ------------------------------------------------------------------------------


def volume_of(array, spacing=(0.35, 0.35, 0.35)):
    return Volume(np.asarray(array), Geometry(spacing, (0, 0, 0)))


@pytest.mark.parametrize(
    "array, words",
    [
        (np.zeros((0, 5, 5), np.float32), "empty"),
        (np.full((8, 8, 8), 7, np.uint16), "constant"),
        (np.where(np.eye(8, dtype=bool)[None], np.nan, 1.0) * np.ones((8, 1, 1)), "NaN or infinite"),
        (np.where(np.arange(512).reshape(8, 8, 8) == 5, np.inf, 3.0), "1 NaN or infinite"),
    ],
)
def test_check_volume_refuses_unusable_volumes(array, words):
    with pytest.raises(InputError, match=words) as raised:
        check_volume(volume_of(array), "knee.nrrd")
    assert "knee.nrrd" in str(raised.value)


def test_check_volume_refuses_a_volume_smaller_than_one_sub_volume(rng):
    volume = volume_of(rng.random((80, 70, 50)))

    assert check_volume(volume, "knee.nrrd", min_shape=(48, 48, 48)) == []
    with pytest.raises(InputError, match=r"knee.nrrd is 50 x 70 x 80 voxels, smaller than the model's 64 x 64 x 64"):
        check_volume(volume, "knee.nrrd", min_shape=(64, 64, 64))


def test_check_volume_warns_about_thick_slices(rng, caplog):
    volume = volume_of(rng.random((10, 20, 20)), spacing=(0.35, 0.35, 3.0))

    with caplog.at_level(logging.WARNING, logger="KneeBoneSegLib.io.images"):
        warnings = check_volume(volume, "knee.nrrd")

    assert len(warnings) == 1
    assert "coarse along the inferior-superior direction (k axis, 3 mm)" in warnings[0]
    assert "nearly isotropic" in warnings[0]
    assert warnings[0] in caplog.text


def test_check_volume_names_the_coarse_patient_direction_of_an_oblique_grid(rng):
    # Coarse j axis whose direction is mostly anterior-posterior (LPS y).
    direction = np.array([[1, 0, 0], [0, 0.9, -0.43589], [0, 0.43589, 0.9]])
    volume = Volume(rng.random((10, 10, 10)), Geometry((0.5, 1.6, 0.5), (0, 0, 0), direction))

    (warning,) = check_volume(volume)

    assert "anterior-posterior direction (j axis" in warning
    assert warning.startswith("the input volume")


def test_check_volume_accepts_nearly_isotropic_volumes(sample_labels):
    assert check_volume(sample_labels, "knee_bones_labels.nrrd", min_shape=(64, 64, 64)) == []


# --- read_mask ---------------------------------------------------------------------------------


def test_read_mask_keeps_any_integer_labels(tmp_path):
    labels = np.zeros((6, 7, 8), np.int16)
    labels[1:3, 1:3, 1:3] = 7
    labels[4:6, 4:6, 4:7] = 300
    path = write_with_sitk(tmp_path / "labels.nii.gz", labels, oblique_geometry())

    mask = read_mask(path)

    np.testing.assert_array_equal(mask.array, labels)
    assert_same_geometry(mask.geometry, oblique_geometry(), 1e-5)


def test_read_mask_turns_a_whole_number_float_mask_into_integers(tmp_path):
    binary = np.zeros((6, 7, 8), np.float32)
    binary[2:5, 2:5, 2:5] = 1.0

    mask = read_mask(write_with_sitk(tmp_path / "mask.nrrd", binary))

    assert mask.array.dtype == np.uint8
    np.testing.assert_array_equal(mask.array, binary.astype(np.uint8))


def test_read_mask_keeps_a_probability_map_as_float(tmp_path, rng):
    probability = rng.random((6, 7, 8)).astype(np.float32)

    mask = read_mask(write_with_sitk(tmp_path / "probability.nrrd", probability))

    assert mask.array.dtype == np.float32
    np.testing.assert_array_equal(mask.array, probability)


@pytest.mark.parametrize(
    "array, words",
    [
        (np.zeros((6, 7, 8), np.uint8), "marks no voxels"),
        (np.linspace(-2, 3.5, 336).reshape(6, 7, 8), "fractional values outside 0..1"),
        (np.where(np.arange(336).reshape(6, 7, 8) == 3, np.nan, 1.0), "NaN"),
    ],
)
def test_read_mask_refuses_unusable_masks(tmp_path, array, words):
    path = write_with_sitk(tmp_path / "mask.nrrd", array)
    with pytest.raises(InputError, match=words) as raised:
        read_mask(path)
    assert str(path) in str(raised.value)


def test_read_mask_reads_a_slicer_segmentation_with_overlapping_segments(tmp_path):
    import slicerio

    geometry = oblique_geometry()
    shape_ijk = (9, 8, 7)
    first = np.zeros(shape_ijk, bool)
    first[1:6, 1:6, 1:5] = True
    second = np.zeros(shape_ijk, bool)
    second[4:8, 3:7, 2:6] = True  # overlaps ``first``: slicerio stores it in a second layer
    segmentation = slicerio.create_segmentation(shape_ijk, geometry.ijk_to_lps)
    slicerio.add_segment(segmentation, first, {"name": "bone A"})
    slicerio.add_segment(segmentation, second, {"name": "bone B"})
    assert segmentation["voxels"].ndim == 4
    path = tmp_path / "edited.seg.nrrd"
    slicerio.write_segmentation(str(path), segmentation)

    mask = read_mask(path)

    expected_ijk = np.where(second, 2, np.where(first, 1, 0))
    np.testing.assert_array_equal(mask.array, expected_ijk.transpose(2, 1, 0))
    assert_same_geometry(mask.geometry, geometry, 1e-12)


@pytest.mark.slow
def test_read_mask_of_the_sample_label_map(sample_dir, sample_labels):
    mask = read_mask(sample_dir / "knee_bones_labels.nrrd")

    assert mask.geometry == sample_labels.geometry
    assert np.bincount(mask.array.ravel()).tolist()[1:] == [
        3964981,
        2275584,
        426609,
    ]  # femur, tibia, patella voxels of the published label map


def test_overlapping_reads_in_threads_leave_itk_warnings_as_they_were():
    from KneeBoneSegLib.io.images import _itk_warnings_off

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    try:
        sitk.ProcessObject.SetGlobalWarningDisplay(True)
        first, second = _itk_warnings_off(), _itk_warnings_off()
        first.__enter__()  # one thread starts a read
        second.__enter__()  # another starts one before the first ends
        first.__exit__(None, None, None)
        assert not sitk.ProcessObject.GetGlobalWarningDisplay()  # still silenced for the read going on
        second.__exit__(None, None, None)
        assert sitk.ProcessObject.GetGlobalWarningDisplay()  # on again, as before both reads
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
