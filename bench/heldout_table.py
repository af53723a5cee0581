"""Held-out quality of a family of models (the shipped one by default), and the effect of each setting.

    python bench/heldout_table.py [--models Resources/Models] [--family kneeboneseg-compact] [--json F] [--write-card]
    python bench/heldout_table.py --family kneeboneseg-slices --json F --beside OTHER.json   # two families side by side
    python bench/heldout_table.py --family kneeboneseg-slices --validation                  # to choose a setting

There is one annotated scan, so quality is measured by a spatial 2-fold split
along its first image axis i (left-right). Each fold model's card says which
range of i it never trained on (``heldout``); the two held-out ranges overlap
around the split, and each fold predicts the half of the scan on its
held-out side of the split's middle. Two ways, as the README reports them:

- **probabilities stitched**: the two folds' network outputs are stitched at
  the split into one full-volume probability map, which is then
  post-processed once (each ablation row changes one setting of that);
- **segmentations stitched**: each fold's own ``segment`` of the whole scan
  (default settings, what ``kneeboneseg segment --model FOLD.onnx`` gives
  anyone), and the two label maps stitched at the split.

``--validation`` scores fold-right alone on the band between its training
side and the split (172 <= i < 236), which no held-out figure covers: the
place to choose a setting, so that the held-out figures choose nothing.

A family is ``FAMILY.onnx`` (trained on the whole scan) with
``FAMILY-fold-right.onnx`` and ``FAMILY-fold-left.onnx`` beside it. Every
figure printed is a held-out figure, except the training figure, which is
``FAMILY.onnx`` on the scan it was trained on and is labelled so.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from _sample import sample_dir

from KneeBoneSegLib.io.images import read_volume, write_volume
from KneeBoneSegLib.metrics import evaluate_labels, format_metrics_table
from KneeBoneSegLib.network.inference import predict_whole_volume
from KneeBoneSegLib.network.models import SHIPPED_MODEL, load_model, network_dimensions, read_card, write_card
from KneeBoneSegLib.network.projections import fuse_probabilities
from KneeBoneSegLib.options import CLOSING_RADIUS_MM
from KneeBoneSegLib.pipeline import SegmentOptions, postprocess, segment
from KneeBoneSegLib.volume import Volume

FAMILY = Path(SHIPPED_MODEL).stem  # the shipped family
# Strides named for what they do, whatever a family's sub-volume size.
HALF_OVERLAP = "half"  # half the sub-volume
NO_OVERLAP = "whole sub-volume"
WHOLE_VOLUME = "whole volume"  # no tiles: the whole volume in one network call (Keras)

#: (row name, projections or None for the card's, fusion ("model": the card's), closing radius in mm, fill holes,
#: sub-volume stride: None for the card's, HALF_OVERLAP, NO_OVERLAP or WHOLE_VOLUME). The first row is the default pipeline.
VARIANTS = [
    ("default pipeline", None, "model", CLOSING_RADIUS_MM, True, None),
    ("no hole filling", None, "model", CLOSING_RADIUS_MM, False, None),
    ("no closing", None, "model", 0, True, None),
    ("no closing, no hole filling (network and components only)", None, "model", 0, False, None),
    ("3 projections, OR fusion (the paper's)", 3, "or", CLOSING_RADIUS_MM, True, None),
    ("3 projections, mean fusion", 3, "mean", CLOSING_RADIUS_MM, True, None),
    ("1 projection", 1, "or", CLOSING_RADIUS_MM, True, None),
    ("sub-volume stride: half the sub-volume (half overlap)", None, "or", CLOSING_RADIUS_MM, True, HALF_OVERLAP),
    ("sub-volume stride: the whole sub-volume (no overlap)", None, "or", CLOSING_RADIUS_MM, True, NO_OVERLAP),
    ("whole volume in one pass (no tiles), 1 projection", 1, "or", CLOSING_RADIUS_MM, True, WHOLE_VOLUME),
    ("whole volume in one pass, network and components only", 1, "or", 0, False, WHOLE_VOLUME),
]
#: The rows of a family of 2D networks (whole slices, no sub-volumes: no stride to vary).
SLICE_VARIANTS = [
    ("default pipeline", None, "model", CLOSING_RADIUS_MM, True, None),
    ("no hole filling", None, "model", CLOSING_RADIUS_MM, False, None),
    ("no closing", None, "model", 0, True, None),
    ("no closing, no hole filling (network and components only)", None, "model", 0, False, None),
    ("3 planes, OR fusion (the paper's)", 3, "or", CLOSING_RADIUS_MM, True, None),
    ("3 planes, OR fusion, no closing", 3, "or", 0, True, None),
    ("3 planes, mean fusion", 3, "mean", CLOSING_RADIUS_MM, True, None),
    ("3 planes, majority vote", 3, "vote", CLOSING_RADIUS_MM, True, None),
    ("axial slices alone", 1, "or", CLOSING_RADIUS_MM, True, None),
]
#: What the side-by-side table compares.
COMPARED = ("default pipeline", "no closing, no hole filling (network and components only)")


def variants_of(card) -> list:
    """The rows for a family whose fold's card is ``card``: sub-volume networks vary the stride, slice networks cannot."""
    return SLICE_VARIANTS if network_dimensions(card) == 2 else VARIANTS


def chosen_variants(card, compared_only: bool) -> list:
    """The family's rows (:func:`variants_of`), or only the :data:`COMPARED` ones."""
    return [row for row in variants_of(card) if row[0] in COMPARED or not compared_only]


def fold_names(family: str) -> tuple[str, str]:
    return f"{family}-fold-right.onnx", f"{family}-fold-left.onnx"


def split_of(cards) -> tuple[int, dict]:
    """The split index along i and which fold predicts which side, from the folds' held-out ranges."""
    ranges = [(card.heldout["from"], card.heldout["to"]) for card in cards]
    overlap = (max(r[0] for r in ranges), min(r[1] for r in ranges))
    if overlap[0] >= overlap[1]:
        raise SystemExit(
            f"the folds' held-out ranges {ranges} do not overlap: no stitched held-out prediction is possible"
        )
    split = (overlap[0] + overlap[1]) // 2
    low_side = [n for n, r in enumerate(ranges) if r[0] == 0]
    if len(low_side) != 1:
        raise SystemExit(f"expected one fold held out from i = 0, got ranges {ranges}")
    return split, {"low": low_side[0], "high": 1 - low_side[0], "ranges": ranges}


def stitched(low: np.ndarray, high: np.ndarray, split: int) -> np.ndarray:
    """``low`` below ``split`` along i (the last array axis), ``high`` from it on."""
    out = np.empty_like(low)
    out[..., :split] = low[..., :split]
    out[..., split:] = high[..., split:]
    return out


def whole_volume_map(scan: Volume, keras_path: Path) -> np.ndarray:
    """The network's probability on the model grid, the whole volume in one call (its ``.keras`` file on Keras)."""
    model = load_model(keras_path)
    return predict_whole_volume(
        model.model_input(scan).image, model.network.with_free_sides(), 2 ** model.card.architecture["depth"]
    )


def measure_validation(folder: Path, family: str, scan: Volume, truth: np.ndarray, compared_only: bool = False) -> dict:
    """Fold-right alone, each row of its family (or only the :data:`COMPARED` ones) scored on the band between its training side and the split."""
    names = fold_names(family)
    # Before this family's fold-left is trained, the shipped family's folds give the split (train_models.sh's, for both).
    cards = [read_card(folder / name) for name in names]
    split, _ = split_of(cards if cards[1] else [read_card(folder / name) for name in fold_names(FAMILY)])
    band = np.s_[..., cards[0].heldout["from"] : split]
    model = load_model(folder / names[0])
    print(
        f"\n== {family}: {names[0]} on its validation band {cards[0].heldout['from']} <= i < {split} (trained on i < {cards[0].heldout['from']}; not a held-out figure)"
    )
    network_maps = fold_maps(folder, names[:1], [model], scan)
    rows = {}
    for name, projections, fusion, radius_mm, fill, stride in chosen_variants(model.card, compared_only):
        projections = projections or model.card.projections
        (side_maps,) = network_maps(projections, stride)
        labels = row_labels(fused_on_scan(side_maps, fusion, model, scan), scan, projections, fusion, radius_mm, fill)
        rows[name] = evaluate_labels(labels[band], truth[band], scan.geometry.spacing)
        print(
            f"{name:60} Dice {rows[name]['all']['dice']:.4f}  patella {rows[name]['patella']['dice']:.4f}  HD95 {rows[name]['all']['hd95_mm']:.2f} mm",
            flush=True,
        )
    return {"fold": names[0], "band_i": [cards[0].heldout["from"], split], "validation": rows}


def fold_maps(folder: Path, names, models, scan: Volume):
    """``network_maps(projections, stride)``: each model's projection maps on its grid for one network
    setting, computed once and kept until another setting is asked for (each set is a few hundred MB)."""
    patch_size = models[0].card.patch_size
    slices = network_dimensions(models[0].card) == 2
    maps_by_setting = {}

    def network_maps(projections: int, stride):
        stride = {HALF_OVERLAP: patch_size // 2, NO_OVERLAP: patch_size}.get(stride, stride)
        key = (projections, stride)
        if projections == 1 and (3, stride) in maps_by_setting:  # the first projection is the one-projection run's
            return [side_maps[:1] for side_maps in maps_by_setting[(3, stride)]]
        if key not in maps_by_setting:
            maps_by_setting.clear()
            start = time.perf_counter()
            if stride == WHOLE_VOLUME:
                maps_by_setting[key] = [
                    [whole_volume_map(scan, (folder / name).with_suffix(".keras"))] for name in names
                ]
            else:
                maps_by_setting[key] = [
                    list(
                        model.projection_maps(
                            model.model_input(scan), SegmentOptions(projections=projections, stride=stride)
                        )
                    )
                    for model in models
                ]
            what = (
                "the whole volume in one pass"
                if stride == WHOLE_VOLUME
                else f"stride {stride or models[0].card.stride}"
            )
            what = "whole slices" if slices else what
            print(
                f"network, {len(models)} fold(s), {projections} projection(s), {what}: {time.perf_counter() - start:.0f} s",
                flush=True,
            )
        return maps_by_setting[key]

    return network_maps


def fused_on_scan(side_maps, fusion: str, model, scan: Volume) -> np.ndarray:
    """One model's projection maps fused by ``fusion`` (``"model"``: the card's rule) and brought to the scan's grid."""
    return model.grid_for(scan).to_scan(fuse_probabilities(side_maps, model.fusion_rule(fusion)))


def row_labels(
    probability: np.ndarray, scan: Volume, projections: int, fusion: str, radius_mm: float, fill: bool
) -> np.ndarray:
    """A row's label map: ``probability`` on the scan's grid post-processed with the row's settings."""
    options = SegmentOptions(
        projections=projections, fusion=fusion, closing_radius=radius_mm, fill_holes=fill, surfaces=False
    )
    return postprocess(Volume(probability, scan.geometry), options).labels


def side_by_side(ours: dict, theirs: dict) -> str:
    """Two families' held-out figures, both ways of stitching and the network with components only, one line a figure."""
    lines = [f"{'':58}{ours['family']:>24}{theirs['family']:>24}"]
    ways = [(f"probabilities stitched, {name}", lambda r, name=name: r["heldout"][name]) for name in COMPARED]
    ways.insert(1, ("segmentations stitched, default pipeline", lambda r: r["segmentations_stitched"]))
    for way, figures in ways:
        lines.append(way)
        for bone in ("femur", "tibia", "patella", "all"):
            for metric, form in (
                ("dice", "{:.4f}"),
                ("iou", "{:.4f}"),
                ("ahd_voxels", "{:.4f}"),
                ("ahd_mm", "{:.4f}"),
                ("hd95_mm", "{:.2f}"),
            ):
                if metric != "dice" and bone != "all":
                    continue
                values = [form.format(figures(results)[bone][metric]) for results in (ours, theirs)]
                lines.append(f"  {bone:8}{metric:48}{values[0]:>24}{values[1]:>24}")
    return "\n".join(lines)


def measure_family(
    folder: Path,
    family: str,
    scan: Volume,
    truth: np.ndarray,
    labels_out: Path | None = None,
    compared_only: bool = False,
) -> dict:
    """Both ways of stitching the folds of ``family`` in ``folder``, and its variants' rows (or only the
    :data:`COMPARED` ones); prints as it goes."""
    spacing = scan.geometry.spacing
    names = fold_names(family)
    models = [load_model(folder / name) for name in names]
    variants = chosen_variants(models[0].card, compared_only)
    split, sides = split_of([model.card for model in models])
    print(
        f"\n== {family}: held-out split along i at {split}: {names[sides['low']]} predicts i < {split}, {names[sides['high']]} i >= {split}"
    )
    print(f"held-out (never trained on) ranges of i: {dict(zip(names, sides['ranges']))}")
    network_maps = fold_maps(folder, names, models, scan)
    rows = {}
    for name, projections, fusion, radius_mm, fill, stride in variants:
        projections = projections or models[0].card.projections
        fused = [
            fused_on_scan(side_maps, fusion, model, scan)
            for model, side_maps in zip(models, network_maps(projections, stride))
        ]
        probability = stitched(fused[sides["low"]], fused[sides["high"]], split)
        del fused
        labels = row_labels(probability, scan, projections, fusion, radius_mm, fill)
        # The default row is measured as printed too: each bone's STL against the ground truth's (surface distances).
        rows[name] = evaluate_labels(labels, truth, spacing, surfaces=name == variants[0][0])
        if name == variants[0][0] and labels_out:
            write_volume(Volume(labels, scan.geometry), labels_out)
        print(
            f"{name:60} Dice {rows[name]['all']['dice']:.4f}  IoU {rows[name]['all']['iou']:.4f}  HD95 {rows[name]['all']['hd95_mm']:.2f} mm",
            flush=True,
        )
    del network_maps  # its maps, before the folds segment the whole scan

    start = time.perf_counter()
    segmented = [segment(scan, model, SegmentOptions(surfaces=False)) for model in models]
    print(f"each fold's own segment of the whole scan, default settings: {time.perf_counter() - start:.0f} s")
    each_fold = evaluate_labels(
        stitched(segmented[sides["low"]].labels, segmented[sides["high"]].labels, split), truth, spacing, surfaces=True
    )

    default = variants[0][0]
    print(f"\n{family}, held out, probabilities stitched, then the default pipeline:")
    print(format_metrics_table(rows[default]))
    print(f"\n{family}, held out, each fold's own segmentation (default settings) stitched:")
    print(format_metrics_table(each_fold))
    verdicts = {name: result.verdict for name, result in zip(names, segmented)}  # each fold's own run on the whole scan
    return {
        "folds": names,
        "split_i": split,
        "heldout_ranges_i": sides["ranges"],
        "heldout": rows,
        "segmentations_stitched": each_fold,
        "verdicts": verdicts,
        "variants": variants,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path(__file__).resolve().parent.parent / "Resources" / "Models")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--labels-out", type=Path, default=None, help="write the stitched held-out label map of the default row here"
    )
    parser.add_argument(
        "--family",
        default=FAMILY,
        help="the models FAMILY.onnx, FAMILY-fold-right.onnx and FAMILY-fold-left.onnx in --models (default: %(default)s)",
    )
    parser.add_argument(
        "--no-training-figure", action="store_true", help="skip the shipped model on its own training scan"
    )
    parser.add_argument(
        "--write-card", action="store_true", help="record the figures in the shipped model's card (its 'quality')"
    )
    parser.add_argument(
        "--held-out-from",
        type=Path,
        default=None,
        help="take the held-out figures from this --json output of an earlier run (the fold models unchanged) and add the training figure",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="score fold-right alone on its validation band (to choose a setting), nothing else",
    )
    parser.add_argument(
        "--beside", type=Path, default=None, help="print the figures beside another family's, from its --json output"
    )
    parser.add_argument(
        "--compared-only", action="store_true", help="only the rows the side-by-side table compares (no ablations)"
    )
    args = parser.parse_args()
    data = sample_dir()
    scan = read_volume(data / "knee_mri.nrrd")
    truth = read_volume(data / "knee_bones_labels.nrrd").array

    if args.validation:
        results = {"family": args.family, **measure_validation(args.models, args.family, scan, truth)}
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return
    if args.held_out_from:
        results = json.loads(args.held_out_from.read_text())
        print(f"held-out figures read from {args.held_out_from}")
    else:
        results = {
            "family": args.family,
            **measure_family(args.models, args.family, scan, truth, args.labels_out, args.compared_only),
        }
        print("\npaper (trained on another patient, this scan as test): DSC 0.9838, IoU 0.9682, AHD 0.0223")
    if args.beside:
        print("\nheld out, side by side:")
        print(side_by_side(results, json.loads(args.beside.read_text())))

    if not args.no_training_figure:
        shipped = args.models / f"{args.family}.onnx"
        result = segment(scan, load_model(shipped), SegmentOptions(surfaces=False))
        results["training_figure"] = evaluate_labels(result.labels, truth, scan.geometry.spacing)
        print(f"\nTRAINING figure ({shipped.name} on the scan it was trained on; not a measure of quality):")
        print(format_metrics_table(results["training_figure"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.write_card:
        write_quality(args.models / f"{args.family}.onnx", results)


def rounded(metrics: dict) -> dict:
    """Per-bone figures to 4 decimals, as a card holds them."""
    return {bone: {name: round(value, 4) for name, value in figures.items()} for bone, figures in metrics.items()}


def write_quality(model_path: Path, results: dict) -> None:
    """Record the held-out and training figures in the card beside ``model_path``."""
    ours = results
    quality = {
        "heldout": {
            "protocol": (
                f"2-fold spatial split of the annotated sample scan along image axis i at {ours['split_i']}: "
                f"{ours['folds'][0]} and {ours['folds'][1]} (same recipe) each predict the side they never trained on; "
                "the stitched full-volume probability is post-processed and compared with the ground truth"
            ),
            "pipeline": ours.get("variants", VARIANTS)[0][0],
            "metrics": rounded(ours["heldout"][ours.get("variants", VARIANTS)[0][0]]),
            "segmentations_stitched": rounded(ours["segmentations_stitched"]),
        },
    }
    if "training_figure" in results:
        quality["training_figure"] = {
            "note": "this model on the scan it was trained on: not a measure of quality",
            "metrics": rounded(results["training_figure"]),
        }
    card_file = write_card(replace(read_card(model_path), quality=quality), model_path)
    print(f"wrote the figures into {card_file.name}")


if __name__ == "__main__":
    main()
