"""Held-out quality of the shipped recipe on the sample scan, and the effect of each post-processing step.

    python bench/heldout_table.py [--models Resources/Models] [--json bench/results/heldout.json]

There is one annotated scan, so quality is measured by a spatial 2-fold split
along its first image axis i (left-right). Each fold model's card says which
range of i it never trained on (``heldout``); the two held-out ranges overlap
around the split, and each fold predicts the half of the scan on its
held-out side of the split's middle. The two halves are stitched into one
full-volume prediction, post-processed, and compared with the ground truth.
Every figure printed here is a held-out figure, except the last line, which
is the shipped model on the scan it was trained on and is labelled so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _sample import sample_dir

from KneeBoneSegLib.io import read_volume, write_volume
from KneeBoneSegLib.metrics import evaluate_labels, format_metrics_table
from KneeBoneSegLib.models import card_path, load_model
from KneeBoneSegLib.pipeline import SegmentOptions, postprocess, predict_projection_maps, segment
from KneeBoneSegLib.projections import fuse_probabilities
from KneeBoneSegLib.resampling import resample_to_shape
from KneeBoneSegLib.volume import Volume

FOLDS = ("kneeboneseg-compact-fold-right.onnx", "kneeboneseg-compact-fold-left.onnx")
SHIPPED = "kneeboneseg-compact.onnx"

#: (row name, projections, fusion, closing radius in voxels, fill holes, sub-volume stride or None for the
#: card's); the first row is the default pipeline.
VARIANTS = [
    ("3 projections, OR fusion, closing 9, fill (default)", 3, "or", 9, True, None),
    ("no hole filling", 3, "or", 9, False, None),
    ("no closing", 3, "or", 0, True, None),
    ("no closing, no hole filling (network and components only)", 3, "or", 0, False, None),
    ("closing radius 3", 3, "or", 3, True, None),
    ("closing radius 6", 3, "or", 6, True, None),
    ("closing radius 12", 3, "or", 12, True, None),
    ("1 projection (axial)", 1, "or", 9, True, None),
    ("3 projections, majority vote", 3, "vote", 9, True, None),
    ("3 projections, mean fusion", 3, "mean", 9, True, None),
    ("sub-volume stride 16 (half overlap; default 24)", 3, "or", 9, True, 16),
    ("sub-volume stride 32 (no overlap)", 3, "or", 9, True, 32),
]


def split_of(cards) -> tuple[int, dict]:
    """The split index along i and which fold predicts which side, from the folds' held-out ranges."""
    ranges = [(card.heldout["from"], card.heldout["to"]) for card in cards]
    overlap = (max(r[0] for r in ranges), min(r[1] for r in ranges))
    if overlap[0] >= overlap[1]:
        raise SystemExit(f"the folds' held-out ranges {ranges} do not overlap: no stitched held-out prediction is possible")
    split = (overlap[0] + overlap[1]) // 2
    low_side = [n for n, r in enumerate(ranges) if r[0] == 0]
    if len(low_side) != 1:
        raise SystemExit(f"expected one fold held out from i = 0, got ranges {ranges}")
    return split, {"low": low_side[0], "high": 1 - low_side[0], "ranges": ranges}


def fused_on_input_grid(maps, projections: int, fusion: str, shape) -> np.ndarray:
    fused = fuse_probabilities(maps[:projections], fusion)
    return resample_to_shape(fused, shape, order=1) if fused.shape != tuple(shape) else fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path(__file__).resolve().parent.parent / "Resources" / "Models")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--labels-out", type=Path, default=None, help="write the stitched held-out label map of the default row here")
    parser.add_argument("--no-training-figure", action="store_true", help="skip the shipped model on its own training scan")
    parser.add_argument("--write-card", action="store_true", help="record the figures in the shipped model's card (its 'quality')")
    args = parser.parse_args()
    data = sample_dir()
    scan = read_volume(data / "knee_mri.nrrd")
    truth = read_volume(data / "knee_bones_labels.nrrd").array
    spacing = scan.geometry.spacing
    models = [load_model(args.models / name) for name in FOLDS]
    split, sides = split_of([model.card for model in models])
    print(f"held-out split along i at {split}: {FOLDS[sides['low']]} predicts i < {split}, {FOLDS[sides['high']]} i >= {split}")
    print(f"held-out (never trained on) ranges of i: {dict(zip(FOLDS, sides['ranges']))}")

    maps_by_stride = {}

    def network_maps(stride):
        if stride not in maps_by_stride:
            maps_by_stride.clear()  # one set of maps at a time: each is a few hundred MB
            start = time.perf_counter()
            maps_by_stride[stride] = [predict_projection_maps(scan, model, SegmentOptions(projections=3, stride=stride)) for model in models]
            print(f"network, both folds, 3 projections, stride {stride or models[0].card.stride}: {time.perf_counter() - start:.0f} s")
        return maps_by_stride[stride]

    rows = {}
    for name, projections, fusion, radius, fill, stride in VARIANTS:
        maps = network_maps(stride)
        probability = np.empty(truth.shape, np.float32)
        low = fused_on_input_grid(maps[sides["low"]], projections, fusion, truth.shape)
        probability[..., :split] = low[..., :split]
        del low
        high = fused_on_input_grid(maps[sides["high"]], projections, fusion, truth.shape)
        probability[..., split:] = high[..., split:]
        del high
        options = SegmentOptions(projections=projections, fusion=fusion, closing_radius=radius, closing_units="voxels", fill_holes=fill, surfaces=False)
        labels = postprocess(Volume(probability, scan.geometry), options).labels
        rows[name] = evaluate_labels(labels, truth, spacing)
        if name == VARIANTS[0][0] and args.labels_out:
            write_volume(Volume(labels, scan.geometry), args.labels_out)
        print(f"{name:60} Dice {rows[name]['all']['dice']:.4f}  IoU {rows[name]['all']['iou']:.4f}  AHD {rows[name]['all']['ahd_voxels']:.4f} vox", flush=True)

    default = VARIANTS[0][0]
    print(f"\nheld-out, stitched 2-fold prediction, {default}:")
    print(format_metrics_table(rows[default]))
    print("paper (trained on another patient, this scan as test): DSC 0.9838, IoU 0.9682, AHD 0.0223")

    results = {"split_i": split, "folds": FOLDS, "heldout_ranges_i": sides["ranges"], "heldout": rows}
    if not args.no_training_figure and (args.models / SHIPPED).is_file():
        result = segment(scan, load_model(args.models / SHIPPED), SegmentOptions(surfaces=False))
        results["training_figure"] = evaluate_labels(result.labels, truth, spacing)
        print("\nTRAINING figure (the shipped model on the scan it was trained on; not a measure of quality):")
        print(format_metrics_table(results["training_figure"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.write_card:
        write_quality(args.models / SHIPPED, results, split)


def rounded(metrics: dict) -> dict:
    """Per-bone figures to 4 decimals, as a card holds them."""
    return {bone: {name: round(value, 4) for name, value in figures.items()} for bone, figures in metrics.items()}


def write_quality(model_path: Path, results: dict, split: int) -> None:
    """Record the held-out and training figures in the card beside ``model_path``."""
    card_file = card_path(model_path)
    card = json.loads(card_file.read_text(encoding="utf-8"))
    default = VARIANTS[0][0]
    card["quality"] = {
        "heldout": {
            "protocol": (
                f"2-fold spatial split of the annotated sample scan along image axis i at {split}: "
                f"{FOLDS[0]} and {FOLDS[1]} (same recipe) each predict the side they never trained on; "
                "the stitched full-volume prediction is post-processed and compared with the ground truth"
            ),
            "pipeline": default,
            "metrics": rounded(results["heldout"][default]),
        },
    }
    if "training_figure" in results:
        card["quality"]["training_figure"] = {
            "note": "this model on the scan it was trained on: not a measure of quality",
            "metrics": rounded(results["training_figure"]),
        }
    card_file.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"wrote the figures into {card_file.name}")


if __name__ == "__main__":
    main()
