"""Whole-knee networks on a coarse grid: one experiment per row, each rerunnable from its recipe.

    KNEEBONESEG_SAMPLE_DIR=... python bench/coarse_experiments.py RECIPE [--minutes 15] [--models DIR]
    python bench/coarse_experiments.py --list

Every experiment trains on the sample scan's columns i < 172 (fold-right's
training side, as the compact fold-right model), is chosen on the columns
172 <= i < 236 (the band between fold-right's training side and its held-out
side, which no model trains on and no table reports as held out), and is
reported held out on i >= 236. (The first rows, in
``coarse_experiments_i140.csv``, trained on i < 140 and chose on 140 <= i <
172; the scan holds bone only from i = 108, so that training side held 6 %
of the bone, and every row failed.) A recipe is a set of ``kneeboneseg
train`` settings (architecture ``coarse`` unless it says otherwise) plus how
the model is run; ``gated`` rows train nothing: they gate a fine model's
probabilities by a coarse model's dilated bone region; the ``slices`` rows
are the 2.5D arm, the library's 2D architecture (``kneeboneseg train
--architecture slices``, a 2D U-Net on slices of the three planes), run
through the library's model input and ``predict_slices``.
Each run appends one row to ``bench/results/coarse_experiments.csv``
(recipe, split, steps, minutes, machine, validation and held-out Dice per
bone and all bone, held-out HD95 of all bone, the network alone's all-bone
Dice before components and naming, and the network's time on the whole
scan). A row's training resumes from its checkpoint when a run is
started again with the same recipe.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from _sample import sample_dir
from scipy import ndimage

if (
    "KERAS_BACKEND" not in os.environ
):  # training steps are about three times cheaper on torch (bench/results/training_backends.txt)
    import importlib.util

    os.environ["KERAS_BACKEND"] = "torch" if importlib.util.find_spec("torch") else "tensorflow"

from KneeBoneSegLib.anatomy import BONES  # noqa: E402
from KneeBoneSegLib.errors import ModelError  # noqa: E402
from KneeBoneSegLib.io.images import read_volume  # noqa: E402
from KneeBoneSegLib.metrics import dice, hausdorff_95  # noqa: E402
from KneeBoneSegLib.network.engines import cpu_description  # noqa: E402
from KneeBoneSegLib.network.inference import predict_slices, predict_whole_volume  # noqa: E402
from KneeBoneSegLib.network.models import load_model  # noqa: E402
from KneeBoneSegLib.options import SLICES_PER_CALL  # noqa: E402
from KneeBoneSegLib.pipeline import SegmentOptions, postprocess  # noqa: E402
from KneeBoneSegLib.training.augmentation import Augmentation  # noqa: E402
from KneeBoneSegLib.training.config import TrainingConfig  # noqa: E402
from KneeBoneSegLib.training.loop import train  # noqa: E402
from KneeBoneSegLib.volume import Volume  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "coarse_experiments.csv"
TRAIN_I = (0, 172)  # fold-right's training side; the scan holds bone from i = 108 on
VALIDATION_I = (172, 236)  # between fold-right's training side and its held-out side: neither trained on nor reported
HELD_OUT_I = (236, 512)
LIGHT = replace(Augmentation.none(), flips=True, gamma=0.3)
STRONG = replace(Augmentation(), projections=False, rotation_deg=30.0, scale=0.15)
#: The 2.5D arm: the shipped 2D models' recipe (``kneeboneseg train --architecture slices``), on the experiments' columns.
SLICES = {
    "architecture": "slices",
    "spacing_mm": 0.7,
    "crops_past_range": True,
    "augmentation": replace(LIGHT, projections=True),
    "epochs": 40,
    "steps_per_epoch": 100,
}
#: name: (what it changes, training settings, run settings). Each row adds one change to the first.
RECIPES = {
    "light-1.4mm-w16": (
        "the light recipe: 1.4 mm, 16-32-64-128, instance norm, soft targets, mirror + gamma; run in 32^3 tiles",
        {},
        {"tiles": True},
    ),
    "light-1.4mm-w16-whole": (
        "the first row's model run on the whole coarse scan at once (as every later row) instead of in tiles",
        "light-1.4mm-w16",
        {},
    ),
    "light-1.05mm-w16": ("1.05 mm instead of 1.4 mm", {"spacing_mm": 1.05}, {}),
    "light-1.4mm-w8": ("8 filters wide instead of 16", {"base_filters": 8}, {}),
    "light-perm-1.4mm-w16": (
        "axis permutations added to the light recipe",
        {"augmentation": replace(LIGHT, projections=True)},
        {},
    ),
    "strong-1.4mm-w16": (
        "strong augmentation: rotations to 30 deg, scaling, contrast, bias field, noise",
        {"augmentation": STRONG},
        {},
    ),
    "batchnorm-1.4mm-w16": ("batch normalisation instead of instance normalisation", {"norm_layer": "batch"}, {}),
    "crops-past-range": (
        "crops may reach half their edge past the training side (labels there not trained on)",
        {"crops_past_range": True},
        {},
    ),
    "light-1.4mm-w16-mirrored": (
        "test-time mirroring of the first row's model: the mean over the scan and its mirror image along each axis",
        "light-1.4mm-w16",
        {"mirror": True},
    ),
    "slices-0.7mm-w16": (
        "the 2.5D arm: kneeboneseg train --architecture slices (a 2D U-Net, 16-32-64-128, bridge 256, batch norm, on 64^2 crops of slices of all three planes at 0.7 mm), the planes averaged",
        SLICES,
        {"fusion": "mean"},
    ),
    "slices-0.7mm-w16-seed1": (
        "the 2.5D arm trained again with another seed: how far chance moves a row",
        {**SLICES, "seed": 1},
        {"fusion": "mean"},
    ),
    "slices-0.7mm-w16-axial": ("the 2.5D arm's axial slices alone", "slices-0.7mm-w16", {"planes": (0,)}),
    "slices-0.7mm-w16-coronal": ("the 2.5D arm's coronal slices alone", "slices-0.7mm-w16", {"planes": (1,)}),
    "slices-0.7mm-w16-sagittal": ("the 2.5D arm's sagittal slices alone", "slices-0.7mm-w16", {"planes": (2,)}),
    "slices-0.7mm-w16-mirrored": (
        "test-time mirroring of the 2.5D arm: the mean over each slice and its mirror image along each of its axes",
        "slices-0.7mm-w16",
        {"planes": (0, 1, 2), "mirror": True},
    ),
    "gated-compact": (
        "the compact fold-right model's probabilities inside the whole-scan row's bone region grown 4 mm",
        "light-1.4mm-w16",
        {"gate": True},
    ),
}
BASE = {
    "architecture": "coarse",
    "spacing_mm": 1.4,
    "augmentation": LIGHT,
    "epochs": 100,
    "steps_per_epoch": 50,
    "dice_weight": 1.0,
    "seed": 0,
}
GATE_MARGIN_MM = 4.0
FIELDS = ["recipe", "change", "train_i", "validation_i", "steps", "train_minutes", "backend", "machine", "date"]
FIELDS += [f"{side}_{bone}" for side in ("validation", "heldout") for bone in ("femur", "tibia", "patella", "all")]
FIELDS += ["heldout_hd95_mm", "validation_network_all", "heldout_network_all", "network_s"]


def trained_model(name: str, minutes: float, models: Path) -> tuple[Path, dict]:
    """Train (or resume) the recipe ``name`` on the training columns; its model file and training record."""
    _, settings, _ = RECIPES[name]
    data = sample_dir()
    output = models / f"coarse-{name}.keras"
    config = TrainingConfig(
        images=[data / "knee_mri.nrrd"],
        labels=[data / "knee_bones_labels.nrrd"],
        output=output,
        train_range_i=TRAIN_I,
        max_minutes=minutes,
        progress_bar=False,
        resume=output.with_suffix(".checkpoint.npz").is_file(),
        overwrite=True,
        **{**BASE, **settings},
    )
    try:
        result = train(config)
    except ModelError as error:
        # The model is saved before its ONNX export is checked; instance norm on a sub-volume of
        # nearly constant intensity can move the exported probabilities a little past the 1e-4 bound.
        print(f"scored with Keras instead of ONNX: {error}")
        return output, {key: load_model(output).card.training[key] for key in ("steps", "seconds")}
    return output.with_suffix(".onnx"), {"steps": result.steps, "seconds": result.seconds}


def scores(labels: np.ndarray, truth: np.ndarray, columns: tuple[int, int]) -> dict:
    """Dice per bone and for all bone on the columns ``from <= i < to``."""
    part = np.s_[:, :, columns[0] : columns[1]]
    found = {bone.key: dice(labels[part] == bone.label, truth[part] == bone.label) for bone in BONES}
    found["all"] = dice(labels[part] > 0, truth[part] > 0)
    return found


def trained_file(models: Path, name: str):
    """The recipe's trained model: its ONNX export, or its Keras file where the export was refused."""
    onnx_path = models / f"coarse-{name}.onnx"
    return load_model(onnx_path if onnx_path.is_file() else onnx_path.with_suffix(".keras"))


def run(name: str, minutes: float, models: Path, score_only: bool = False) -> dict:
    change, settings, how = RECIPES[name]
    scan, truth = read_volume(sample_dir() / "knee_mri.nrrd"), read_volume(sample_dir() / "knee_bones_labels.nrrd")
    source = settings if isinstance(settings, str) else name  # the recipe whose model is run
    if isinstance(settings, str) or score_only:  # a trained model, (re)scored: nothing is trained
        model = trained_file(models, source)
        record = {key: model.card.training[key] for key in ("steps", "seconds")}
    else:
        onnx_path, record = trained_model(name, minutes, models)
        model = load_model(onnx_path)
    start = time.perf_counter()
    if how.get("tiles") or "fusion" in how:  # the pipeline's own network stage
        probability = model.predict(scan, SegmentOptions(fusion=how.get("fusion", "model")))
    elif "planes" in how:
        probability = slices_probability(scan, model, how["planes"], how.get("mirror", False))
    else:
        probability = whole_volume_probability(scan, models / f"coarse-{source}.keras", mirror=how.get("mirror", False))
    network_s = time.perf_counter() - start
    if how.get("gate"):
        probability = gated_fine(scan, probability, SegmentOptions(surfaces=False))
    return scored(name, change, record, scan, truth, probability, network_s)


def scored(
    name: str, change: str, record: dict, scan: Volume, truth: Volume, probability: np.ndarray, network_s: float
) -> dict:
    """The row of a network's bone probability on the scan's grid: components and naming as ``segment`` runs them, then Dice."""
    options = SegmentOptions(surfaces=False)
    # The network alone (bone where its probability reaches the threshold), before components and naming.
    network_only = {
        side: dice((probability >= options.threshold)[:, :, lo:hi], truth.array[:, :, lo:hi] > 0)
        for side, (lo, hi) in (("validation", VALIDATION_I), ("heldout", HELD_OUT_I))
    }
    labels = postprocess(Volume(probability, scan.geometry), options).labels
    validation = scores(labels, truth.array, VALIDATION_I)
    held_out = scores(labels, truth.array, HELD_OUT_I)
    part = np.s_[:, :, HELD_OUT_I[0] : HELD_OUT_I[1]]
    row = {
        "recipe": name,
        "change": change,
        "train_i": "%d-%d" % TRAIN_I,
        "validation_i": "%d-%d" % VALIDATION_I,
        "steps": record["steps"],
        "train_minutes": round(record["seconds"] / 60, 1),
        "backend": os.environ["KERAS_BACKEND"],
        "machine": f"{cpu_description()['name']}, {len(os.sched_getaffinity(0))} cores, {platform.machine()}",
        "date": datetime.date.today().isoformat(),
        "heldout_hd95_mm": round(hausdorff_95(labels[part] > 0, truth.array[part] > 0, scan.geometry.spacing), 2),
        "validation_network_all": round(network_only["validation"], 4),
        "heldout_network_all": round(network_only["heldout"], 4),
        "network_s": round(network_s, 1),
    }
    for side, found in (("validation", validation), ("heldout", held_out)):
        for bone in ("femur", "tibia", "patella", "all"):
            row[f"{side}_{bone}"] = round(found[bone], 4)
    return row


def whole_volume_probability(scan: Volume, keras_path: Path, mirror: bool = False) -> np.ndarray:
    """The trained network run once on the whole coarse scan (:func:`~KneeBoneSegLib.network.inference.predict_whole_volume`),
    on the scan's grid. With ``mirror``, the mean over the scan and its mirror image along each axis."""
    model = load_model(keras_path)
    model_input, network = model.model_input(scan), model.network.with_free_sides()
    flips = [(), (0,), (1,), (2,)] if mirror else [()]
    multiple = 2 ** model.card.architecture["depth"]
    probability = sum(
        np.flip(predict_whole_volume(np.flip(model_input.image, axes), network, multiple), axes) for axes in flips
    ) / len(flips)
    return model_input.grid.to_scan(probability)


def slices_probability(scan: Volume, model, planes, mirror: bool = False) -> np.ndarray:
    """A 2D model's bone probability on the scan's grid from the slices of ``planes`` alone (axes of the model grid:
    k axial, j coronal, i sagittal), each plane's slices predicted whole (:func:`~KneeBoneSegLib.network.inference.predict_slices`),
    the planes averaged. With ``mirror``, each slice's prediction is the mean over it and its mirror image along each of its axes."""
    model_input = model.model_input(scan)
    flips = [(), (1,), (2,)] if mirror else [()]
    multiple = 2 ** model.card.architecture["depth"]
    total = np.zeros(model_input.image.shape, np.float32)
    for axis in planes:
        stack = np.moveaxis(model_input.image, axis, 0)
        predicted = sum(
            np.flip(predict_slices(np.flip(stack, axes), model.network, multiple, SLICES_PER_CALL), axes)
            for axes in flips
        ) / len(flips)
        total += np.moveaxis(predicted, 0, axis)
    probability = total / len(planes)
    return model_input.grid.to_scan(probability)


def gated_fine(scan: Volume, coarse: np.ndarray, options: SegmentOptions) -> np.ndarray:
    """The compact fold-right model's fused probabilities, zero outside the coarse model's bone grown by GATE_MARGIN_MM."""
    fine = load_model(ROOT / "Resources" / "Models" / "kneeboneseg-compact-fold-right.onnx")
    fused = fine.predict(scan, options)
    sampling = np.asarray(scan.geometry.spacing)[::-1]
    region = ndimage.distance_transform_edt(coarse < options.threshold, sampling=sampling) <= GATE_MARGIN_MM
    return np.where(region, fused, 0.0).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", nargs="?", choices=RECIPES)
    parser.add_argument(
        "--minutes", type=float, default=15.0, help="training budget (at most 20: each experiment fits one sitting)"
    )
    parser.add_argument(
        "--models", type=Path, default=ROOT / "out" / "coarse", help="where the experiments' models and checkpoints go"
    )
    parser.add_argument(
        "--score-only", action="store_true", help="score the recipe's trained model again without training it further"
    )
    parser.add_argument("--list", action="store_true", help="print the recipes")
    args = parser.parse_args()
    if args.list or not args.recipe:
        for name, (change, _, _) in RECIPES.items():
            print(f"{name:28} {change}")
        return
    args.models.mkdir(parents=True, exist_ok=True)
    row = run(args.recipe, min(args.minutes, 20.0), args.models, args.score_only)
    new = not RESULTS.is_file()
    with open(RESULTS, "a", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(row)


if __name__ == "__main__":
    main()
