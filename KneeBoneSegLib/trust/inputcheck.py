"""Does this scan look like what the model was trained on? Compared with the model's card.

A model trained on one 0.3 T knee scan can label muscle as bone on a 3 T
fat-suppressed scan. Before the network runs, the input is compared with the
card's ``trained_on`` record:

- DICOM tags, where the input came from DICOM: field strength, fat
  suppression, sequence family and echo time, body part;
- voxel size, always: voxels much coarser than the model's grid lose detail;
- the intensity histogram's shape after the card's normalisation, always:
  the quantiles of the tissue (voxels above the air level) against the
  training scan's. Inverted contrast, suppressed fat, another weighting or
  another body part move them; the tolerance is the largest change the
  training's own intensity augmentation (gamma and contrast at their limits)
  makes on the training scan, i.e. what the model was taught to cope with.

Each difference is one plain sentence; the verdict turns any into ``review``.
"""

from __future__ import annotations

import numpy as np

from ..preprocess.normalization import air_level

#: Quantiles (per cent) of the normalised tissue intensities that describe the histogram's shape.
QUANTILES = tuple(range(5, 100, 5))

#: Voxels coarser than this many times the model's grid spacing lose detail the model relies on.
COARSE_VOXEL_FACTOR = 1.5

#: Field strengths within this many tesla of the training scan's count as the same kind of scanner.
FIELD_STRENGTH_TOLERANCE_T = 0.3

#: Echo times above this (ms) make a T2-weighted image, unlike a short-echo steady-state scan.
T2_WEIGHTED_ECHO_MS = 40.0

_FAT_SUPPRESSION_WORDS = ("FS", "FAT", "SPIR", "SPAIR", "STIR", "CHESS", "WE")
_KNEE_WORDS = ("KNEE", "LEG", "EXTREMITY", "LOWER LIMB", "LOWER_LIMB")


def tissue_quantiles(image: np.ndarray) -> np.ndarray:
    """:data:`QUANTILES` of the normalised intensities of the voxels above the air level (a strided sample)."""
    sample = image[::2, ::2, ::2]
    tissue = sample[sample >= air_level(image)]
    if tissue.size == 0:
        tissue = sample.ravel()
    return np.percentile(tissue, QUANTILES).astype(float)


def histogram_distance(quantiles, reference) -> float:
    """Mean absolute difference of two quantile sets: the Wasserstein-1 distance of the two histograms."""
    return float(np.mean(np.abs(np.asarray(quantiles, float) - np.asarray(reference, float))))


def compare_with_card(image: np.ndarray, spacing, tags: dict, card) -> dict:
    """Compare a normalised input with what ``card.trained_on`` records.

    Parameters
    ----------
    image : ndarray
        The input after the card's normalisation (on the model's grid).
    spacing : sequence of 3 float
        The input's voxel size (mm), before resampling.
    tags : dict
        DICOM tags by keyword (``Volume.tags``, see :data:`~KneeBoneSegLib.io.images.DICOM_TAGS`); empty for files without them.
    card : ModelCard

    Returns
    -------
    dict
        ``differences`` (plain sentences, empty when the input looks like the
        training data), ``histogram_distance`` and ``histogram_tolerance``
        (None without a record in the card), and ``checked`` (what was compared).
    """
    trained = card.trained_on or {}
    differences, checked = [], ["voxel size"]
    model_spacing = max(card.spacing_mm or trained.get("voxel_size_mm") or [0.0])
    if model_spacing and max(spacing) > COARSE_VOXEL_FACTOR * model_spacing:
        differences.append(
            f"voxels of {' x '.join(f'{s:.2g}' for s in spacing)} mm are coarser than the {model_spacing:g} mm the model works at "
            f"(trained on {' x '.join(f'{s:.2g}' for s in trained.get('voxel_size_mm', []))} mm)"
        )
    distance = None
    reference = trained.get("tissue_quantiles")
    if reference:
        checked.append("intensity histogram")
        quantiles = tissue_quantiles(image)
        distance = histogram_distance(quantiles, reference)
        if distance > trained["histogram_tolerance"]:
            inverted = histogram_distance(quantiles, 1.0 - np.asarray(reference)[::-1]) < distance
            differences.append(
                f"the intensity histogram differs from the training scan's (distance {distance:.2f}, "
                f"tolerance {trained['histogram_tolerance']:.2f})"
                + (
                    ": the contrast looks inverted"
                    if inverted
                    else ": another contrast, fat suppression or another body part"
                )
            )
    if tags:
        checked.append("DICOM tags")
        differences += _tag_differences(tags, trained)
    return {
        "differences": differences,
        "histogram_distance": None if distance is None else round(distance, 4),
        "histogram_tolerance": trained.get("histogram_tolerance"),
        "checked": checked,
    }


def _tag_differences(tags: dict, trained: dict) -> list[str]:
    """Plain sentences for the DICOM tags that differ from the training scan's."""
    differences = []
    field = _number(tags.get("MagneticFieldStrength"))
    if field is not None and "field_strength_t" in trained:
        if field > 10:  # some scanners write millitesla
            field /= 1000
        if abs(field - trained["field_strength_t"]) > FIELD_STRENGTH_TOLERANCE_T:
            differences.append(f"a {field:g} T scanner (the model was trained on {trained['field_strength_t']:g} T)")
    if is_fat_suppressed(tags) and not trained.get("fat_suppressed", False):
        differences.append("fat-suppressed (the model was trained without fat suppression)")
    echo = _number(tags.get("EchoTime"))
    if (
        echo is not None
        and echo > T2_WEIGHTED_ECHO_MS
        and trained.get("echo_time_ms", T2_WEIGHTED_ECHO_MS + 1) <= T2_WEIGHTED_ECHO_MS
    ):
        differences.append(
            f"T2-weighted, echo time {echo:g} ms (the model was trained at {trained['echo_time_ms']:g} ms)"
        )
    family = str(tags.get("ScanningSequence", "")).upper()
    if family and trained.get("scanning_sequence") and trained["scanning_sequence"] not in family:
        differences.append(
            f"scanning sequence {family.strip()} (the model was trained on {trained['scanning_sequence']}, gradient echo)"
        )
    body = str(tags.get("BodyPartExamined", "")).strip().upper()
    if body and not any(word in body for word in _KNEE_WORDS):
        differences.append(f"body part {body} (the model segments knees)")
    return differences


def is_fat_suppressed(tags: dict) -> bool:
    """Whether DICOM tags say fat suppression: scan options or sequence name (FS, SPAIR, STIR...) or a short inversion time."""
    words = " ".join(str(tags.get(key, "")) for key in ("ScanOptions", "SequenceName")).upper()
    tokens = set(words.replace("\\", " ").replace("_", " ").replace("-", " ").split())
    inversion = _number(tags.get("InversionTime"))
    return bool(tokens & set(_FAT_SUPPRESSION_WORDS)) or (inversion is not None and 0 < inversion < 250)


def _number(value) -> float | None:
    try:
        return float(str(value).split("\\")[0])
    except (TypeError, ValueError):
        return None
