"""Training on images synthesised from other knees' label maps: one row per recipe, trained, then scored.

    KNEEBONESEG_SAMPLE_DIR=... KNEEBONESEG_OTHER_KNEES=... python bench/synthetic_experiments.py train ROW [--minutes 19]
    KNEEBONESEG_SAMPLE_DIR=... python bench/synthetic_experiments.py score ROW

Each row changes one thing of the 2D recipe (``train_models.sh``'s ``slices``:
mirroring and gamma for real crops, fold crops reaching half their edge past the
training range) and trains at most ``--minutes`` on this machine; ``train`` runs
in the foreground (start it with ``nohup``) and resumes a stopped run. The
models go to ``out/synthetic/ROW/``; ``score`` writes ``bench/results/synthetic/ROW.json``
and rewrites the row in ``bench/results/synthetic_experiments.csv``.

With one annotated scan, the folds split it along i (``train_models.sh``):
fold-right trains on i < 172, fold-left on i >= 300. Settings are chosen on
fold-right's validation band 172 <= i < 236, which lies inside fold-left's
held-out side, so no setting is chosen on a held-out figure. A row of
synthetic images alone sees no real image and is scored on the whole scan.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "synthetic"
RESULTS = ROOT / "bench" / "results"
TABLE = RESULTS / "synthetic_experiments.csv"
OTHER_KNEES_ENV = "KNEEBONESEG_OTHER_KNEES"
#: The other knees' label maps and their bone values (their README, ../shared/data/other_knees).
OTHER_KNEES = (
    ("mskt_dess_a_labels.nrrd", "5,6,7"),
    ("mskt_dess_b_labels.nrrd", "5,6,7"),
    ("skm_pd_labels.nrrd", "1,2,3"),
)
#: The 2D recipe's augmentation of real crops (mirroring and gamma only) and the folds' ranges along i.
REAL_AUGMENTATION = '{"rotation_deg": 0, "scale": 0, "bias_field": 0, "contrast": 0, "noise": 0}'
DECOYS = '{"marrow_like_tissue": 0.5, "tissue_lines": 0.5, "joint_darker": 0.5}'
FOLDS = {"fold-right": (0, 172), "fold-left": (300, 512)}
VALIDATION_BAND = (172, 236)


@dataclass(frozen=True)
class Row:
    description: str
    synthetic_fraction: float = 0.0
    other_knees: bool = False  # synthesise from the three other knees' maps
    real_labels: bool = False  # synthesise from the sample's own label map, on the fold's training side
    folds: bool = True  # False: one model, no real image, scored on the whole scan
    models: Path | None = None  # a folder of already trained folds (the shipped family), not trained here
    family: str = "kneeboneseg-slices"
    synthesis: str = ""  # JSON overriding some of the generator's settings (``--synthesis``)
    slice_mm: float = (
        0.0  # scored on the sample resampled to slices this thick along i (sagittal), as a clinical 2D sequence
    )


ROWS = {
    "baseline": Row(
        "today's 2D recipe: real crops only (the shipped 2D folds: 4000 steps, 19 to 20 min each)",
        models=ROOT / "Resources" / "Models",
    ),
    "mixed-50": Row("real crops and synthetic crops from the other knees' maps, 50/50", 0.5, other_knees=True),
    "mixed-25": Row("real crops and synthetic crops from the other knees' maps, 75/25", 0.25, other_knees=True),
    "synthetic-only": Row(
        "synthetic crops alone from the three other knees' maps: no real image, no real label",
        1.0,
        other_knees=True,
        folds=False,
    ),
    "synthetic-and-real-labels": Row(
        "synthetic crops alone from the other knees' maps and the sample's label map on the fold's side (never its image)",
        1.0,
        other_knees=True,
        real_labels=True,
    ),
    "mixed-50-decoys": Row(
        "mixed-50 with the generator's decoys in half the crops each: marrow-bright tissue, dark lines between tissues, "
        "cartilage and menisci darker than marrow",
        0.5,
        other_knees=True,
        synthesis=DECOYS,
    ),
    "baseline-compact": Row(
        "the best recipe so far (real crops only) with the compact 3D network: the shipped compact folds",
        models=ROOT / "Resources" / "Models",
        family="kneeboneseg-compact",
    ),
    "baseline-3mm-sagittal": Row(
        "the baseline's folds (best on validation) on the sample resampled to 3 mm sagittal slices (along i), "
        "labels brought back to the annotated grid",
        models=ROOT / "Resources" / "Models",
        slice_mm=3.0,
    ),
}


def train_command(row: Row, output: Path, fold: str | None, minutes: float, sample: Path) -> list[str]:
    """``kneeboneseg train`` for one model of ``row``; resumes where a checkpoint is beside ``output``."""
    command = [
        sys.executable,
        "-m",
        "KneeBoneSegLib",
        "-v",
        "train",
        "-o",
        str(output),
        "--architecture",
        "slices",
        "--no-progress-bar",
        "--augmentation",
        REAL_AUGMENTATION,
        "--max-minutes",
        str(minutes),
    ]
    command += ["--resume"] if output.with_suffix(".checkpoint.npz").is_file() else ["--overwrite"]
    if row.folds:
        command += [
            str(sample / "knee_mri.nrrd"),
            str(sample / "knee_bones_labels.nrrd"),
            "--crops-past-range",
            "true",
            "--train-range-i",
            *map(str, FOLDS[fold]),
        ]
    if row.other_knees:
        folder = Path(os.environ.get(OTHER_KNEES_ENV) or ROOT.parent / "shared" / "data" / "other_knees")
        for name, bones in OTHER_KNEES:
            command += ["--synthetic-map", str(folder / name), bones]
    if row.real_labels:
        command += ["--synthesize-training-labels", "true"]
    if row.synthetic_fraction:
        command += ["--synthetic-fraction", str(row.synthetic_fraction)]
    if row.synthesis:
        command += ["--synthesis", row.synthesis]
    return command


def train(name: str, minutes: float) -> None:
    from _sample import sample_dir

    row = ROWS[name]
    if row.models is not None:
        raise SystemExit(f"row {name} scores models trained elsewhere ({row.models}); nothing to train")
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    for fold in FOLDS if row.folds else (None,):
        output = folder / (f"{row.family}-{fold}.keras" if fold else f"{row.family}.keras")
        command = train_command(row, output, fold, minutes, sample_dir())
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "KERAS_BACKEND": "torch"})


def score(name: str) -> dict:
    """The row's figures: validation band, held out both ways of stitching (or the whole scan), verdicts, training."""
    import numpy as np
    from _sample import sample_dir
    from heldout_table import measure_family, measure_validation

    from KneeBoneSegLib.io.images import read_volume
    from KneeBoneSegLib.metrics import compare_masks, evaluate_labels
    from KneeBoneSegLib.network.models import load_model, read_card
    from KneeBoneSegLib.pipeline import SegmentOptions, segment

    row = ROWS[name]
    folder = row.models or OUT / name
    scan = read_volume(sample_dir() / "knee_mri.nrrd")
    truth = read_volume(sample_dir() / "knee_bones_labels.nrrd").array
    names = [f"{row.family}-{fold}.onnx" for fold in FOLDS] if row.folds else [f"{row.family}.onnx"]
    if row.slice_mm:
        figures = thick_slices_scores(folder, names, scan, truth, row.slice_mm)
    elif row.folds:
        validation = measure_validation(folder, row.family, scan, truth, compared_only=True)["validation"][
            "default pipeline"
        ]
        family = measure_family(folder, row.family, scan, truth, compared_only=True)
        figures = {
            "validation": validation,
            "probabilities_stitched": family["heldout"]["default pipeline"],
            "probabilities_stitched_no_closing": family["heldout"][
                "no closing, no hole filling (network and components only)"
            ],
            "segmentations_stitched": family["segmentations_stitched"],
            "verdicts": family["verdicts"],
        }
    else:
        result = segment(scan, load_model(folder / names[0]), SegmentOptions(surfaces=False))
        band = np.s_[..., VALIDATION_BAND[0] : VALIDATION_BAND[1]]
        # The network's own bone (probability above a half, before anatomy names components): what the post-processing had to work with.
        network_only = compare_masks(result.probability > 0.5, truth > 0, scan.geometry.spacing)
        figures = {
            "validation": evaluate_labels(result.labels[band], truth[band], scan.geometry.spacing),
            "whole_scan": evaluate_labels(result.labels, truth, scan.geometry.spacing),
            "whole_scan_network_only": network_only,
            "verdicts": {names[0]: result.verdict},
        }
    cards = [read_card(folder / model) for model in names]
    figures["training"] = {
        model: {
            "seconds": card.training["seconds"],
            "steps": card.training["steps"],
            "command": card.training["command"],
            "machine": card.training["machine"],
        }
        for model, card in zip(names, cards)
    }
    return {
        "row": name,
        "description": row.description,
        "scored": datetime.date.today().isoformat(),
        "scoring_machine": machine(),
        **figures,
    }


def thick_slices(scan, slice_mm: float):
    """``scan`` as a sequence of ``slice_mm`` slices along i would give it: the same box, each slice the
    anti-aliased average of the voxels it covers (:func:`resample_to_shape`)."""
    from KneeBoneSegLib.preprocess.resampling import resample_to_shape
    from KneeBoneSegLib.volume import Geometry, Volume

    columns = scan.array.shape[2]
    slices = max(1, round(columns * scan.geometry.spacing[0] / slice_mm))
    step = columns / slices  # old voxels per new slice
    array = resample_to_shape(scan.array, (*scan.array.shape[:2], slices), order=1)
    spacing = (scan.geometry.spacing[0] * step, *scan.geometry.spacing[1:])
    origin = scan.geometry.index_to_lps([[(step - 1) / 2, 0.0, 0.0]])[0]
    return Volume(array, Geometry(spacing, tuple(origin), scan.geometry.direction))


def thick_slices_scores(folder: Path, names, scan, truth, slice_mm: float) -> dict:
    """Each fold segments the thick-slice scan; its labels, brought back to the annotated grid, are scored
    on the validation band (fold-right) and held out, stitched at the split (segmentations stitched)."""
    import numpy as np
    from heldout_table import split_of, stitched

    from KneeBoneSegLib.metrics import evaluate_labels
    from KneeBoneSegLib.network.models import load_model
    from KneeBoneSegLib.pipeline import SegmentOptions, segment
    from KneeBoneSegLib.preprocess.resampling import labels_onto_grid
    from KneeBoneSegLib.volume import Volume

    thick = thick_slices(scan, slice_mm)
    models = [load_model(folder / name) for name in names]
    split, sides = split_of([model.card for model in models])
    results = [segment(thick, model, SegmentOptions(surfaces=False)) for model in models]
    labels = [labels_onto_grid(Volume(result.labels, thick.geometry), scan) for result in results]
    spacing = scan.geometry.spacing
    band = np.s_[..., VALIDATION_BAND[0] : VALIDATION_BAND[1]]
    return {
        "slices": {"count": thick.array.shape[2], "spacing_mm": [round(s, 4) for s in thick.geometry.spacing]},
        "validation": evaluate_labels(labels[0][band], truth[band], spacing),
        "segmentations_stitched": evaluate_labels(
            stitched(labels[sides["low"]], labels[sides["high"]], split), truth, spacing
        ),
        "verdicts": {name: result.verdict for name, result in zip(names, results)},
    }


def machine() -> str:
    """This machine in a few words (the CPU model where Linux names it)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            model,
        )
    return f"{model}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"


BONES = ("all", "femur", "tibia", "patella")


def table_row(result: dict) -> dict:
    """One CSV row: the figures a reader compares, the rest in the row's JSON."""
    row = {
        "row": result["row"],
        "description": result["description"],
        "train_minutes_per_model": round(max(t["seconds"] for t in result["training"].values()) / 60, 1),
    }
    row.update({f"validation_{bone}": round(result["validation"][bone]["dice"], 4) for bone in BONES})
    ways = [
        (short, key)
        for short, key in (
            ("whole_scan", "whole_scan"),
            ("prob_stitched", "probabilities_stitched"),
            ("seg_stitched", "segmentations_stitched"),
        )
        if key in result
    ]
    for short, key in ways:
        row.update({f"{short}_{bone}": round(result[key][bone]["dice"], 4) for bone in BONES})
        row[f"{short}_hd95_mm"] = round(result[key]["all"]["hd95_mm"], 2)
    if "whole_scan_network_only" in result:
        row["whole_scan_network_only_all"] = round(result["whole_scan_network_only"]["dice"], 4)
    if "probabilities_stitched_no_closing" in result:
        row["prob_stitched_no_closing_all"] = round(result["probabilities_stitched_no_closing"]["all"]["dice"], 4)
    row["verdicts"] = "; ".join(
        f"{Path(model).stem}: {verdict['run']} ({', '.join(f'{k} {v}' for k, v in _bone_verdicts(verdict).items())})"
        for model, verdict in result["verdicts"].items()
    )
    row["machine"] = result["scoring_machine"]
    return row


def _bone_verdicts(verdict: dict) -> dict:
    return {key: entry["verdict"] for key, entry in verdict.get("bones", {}).items()}


def write_table(rows: list[dict]) -> None:
    from KneeBoneSegLib.atomic import atomic_file

    columns = []
    for row in rows:
        columns += [column for column in row if column not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_file(TABLE) as partial:
        Path(partial).write_text(text.getvalue(), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("train", "score"))
    parser.add_argument("row", choices=ROWS)
    parser.add_argument(
        "--minutes", type=float, default=19.0, help="training budget of each model (default: %(default)s)"
    )
    args = parser.parse_args()
    if args.action == "train":
        train(args.row, args.minutes)
        return
    result = score(args.row)
    (RESULTS / "synthetic").mkdir(parents=True, exist_ok=True)
    (RESULTS / "synthetic" / f"{args.row}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    rows = list(csv.DictReader(TABLE.open(encoding="utf-8"))) if TABLE.is_file() else []
    rows = [row for row in rows if row["row"] != args.row] + [table_row(result)]
    rows.sort(key=lambda row: list(ROWS).index(row["row"]))
    write_table(rows)
    print(json.dumps(table_row(result), indent=2))


if __name__ == "__main__":
    main()
