"""`kneeboneseg sample`: download the public dataset (or copy a local copy), check it, assemble it, against a local mirror built here.

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
from KneeBoneSegLib.errors import InputError, KneeBoneSegError, OutputError
from KneeBoneSegLib.io.images import read_volume, write_volume
from KneeBoneSegLib.io.sample import (
    DATASET_URL,
    IMAGE_FILE,
    LABELS_FILE,
    PUBLISHED_DIGESTS,
    array_digest,
    copy_sample,
    download_sample,
)


def _instance(path) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return int(reader.GetMetaData("0020|0013"))


@pytest.fixture(scope="module")
def mirror(sample_dir, sample_dicom, tmp_path_factory):
    """A zip laid out as the published dataset, holding the 16-slice subset, and the arrays it must give."""
    folder = tmp_path_factory.mktemp("mirror")
    scan, truth = read_volume(sample_dir / "knee_mri.nrrd"), read_volume(sample_dir / "knee_bones_labels.nrrd")
    slices = sorted(sample_dicom.glob("*.dcm"))
    # Where the subset sits in the whole scan: the slice whose voxels its first (most inferior) slice has.
    subset = sitk.GetArrayFromImage(sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(sample_dicom))))
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


def test_an_unpacked_copy_of_the_dataset_gives_what_the_download_gives(mirror, tmp_path):
    archive, expected, _ = mirror
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(tmp_path / "unpacked")
    written = copy_sample(tmp_path / "unpacked", tmp_path / "sample", expected=expected)
    assert [array_digest(read_volume(path).array) for path in written] == [expected[IMAGE_FILE], expected[LABELS_FILE]]


@pytest.mark.sample
def test_a_sample_folder_is_checked_against_the_published_voxels_and_copied(sample_dir, tmp_path):
    """``kneeboneseg sample --from`` needs no network; the sample folder holds the published dataset's voxels."""
    assert main(["sample", "--from", str(sample_dir), "-o", str(tmp_path / "sample")]) == 0
    for name in (IMAGE_FILE, LABELS_FILE):
        assert array_digest(read_volume(tmp_path / "sample" / name).array) == PUBLISHED_DIGESTS[name]
        assert (tmp_path / "sample" / name).read_bytes() == (sample_dir / name).read_bytes()

    labels = read_volume(sample_dir / LABELS_FILE)
    labels.array[0, 0, 0] = 2  # one voxel wrong
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    write_volume(labels, damaged / LABELS_FILE)
    (damaged / IMAGE_FILE).symlink_to(sample_dir / IMAGE_FILE)
    with pytest.raises(KneeBoneSegError, match=f"the {LABELS_FILE} assembled from .* differs"):
        copy_sample(damaged, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_a_folder_that_is_no_copy_of_the_dataset_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "scans" / "Data").mkdir(parents=True)  # no GT-Masks/ beside it
    with pytest.raises(InputError, match="holds neither"):
        copy_sample(tmp_path / "scans", tmp_path / "sample")
    code = main(["sample", "--from", str(tmp_path / "absent"), "-o", str(tmp_path / "sample")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--from" in err
    assert not (tmp_path / "sample").exists()


def test_the_command_line_reports_an_unreachable_source_in_one_line(tmp_path, capsys):
    code = main(["sample", "-o", str(tmp_path / "sample"), "--url", (tmp_path / "absent.zip").as_uri()])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "could not download the sample scan" in err and "--url" in err
    assert not (tmp_path / "sample").exists()


def test_the_default_source_is_the_public_dataset_at_a_pinned_commit():
    assert DATASET_URL.startswith("https://github.com/diego-romano/KneeBones3Dify-Annotated-Dataset/archive/")
    assert len(DATASET_URL.rsplit("/", 1)[1].removesuffix(".zip")) == 40
