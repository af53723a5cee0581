"""`kneeboneseg sample`: download the public dataset, check it, assemble it, against a local mirror built here.

These machines cannot reach the dataset's hosts, so the mirror is made the
way the dataset is published (DICOM slices in Data/, one PNG mask per slice
named by DICOM instance in GT-Masks/, in one zip) from the 16 original DICOM
slices of the sample folder and the matching slices of its ground truth.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from KneeBoneSegLib.cli import main
from KneeBoneSegLib.errors import KneeBoneSegError, OutputError
from KneeBoneSegLib.io import read_volume
from KneeBoneSegLib.sample import DATASET_URL, IMAGE_FILE, LABELS_FILE, array_digest, download_sample


def _instance(path) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return int(reader.GetMetaData("0020|0013"))


@pytest.fixture(scope="module")
def mirror(sample_dir, tmp_path_factory):
    """A zip laid out as the published dataset, holding the 16-slice subset, and the arrays it must give."""
    folder = tmp_path_factory.mktemp("mirror")
    scan, truth = read_volume(sample_dir / "knee_mri.nrrd"), read_volume(sample_dir / "knee_bones_labels.nrrd")
    slices = sorted((sample_dir / "dicom_subset").glob("*.dcm"))
    # Where the subset sits in the whole scan: the slice whose voxels its first (most inferior) slice has.
    subset = sitk.GetArrayFromImage(sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(sample_dir / "dicom_subset"))))
    first = next(k for k in range(scan.array.shape[0]) if np.array_equal(scan.array[k], subset[0]))
    expected_image, expected_labels = scan.array[first : first + len(slices)], truth.array[first : first + len(slices)]
    # Instances count down from the top of the knee: the most superior subset slice has the lowest number.
    top_instance = min(_instance(path) for path in slices)
    archive = folder / "dataset.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in slices:
            bundle.write(path, f"KneeBones3Dify-mirror/Data/{path.name}")
            instance = _instance(path)
            k = len(slices) - 1 - (instance - top_instance)
            png = folder / f"Mask_{instance:03d}.png"
            sitk.WriteImage(sitk.GetImageFromArray((expected_labels[k] > 0).astype(np.uint8) * 255), str(png))
            bundle.write(png, f"KneeBones3Dify-mirror/GT-Masks/{png.name}")
    expected = {IMAGE_FILE: array_digest(expected_image), LABELS_FILE: array_digest(expected_labels)}
    return archive, expected, scan.geometry.cropped((first, 0, 0))


def test_the_mirror_assembles_to_the_same_voxels_and_geometry_as_the_sample_folder(mirror, tmp_path):
    archive, expected, geometry = mirror
    written = download_sample(tmp_path / "sample", url=archive.as_uri(), expected=expected)
    assert [path.name for path in written] == [IMAGE_FILE, LABELS_FILE]
    image, labels = read_volume(written[0]), read_volume(written[1])
    assert array_digest(image.array) == expected[IMAGE_FILE] and array_digest(labels.array) == expected[LABELS_FILE]
    assert set(np.unique(labels.array)) == {0, 1, 3}  # these slices cut the femur and the patella
    np.testing.assert_allclose(image.geometry.origin, geometry.origin, atol=1e-3)
    np.testing.assert_allclose(image.geometry.direction, geometry.direction, atol=1e-4)


def test_a_damaged_download_is_refused_and_nothing_is_written(mirror, tmp_path):
    archive, expected, _ = mirror
    damaged = dict(expected, **{LABELS_FILE: array_digest(np.zeros(3, np.uint8))})
    with pytest.raises(KneeBoneSegError, match="differs from the published dataset's; nothing was written"):
        download_sample(tmp_path / "sample", url=archive.as_uri(), expected=damaged)
    assert not (tmp_path / "sample").exists()


def test_an_occupied_folder_is_left_alone(mirror, tmp_path):
    archive, expected, _ = mirror
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="already holds files"):
        download_sample(tmp_path / "sample", url=archive.as_uri(), expected=expected)
    assert [p.name for p in (tmp_path / "sample").iterdir()] == ["notes.txt"]


def test_the_command_line_reports_an_unreachable_source_in_one_line(tmp_path, capsys):
    code = main(["sample", "-o", str(tmp_path / "sample"), "--url", (tmp_path / "absent.zip").as_uri()])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "could not download the sample scan" in err and "--url" in err
    assert not (tmp_path / "sample").exists()


def test_the_default_source_is_the_public_dataset_at_a_pinned_commit():
    assert DATASET_URL.startswith("https://github.com/diego-romano/KneeBones3Dify-Annotated-Dataset/archive/")
    assert len(DATASET_URL.rsplit("/", 1)[1].removesuffix(".zip")) == 40
