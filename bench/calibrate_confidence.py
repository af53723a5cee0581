"""Calibrate the shipped model's ``review`` thresholds held out, and record what it was trained on.

    python bench/calibrate_confidence.py [--write-card] [--json bench/results/confidence.json]

Confidence thresholds. Each fold model segments the whole sample scan with
the default pipeline; its bones' confidence (``confidence.bone_confidence``)
counts only the voxels on its held-out side of the split (the same sides as
``heldout_table.py``), which that model never trained on. So the thresholds
come from predictions of the shipped recipe on unseen bone, never from the
shipped model on its own training scan. A bone of which less than
:data:`MIN_HELD_OUT_PART` lies on a fold's held-out side is listed but not
used (the patella's 14-voxel edge beyond the split is no measure of the
patella). ``min_sure_share`` is the lowest held-out share of sure voxels,
``max_surface_disagreement`` the highest held-out surface disagreement
(rounded outward to 0.01): a bone that is less
sure than every held-out bone, or whose projections disagree more, gets
``review``. ``failed_sure_share`` is 0.5 by definition, not by data: below it
the network is unsure of most of the bone.

Training record. The card's ``trained_on`` gets the training scan's
acquisition from its DICOM tags (the sample's ``dicom_subset``, the same
series), its voxel size, the quantiles of its normalised tissue intensities
on the model's grid, and the histogram tolerance: the largest distance that
the training's own intensity augmentation (gamma and contrast at their
limits) makes from them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from _sample import sample_dir
from heldout_table import FAMILY, fold_names, split_of

from KneeBoneSegLib.anatomy import BONE_BY_KEY
from KneeBoneSegLib.io.images import read_volume
from KneeBoneSegLib.network.models import SHIPPED_MODEL, load_model, write_card
from KneeBoneSegLib.pipeline import SegmentOptions, segment
from KneeBoneSegLib.training.augmentation import Augmentation
from KneeBoneSegLib.trust.confidence import bone_confidence
from KneeBoneSegLib.trust.inputcheck import histogram_distance, is_fat_suppressed, tissue_quantiles

FAILED_SURE_SHARE = 0.5
#: Least share of a bone's voxels on a fold's held-out side for that bone to count in the calibration.
MIN_HELD_OUT_PART = 0.25


def augmented_quantiles(image: np.ndarray, augmentation: Augmentation) -> list[np.ndarray]:
    """Tissue quantiles of ``image`` under the training's gamma and contrast at their four extreme combinations."""
    found = []
    for gamma in (-augmentation.gamma, augmentation.gamma):
        for contrast in (1 - augmentation.contrast, 1 + augmentation.contrast):
            changed = np.clip(image, 0.0, None) ** np.float32(np.exp(gamma))
            mean = changed.mean()
            found.append(tissue_quantiles((changed - mean) * np.float32(contrast) + mean))
    return found


def training_record(volume, dicom_tags: dict, model) -> dict:
    image = model.model_input(volume).image  # the scan as the network sees it
    reference = tissue_quantiles(image)
    tolerance = max(histogram_distance(q, reference) for q in augmented_quantiles(image, Augmentation()))
    return {
        "source": "the KneeBones3Dify sample scan (DICOM tags of its dicom_subset, same series)",
        "field_strength_t": round(float(dicom_tags["MagneticFieldStrength"]), 3),
        "scanning_sequence": dicom_tags["ScanningSequence"],
        "sequence": f"{dicom_tags['SequenceName']} (steady-state gradient echo, T2-like contrast)",
        "echo_time_ms": float(dicom_tags["EchoTime"]),
        "fat_suppressed": is_fat_suppressed(dicom_tags),
        "body_part": dicom_tags.get("BodyPartExamined", ""),
        "voxel_size_mm": [round(s, 4) for s in volume.geometry.spacing],
        "tissue_quantiles": [round(float(q), 4) for q in reference],
        "histogram_tolerance": round(float(np.ceil(tolerance * 100) / 100), 2),
    }


def heldout_confidence(volume, models_dir: Path) -> list[dict]:
    """Per fold and bone: confidence on the fold's held-out side of the split."""
    models = [load_model(models_dir / name) for name in fold_names(FAMILY)]
    split, sides = split_of([model.card for model in models])
    rows = []
    for side, counted in (("low", slice(0, split)), ("high", slice(split, volume.array.shape[2]))):
        model = models[sides[side]]
        options = SegmentOptions(surfaces=False, keep_uncertainty=model.card.projections == 3)
        result = segment(volume, model, options)
        measured = bone_confidence(
            result.labels, result.probability, result.uncertainty, options.threshold, counted_i=counted
        )
        for bone, entry in measured.items():
            label = BONE_BY_KEY[bone].label
            part = np.count_nonzero(result.labels[..., counted] == label) / np.count_nonzero(result.labels == label)
            rows.append(
                {
                    "model": model.card.name,
                    "i_range": [counted.start, counted.stop],
                    "bone": bone,
                    "held_out_part": round(part, 3),
                    **entry,
                }
            )
            print(
                f"{model.card.name:34s} i {counted.start:3d}-{counted.stop:3d} {bone:8s} {100 * part:3.0f} % of it held out: "
                f"sure {entry['sure_share']:.4f}  surface disagreement {entry['surface_disagreement']}"
                + ("" if part >= MIN_HELD_OUT_PART else "  (not used: too little of it held out)"),
                flush=True,
            )
    return rows


def max_disagreement(rows: list[dict]) -> float | None:
    """The highest held-out surface disagreement, rounded up to 0.01; None where the default run predicts one projection."""
    found = [row["surface_disagreement"] for row in rows if row["surface_disagreement"] is not None]
    return float(np.ceil(max(found) * 100) / 100) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path(__file__).resolve().parent.parent / "Resources" / "Models")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--write-card", action="store_true", help="record thresholds and training record in the shipped model's card"
    )
    args = parser.parse_args()
    data = sample_dir()
    volume = read_volume(data / "knee_mri.nrrd")
    shipped = load_model(args.models / SHIPPED_MODEL)
    record = training_record(volume, read_volume(data / "dicom_subset").tags, shipped)
    print(f"training record: {json.dumps(record)}", flush=True)
    rows = heldout_confidence(volume, args.models)
    used = [row for row in rows if row["held_out_part"] >= MIN_HELD_OUT_PART]
    thresholds = {
        "min_sure_share": float(np.floor(min(r["sure_share"] for r in used) * 100) / 100),
        "max_surface_disagreement": max_disagreement(used),
        "failed_sure_share": FAILED_SURE_SHARE,
        "calibrated_on": "held-out sides of the sample scan, fold models (bench/calibrate_confidence.py)",
    }
    print(f"thresholds: {json.dumps(thresholds)}")
    if args.json:
        args.json.write_text(
            json.dumps({"trained_on": record, "heldout": rows, "confidence": thresholds}, indent=2) + "\n",
            encoding="utf-8",
        )
    if args.write_card:
        print(f"wrote {write_card(replace(shipped.card, trained_on=record, confidence=thresholds), shipped.path)}")


if __name__ == "__main__":
    main()
