"""Reading scans and masks, checking that they can be segmented, writing volumes.

Every reader returns a :class:`~KneeBoneSegLib.volume.Volume` whose geometry is
SimpleITK's own spacing, origin and direction, unchanged. Every problem a user
can fix is raised as :class:`~KneeBoneSegLib.errors.InputError` with one line
that names the file and says what to do.

Formats: NRRD (``.nrrd``, ``.nhdr``), NIfTI (``.nii``, ``.nii.gz``), MetaImage
(``.mha``, ``.mhd``) and DICOM series (a folder of slices, or any one slice of
the series). Masks may also be Slicer segmentations (``.seg.nrrd``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, OutputError
from ..preprocess.resampling import grid_shape_for_spacing
from ..volume import Geometry, Volume

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
WRITE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
SEGMENTATION_SUFFIX = ".seg.nrrd"
#: DICOM tags kept with a volume read from DICOM (``Volume.tags``, keyword: tag), for the input check
#: against the model's card (``inputcheck``).
DICOM_TAGS = {
    "MagneticFieldStrength": "0018|0087",
    "ScanningSequence": "0018|0020",
    "SequenceName": "0018|0024",
    "ScanOptions": "0018|0022",
    "EchoTime": "0018|0081",
    "InversionTime": "0018|0082",
    "BodyPartExamined": "0018|0015",
}
#: DICOM tags that name a series (keyword: tag), for :func:`find_scans`.
_SERIES_TAGS = {
    "PatientID": "0010|0020",
    "StudyDate": "0008|0020",
    "SeriesNumber": "0020|0011",
    "SeriesInstanceUID": "0020|000e",
}
# Largest ratio of voxel sizes the model handles without a warning: it was
# trained on nearly isotropic scans (0.35 x 0.35 x 0.35 mm).
ANISOTROPY_LIMIT = 2.0

_WHAT_TO_GIVE = "give a NRRD (.nrrd), NIfTI (.nii, .nii.gz) or MetaImage (.mha, .mhd) file or a folder of DICOM slices"
_LPS_AXIS_NAMES = ("left-right", "anterior-posterior", "inferior-superior")


def read_volume(path) -> Volume:
    """Read a 3D scalar image from a file or a DICOM series folder.

    Parameters
    ----------
    path : str or Path
        An image file (NRRD, NIfTI, MetaImage), a folder holding a DICOM
        series, or one DICOM slice (its whole series is read from its folder).
        A folder with several series gives the one with the most slices.

    Returns
    -------
    Volume
        ``array[k, j, i]`` with the file's pixel type, and the image's spacing,
        origin and direction exactly as SimpleITK reports them.

    Raises
    ------
    InputError
        The path does not exist, holds no DICOM, cannot be read, or is not a
        single-channel 3D image.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path ({_WHAT_TO_GIVE})")
    if path.is_dir():
        image = _read_dicom_folder(path)
    elif _has_suffix(path, IMAGE_SUFFIXES):
        image = _read_image_file(path)
    elif _is_dicom_file(path):
        image = _read_dicom_series(path.parent, _series_uid(path), path)
    else:
        raise InputError(f"{path} is not a supported image type; {_WHAT_TO_GIVE}")
    volume = image_to_volume(image)
    log.info(
        "Read %s: %s voxels of %s, spacing %s mm",
        path,
        " x ".join(map(str, volume.shape_ijk)),
        volume.array.dtype,
        " x ".join(f"{s:.4g}" for s in volume.geometry.spacing),
    )
    return volume


def image_name(path) -> str:
    """A file's name without its image suffix (``knee.nii.gz`` gives ``knee``), else without its last suffix."""
    path = Path(path)
    suffix = next((suffix for suffix in IMAGE_SUFFIXES if path.name.lower().endswith(suffix)), path.suffix)
    return path.name[: len(path.name) - len(suffix)]


def find_scans(folder) -> tuple[list[Path], list[tuple[Path, dict]]]:
    """The scans in the tree under ``folder``: image files, and DICOM series.

    Returns ``(image_files, series)``, sorted: every NRRD, NIfTI or MetaImage
    file (segmentations left out), and for every DICOM series its first file,
    from which :func:`read_volume` reads the whole series, with its
    ``PatientID``, ``StudyDate``, ``SeriesNumber`` and ``SeriesInstanceUID``
    (empty when absent). GDCM's warnings about folders without DICOM stay off
    the terminal.
    """
    files = sorted(path for path in Path(folder).rglob("*") if path.is_file())
    images = [
        path for path in files if _has_suffix(path, IMAGE_SUFFIXES) and not _has_suffix(path, SEGMENTATION_SUFFIX)
    ]
    others = {path.parent for path in files if not _has_suffix(path, IMAGE_SUFFIXES)}
    series = []
    for directory in sorted(others):
        with _itk_warnings_off():
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))
        for uid in uids:
            first = Path(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), uid)[0])
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(first))
            reader.ReadImageInformation()
            tags = {
                name: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
                for name, tag in _SERIES_TAGS.items()
            }
            series.append((first, {**tags, "SeriesInstanceUID": tags["SeriesInstanceUID"] or uid}))
    return images, series


def read_mask(path) -> Volume:
    """Read a binary mask, a label map or a bone probability map on its own grid.

    Parameters
    ----------
    path : str or Path
        Any file :func:`read_volume` reads, or a Slicer segmentation
        (``.seg.nrrd``, overlapping segments included).

    Returns
    -------
    Volume
        Integer labels (0 background; any other value a structure) for masks,
        label maps and segmentations, where a segmentation's segments keep
        their label values if they share one layer and are numbered 1, 2, ...
        in segment order otherwise. A floating-point map with fractional values
        in [0, 1] stays a probability map (float).

    Raises
    ------
    InputError
        Anything :func:`read_volume` refuses, and a mask that is all
        background, holds NaN or infinite values, or holds fractional values
        outside [0, 1].
    """
    path = Path(path)
    if path.name.lower().endswith(SEGMENTATION_SUFFIX) and path.is_file():
        volume = _read_slicer_segmentation(path)
    else:
        volume = read_volume(path)
    array = volume.array
    if np.issubdtype(array.dtype, np.floating):
        _require_finite(array, path)
        if np.array_equal(array, np.round(array)):
            array = _as_label_array(array)
        elif array.min() < 0 or array.max() > 1:
            raise InputError(
                f"{path} holds fractional values outside 0..1; give a binary mask, a label map or a bone probability map"
            )
    elif not np.issubdtype(array.dtype, np.integer):
        raise InputError(
            f"{path} holds {array.dtype} voxels; give a binary mask, a label map or a bone probability map"
        )
    if not np.any(array):
        raise InputError(f"{path} marks no voxels (every voxel is 0); give a mask or label map that contains the bones")
    return Volume(array, volume.geometry)


def check_volume(volume: Volume, path=None, min_shape=None, model_spacing=None) -> list[str]:
    """Refuse volumes that cannot be segmented; warn about ones that segment poorly.

    Parameters
    ----------
    volume : Volume
        The scan to segment.
    path : str or Path, optional
        Where it came from, to name it in messages.
    min_shape : tuple of 3 int, optional
        The network's sub-volume size in voxels (k, j, i); a scan smaller than
        that along any axis is refused.
    model_spacing : sequence of 3 float, optional
        The model's voxel size in mm (its card's ``spacing_mm``), if it works
        on its own grid: ``min_shape`` then counts voxels of that grid, which
        the scan is resampled to before the network.

    Returns
    -------
    list of str
        Warnings (also logged), e.g. for strongly anisotropic voxels.

    Raises
    ------
    InputError
        An empty or constant volume, NaN or infinite voxels, or a volume
        smaller than ``min_shape``.
    """
    name = str(path) if path is not None else "the input volume"
    array = volume.array
    if array.size == 0:
        raise InputError(f"{name} is empty ({_format_shape(volume.shape_ijk)} voxels); give a scan that holds an image")
    _require_finite(array, name)
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(
            f"{name} is constant (every voxel is {low}); it holds no image, check that it is the right scan"
        )
    if min_shape is not None:
        _require_min_shape(volume, name, min_shape, model_spacing)
    warnings = []
    spacing = np.asarray(volume.geometry.spacing)
    if spacing.max() > ANISOTROPY_LIMIT * spacing.min():
        coarse = int(np.argmax(spacing))
        lps_axis = int(np.argmax(np.abs(volume.geometry.direction_matrix[:, coarse])))
        warnings.append(
            f"{name} has voxels of {' x '.join(f'{s:.3g}' for s in spacing)} mm: results will be coarse along the "
            f"{_LPS_AXIS_NAMES[lps_axis]} direction ({'ijk'[coarse]} axis, {spacing[coarse]:.3g} mm); "
            "the model expects nearly isotropic voxels"
        )
    for warning in warnings:
        log.warning(warning)
    return warnings


def _require_min_shape(volume: Volume, name: str, min_shape, model_spacing) -> None:
    min_ijk = tuple(int(n) for n in min_shape[::-1])
    if model_spacing:
        shape_ijk = grid_shape_for_spacing(volume.array.shape, volume.geometry.spacing, model_spacing)[::-1]
        where = f"{_format_shape(shape_ijk)} voxels on the model's {' x '.join(f'{s:g}' for s in np.broadcast_to(model_spacing, 3))} mm grid"
    else:
        shape_ijk, where = volume.shape_ijk, f"{_format_shape(volume.shape_ijk)} voxels"
    if any(n < m for n, m in zip(shape_ijk, min_ijk)):
        raise InputError(
            f"{name} is {where}, smaller than the model's {_format_shape(min_ijk)} sub-volume; "
            "give a scan that covers the whole knee"
        )


def write_volume(volume: Volume, path) -> Path:
    """Write ``volume`` with its geometry, compressed; the format follows the suffix.

    Supports ``.nrrd``, ``.nii``, ``.nii.gz`` and ``.mha``. The file is written
    in place: write into an :func:`~KneeBoneSegLib.atomic.output_directory`
    staging folder to get all-or-nothing outputs.
    """
    path = Path(path)
    if not _has_suffix(path, WRITE_SUFFIXES):
        raise OutputError(f"{path}: cannot write this file type; use {', '.join(WRITE_SUFFIXES)}")
    try:
        sitk.WriteImage(volume_to_image(volume), str(path), useCompression=True)
    except RuntimeError as error:
        raise OutputError(
            f"{path} cannot be written ({_first_line(error)}); check the folder and free disk space"
        ) from None
    return path


def image_to_volume(image: sitk.Image) -> Volume:
    """A SimpleITK image as a :class:`Volume` (array[k, j, i], geometry unchanged, :data:`DICOM_TAGS` it carries)."""
    tags = {keyword: image.GetMetaData(tag).strip() for keyword, tag in DICOM_TAGS.items() if image.HasMetaDataKey(tag)}
    return Volume(
        sitk.GetArrayFromImage(image), Geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection()), tags
    )


def volume_to_image(volume: Volume) -> sitk.Image:
    """A :class:`Volume` as a SimpleITK image; boolean masks become uint8."""
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(volume.geometry.spacing)
    image.SetOrigin(volume.geometry.origin)
    image.SetDirection(volume.geometry.direction)
    return image


def geometry_from_ijk_to_lps(matrix) -> Geometry:
    """The :class:`Geometry` of a 4x4 (i, j, k, 1) -> LPS matrix (inverse of ``Geometry.ijk_to_lps``)."""
    matrix = np.asarray(matrix, dtype=float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    return Geometry(tuple(spacing), tuple(matrix[:3, 3]), tuple((matrix[:3, :3] / spacing).ravel()))


def _read_image_file(path: Path) -> sitk.Image:
    """Read an image file, checking its dimension and channels before its voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        _require_3d_scalar(reader.GetSize(), reader.GetNumberOfComponents(), path)
        if _has_suffix(path, (".nii", ".nii.gz")) and _nifti_is_cut_off(path, reader):
            raise InputError(f"{path} is cut off: it holds fewer voxels than its header says; copy or export it again")
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(
            f"{path} cannot be read ({_first_line(error)}); check that it is a whole NRRD, NIfTI or MetaImage file"
        ) from None


def _nifti_is_cut_off(path: Path, reader: sitk.ImageFileReader) -> bool:
    """Whether a NIfTI file is shorter than its header says.

    ITK fills the missing voxels of a cut-off NIfTI file with zeros instead of
    failing (NRRD and MetaImage readers do fail). The expected length is the
    voxel offset plus the voxel data; a ``.nii.gz`` stores its uncompressed
    length (modulo 2**32) in its last four bytes.
    """
    header = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    if not {"dim[0]", "bitpix", "vox_offset"} <= header.keys():
        return False
    voxels = math.prod(int(header[f"dim[{axis}]"]) for axis in range(1, int(header["dim[0]"]) + 1))
    expected = int(float(header["vox_offset"])) + voxels * int(header["bitpix"]) // 8
    if path.name.lower().endswith(".gz"):
        with path.open("rb") as file:
            file.seek(-4, os.SEEK_END)
            return int.from_bytes(file.read(4), "little") != expected % 2**32
    return path.stat().st_size < expected


def _read_dicom_folder(folder: Path) -> sitk.Image:
    """Read the DICOM series with the most slices in ``folder`` (not its sub-folders)."""
    with _itk_warnings_off():
        series_uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_uids:
        raise InputError(f"{folder} holds no DICOM series (sub-folders are not searched); {_WHAT_TO_GIVE}")
    files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series_uids}
    chosen = max(series_uids, key=lambda uid: len(files[uid]))
    if len(series_uids) > 1:
        log.warning(
            "%s holds %d DICOM series; reading %s (%d slices) and skipping %d other series (%s slices)",
            folder,
            len(series_uids),
            chosen,
            len(files[chosen]),
            len(series_uids) - 1,
            ", ".join(str(len(files[uid])) for uid in series_uids if uid != chosen),
        )
    return _read_dicom_files(files[chosen], folder)


def _read_dicom_series(folder: Path, series_uid: str, path: Path) -> sitk.Image:
    """Read the series ``series_uid`` from ``folder``; ``path`` names it in messages."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    if not files:
        raise InputError(f"{path} is a DICOM file whose series cannot be found in its folder; give the series folder")
    log.info("%s is one DICOM slice; reading its series (%d slices) from %s", path, len(files), folder)
    return _read_dicom_files(files, path)


def _read_dicom_files(files, path: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(
            f"{path}: the DICOM series cannot be read ({_first_line(error)}); check that its files are whole"
        ) from None
    _require_3d_scalar(image.GetSize(), image.GetNumberOfComponentsPerPixel(), path)
    for tag in DICOM_TAGS.values():  # the series reader keeps them per slice; the first slice's stand for the series
        if reader.HasMetaDataKey(0, tag):
            image.SetMetaData(tag, reader.GetMetaData(0, tag))
    return image


def _is_dicom_file(path: Path) -> bool:
    return sitk.ImageFileReader.GetImageIOFromFileName(str(path)) == "GDCMImageIO"


def _series_uid(path: Path) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData("0020|000e").strip()
    except RuntimeError as error:
        raise InputError(
            f"{path} is not a readable DICOM slice ({_first_line(error)}); give the series folder"
        ) from None


def _read_slicer_segmentation(path: Path) -> Volume:
    """A ``.seg.nrrd`` as one label map; overlapping segments (layers) are numbered in segment order."""
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # pynrrd and slicerio raise many types for a damaged or foreign file
        raise InputError(
            f"{path} cannot be read as a Slicer segmentation ({_first_line(error)}); re-save it from Slicer"
        ) from None
    voxels, segments = segmentation["voxels"], segmentation.get("segments", [])
    if voxels.ndim == 3:
        labels_ijk = voxels
    else:
        labels_ijk = np.zeros(voxels.shape[1:], np.uint8 if len(segments) < 256 else np.uint16)
        for number, segment in enumerate(segments, start=1):
            labels_ijk[slicerio.segment_mask(segmentation, segment)] = number
    log.info("Read %s: segments %s", path, ", ".join(segment.get("name", "?") for segment in segments))
    # slicerio keeps NRRD's (i, j, k) order; a Volume is (k, j, i)
    return Volume(
        np.ascontiguousarray(labels_ijk.transpose(2, 1, 0)), geometry_from_ijk_to_lps(segmentation["ijkToLPS"])
    )


def _require_3d_scalar(size, components: int, path: Path) -> None:
    shape = _format_shape(size)
    if len(size) == 2 or (len(size) == 3 and min(size) == 1):
        raise InputError(f"{path} is a 2D image ({shape} voxels); give a 3D scan (the whole series, not one slice)")
    if len(size) > 3:
        raise InputError(
            f"{path} is a {len(size)}D image ({shape} voxels); give a single 3D volume (one time point or echo)"
        )
    if components > 1:
        raise InputError(
            f"{path} has {components} values per voxel (a vector or colour image); give a single-channel (grayscale) 3D scan"
        )


def _require_finite(array: np.ndarray, name) -> None:
    if np.issubdtype(array.dtype, np.inexact):
        bad = array.size - np.count_nonzero(np.isfinite(array))
        if bad:
            raise InputError(f"{name} holds {bad} NaN or infinite voxels; fix or re-export the image")


def _as_label_array(array: np.ndarray) -> np.ndarray:
    """Whole-number floats as integers: uint8 where they fit (the usual mask), else int64."""
    fits_uint8 = array.min() >= 0 and array.max() <= np.iinfo(np.uint8).max
    return array.astype(np.uint8 if fits_uint8 else np.int64)


def _has_suffix(path: Path, suffixes) -> bool:
    return path.name.lower().endswith(suffixes)


def _format_shape(size) -> str:
    return " x ".join(str(int(n)) for n in size)


def _first_line(error: Exception) -> str:
    """The gist of a (often multi-line) ITK or library error, without ITK's prefixes."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((line for line in lines if "ERROR" in line), lines[-1] if lines else type(error).__name__)
    return re.sub(r"^(sitk::ERROR|ITK ERROR):\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?", "", line)


_itk_warnings_lock = threading.Lock()
_itk_warnings_silencers = 0
_itk_warnings_shown = True


@contextlib.contextmanager
def _itk_warnings_off():
    """Silence ITK's stderr warnings (e.g. GDCM's "No Series were found") for a moment.

    ITK's warning display is one switch for the whole process. Reads in
    several threads at once share one silencing: the first to enter turns the
    display off, the last to leave restores what it was, so overlapping reads
    never leave it off (or turn it on under a read still going).
    """
    global _itk_warnings_silencers, _itk_warnings_shown
    with _itk_warnings_lock:
        if _itk_warnings_silencers == 0:
            _itk_warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
        _itk_warnings_silencers += 1
    try:
        yield
    finally:
        with _itk_warnings_lock:
            _itk_warnings_silencers -= 1
            if _itk_warnings_silencers == 0:
                sitk.ProcessObject.SetGlobalWarningDisplay(_itk_warnings_shown)
