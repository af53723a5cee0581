"""The public annotated low-field knee scan, downloaded and assembled as the NRRD volumes the tools read.

KneeBones3Dify-Annotated-Dataset (Soscia, Romano, Maddalena et al., 2024;
Zenodo DOI 10.5281/zenodo.10534328, GPL-3.0) is the paper's test scan: an
Esaote O-scan 0.3 T knee, 286 axial DICOM slices, and its ground truth as 286
binary PNG masks without geometry. :func:`download_sample` fetches the
dataset's archive, puts each mask on the slice it belongs to (``Mask_NNN.png``
is DICOM instance NNN), names the mask's connected components as bones and
checks both arrays against the published data's digests before it writes
``knee_mri.nrrd`` and ``knee_bones_labels.nrrd`` (1 femur, 2 tibia, 3
patella), the same voxels as the project's sample folder. Offline,
:func:`copy_sample` does the same from a local copy.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..anatomy import BONE_BY_KEY
from ..atomic import output_directory
from ..errors import InputError, KneeBoneSegError
from ..volume import Volume
from .dataset import DATASET_URL, IMAGE_FILE, LABELS_FILE, PUBLISHED_DIGESTS
from .images import image_to_volume, read_volume, write_volume

log = logging.getLogger(__name__)

_MASK_NAME = re.compile(r"Mask_(\d+)\.png$", re.IGNORECASE)


def array_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and voxels: equal digests mean the same voxels, whatever the file."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def download_sample(
    output,
    url: str = DATASET_URL,
    expected: dict | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> list[Path]:
    """Download the annotated knee scan from ``url`` and write it to the folder ``output``.

    Parameters
    ----------
    output : str or Path
        A new or empty folder; it gets ``knee_mri.nrrd`` and
        ``knee_bones_labels.nrrd``, both or neither.
    url : str
        The dataset's zip archive (its ``Data/`` DICOM slices and
        ``GT-Masks/`` PNG masks, in any top folder); ``file://`` URLs work.
    expected : dict, optional
        :func:`array_digest` of each file's array (default: the published
        dataset's). Arrays that differ are refused and nothing is written.
    progress : callable, optional
        ``progress(stage, fraction)`` during the download.

    Returns
    -------
    list of Path
        The two files written.
    """
    with tempfile.TemporaryDirectory(prefix="kneeboneseg-sample-") as scratch:
        archive = _download(url, Path(scratch) / "dataset.zip", progress)
        dataset = _unpack(archive, Path(scratch) / "dataset", url)
        image, labels = assemble_dataset(dataset)
        return _write_checked(image, labels, url, output, expected)


def copy_sample(source, output, expected: dict | None = None) -> list[Path]:
    """The annotated knee scan from a local copy, without a network: checked and written as :func:`download_sample` does.

    ``source`` is either the dataset as published, unpacked (a folder with
    ``Data/`` and ``GT-Masks/``, or one or two levels above it), or a folder
    that already holds ``knee_mri.nrrd`` and ``knee_bones_labels.nrrd``
    (another sample folder, whose files are copied byte for byte).
    Its voxels must be the published ones (``expected``, as in
    :func:`download_sample`); ``output`` gets both files or neither.
    """
    source = Path(source)
    if (source / IMAGE_FILE).is_file() and (source / LABELS_FILE).is_file():
        # Another sample folder: its files are copied as they are, once their voxels are checked.
        files = {name: source / name for name in (IMAGE_FILE, LABELS_FILE)}
        _check(read_volume(files[IMAGE_FILE]), read_volume(files[LABELS_FILE]), source, expected)
        with output_directory(output) as staging:
            for name, file in files.items():
                shutil.copyfile(file, staging / name)
        return [Path(output) / name for name in files]
    dataset = _dataset_folder(source)
    if dataset is None:
        raise InputError(
            f"{source} holds neither {IMAGE_FILE} and {LABELS_FILE} nor the dataset's Data/ and GT-Masks/ folders; "
            "pass --from the unpacked KneeBones3Dify dataset or a sample folder"
        )
    image, labels = assemble_dataset(dataset)
    return _write_checked(image, labels, source, output, expected)


def _check(image: Volume, labels: Volume, source, expected: dict | None) -> None:
    """Refuse a scan or labels whose voxels are not the published dataset's (``expected``: :func:`array_digest` by file)."""
    expected = PUBLISHED_DIGESTS if expected is None else expected
    for name, volume in ((IMAGE_FILE, image), (LABELS_FILE, labels)):
        if expected.get(name) and array_digest(volume.array) != expected[name]:
            raise KneeBoneSegError(
                f"the {name} assembled from {source} differs from the published dataset's; nothing was written "
                "(the copy may be damaged or the source changed: try again, or pass --url a mirror of the dataset)"
            )


def _write_checked(image: Volume, labels: Volume, source, output, expected: dict | None) -> list[Path]:
    """Write the scan and its labels to ``output`` if their voxels are the published dataset's; else nothing."""
    _check(image, labels, source, expected)
    with output_directory(output) as staging:
        for name, volume in ((IMAGE_FILE, image), (LABELS_FILE, labels)):
            write_volume(volume, staging / name)
    return [Path(output) / IMAGE_FILE, Path(output) / LABELS_FILE]


def assemble_dataset(folder) -> tuple[Volume, Volume]:
    """The scan and its bone labels from the dataset's ``Data/`` DICOM slices and ``GT-Masks/`` PNG masks.

    Each mask goes on the slice whose DICOM instance number it carries. The
    mask's 6-connected components are named as the dataset's authors drew
    them: the smallest of three is the patella; of the others, the superior
    one is the femur and the inferior one the tibia (a slab of the scan with
    fewer bones is named by the same rule).
    """
    folder = Path(folder)
    data, masks = folder / "Data", folder / "GT-Masks"
    if not data.is_dir() or not masks.is_dir():
        raise InputError(f"{folder} has no Data/ and GT-Masks/ folders; it is not the KneeBones3Dify dataset")
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(data))  # sorted by position, inferior to superior
    if not files:
        raise InputError(f"{data} holds no DICOM series")
    image = image_to_volume(sitk.ReadImage(files))
    mask_by_instance = {int(m.group(1)): path for path in masks.iterdir() if (m := _MASK_NAME.search(path.name))}
    bone = np.zeros(image.array.shape, bool)
    for k, file in enumerate(files):
        instance = _instance_number(file)
        if instance not in mask_by_instance:
            raise InputError(
                f"{masks} has no Mask_{instance:03d}.png for DICOM instance {instance} ({Path(file).name})"
            )
        slice_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_by_instance[instance])))
        bone[k] = (slice_mask.reshape(*slice_mask.shape[:2], -1) > 0).any(axis=-1)
    scan = Volume(image.array.astype(np.uint16), image.geometry)
    return scan, Volume(_name_components(bone, image), image.geometry)


def _name_components(bone: np.ndarray, image: Volume) -> np.ndarray:
    """Name the mask's regions: the patella is the small one (about a tenth of the femur), the femur lies above the tibia."""
    components, count = ndimage.label(bone)  # 6-connected, as the masks were drawn
    if not 1 <= count <= 3:
        raise InputError(f"the ground-truth masks hold {count} separate regions, not the dataset's three bones")
    sizes = np.bincount(components.ravel())[1:]
    remaining = [int(c) for c in np.argsort(sizes) + 1]
    labels = np.zeros(bone.shape, np.uint8)
    if count > 1 and sizes[remaining[0] - 1] < 0.25 * sizes.max():
        labels[components == remaining.pop(0)] = BONE_BY_KEY["patella"].label
    for key, component in zip(("femur", "tibia"), sorted(remaining, key=lambda c: -_height_mm(components == c, image))):
        labels[components == component] = BONE_BY_KEY[key].label
    return labels


def _height_mm(component: np.ndarray, image: Volume) -> float:
    """The LPS superior coordinate (mm) of a component's centroid."""
    centroid_kji = np.array([axis.mean() for axis in np.nonzero(component)])
    return float(image.geometry.index_to_lps(centroid_kji[::-1][None])[0][2])


def _instance_number(file: str) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.ReadImageInformation()
    return int(reader.GetMetaData("0020|0013").strip())


def _download(url: str, target: Path, progress) -> Path:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as stream:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: response.read(1 << 20), b""):
                stream.write(chunk)
                done += len(chunk)
                if progress is not None and total:
                    progress("download", done / total)
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise KneeBoneSegError(
            f"could not download the sample scan from {url} ({reason}); check the network connection or pass --url a mirror"
        ) from None
    log.info("Downloaded %s (%.0f MB)", url, target.stat().st_size / 2**20)
    return target


def _unpack(archive: Path, target: Path, url: str) -> Path:
    """Extract ``archive`` and return the folder inside it that holds ``Data/`` and ``GT-Masks/``."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(target)
    except zipfile.BadZipFile:
        raise KneeBoneSegError(f"{url} is not a zip archive; pass --url the dataset's archive") from None
    found = _dataset_folder(target)
    if found is None:
        shutil.rmtree(target, ignore_errors=True)
        raise KneeBoneSegError(f"{url} holds no Data/ and GT-Masks/ folders; it is not the KneeBones3Dify dataset")
    return found


def _dataset_folder(root: Path) -> Path | None:
    """``root``, or a folder one or two levels below it, that holds the dataset's ``Data/`` and ``GT-Masks/``.

    Not deeper: an archive unpacks into one top folder, and a wrong ``--from``
    (a home folder) must not be searched whole.
    """
    candidates = [root, *sorted(root.glob("*")), *sorted(root.glob("*/*"))] if root.is_dir() else []
    return next(
        (folder for folder in candidates if (folder / "Data").is_dir() and (folder / "GT-Masks").is_dir()), None
    )
