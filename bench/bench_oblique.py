"""What the shipped model does on turned anatomy: its training scan turned 10, 20 and 30 degrees about each patient axis.

    python bench/bench_oblique.py [--projections 3] > bench/results/oblique.txt

Each case resamples the sample scan and its ground truth onto the scan's grid
turned about its centre (same spacing and size, the knee where it was; zero
beyond what was scanned), as a scanner acquiring oblique planes through the
same point would, and runs the default segmentation on it. Dice is against
the ground truth moved the same way. This is the model's training scan: the
figures say what obliquity does to it, not how well it does on unseen knees.
Needs KNEEBONESEG_SAMPLE_DIR.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _sample import sample_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing" / "Python"))
from conftest import (  # noqa: E402  (the tests' definition of a turned scan, so both measure the same thing)
    rotation,
    turned,
)

from KneeBoneSegLib.anatomy import BONES  # noqa: E402
from KneeBoneSegLib.io.images import read_volume  # noqa: E402
from KneeBoneSegLib.metrics import dice  # noqa: E402
from KneeBoneSegLib.network.models import default_model_path, load_model  # noqa: E402
from KneeBoneSegLib.pipeline import SegmentOptions, segment  # noqa: E402
from KneeBoneSegLib.preprocess.resampling import obliquity_degrees  # noqa: E402

AXES = {"x": "left-right", "y": "anterior-posterior", "z": "superior-inferior"}
TURNS = [(None, 0)] + [(axis, degrees) for axis in "xyz" for degrees in (10, 20, 30)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--projections", type=int, default=None, help="1 or 3 (default: the model card's)")
    args = parser.parse_args()
    scan = read_volume(sample_dir() / "knee_mri.nrrd")
    truth = read_volume(sample_dir() / "knee_bones_labels.nrrd")
    model = load_model(default_model_path())
    options = SegmentOptions(projections=args.projections, surfaces=False)
    engine = model.network.describe()
    print(f"# python bench/bench_oblique.py{' --projections %d' % args.projections if args.projections else ''}")
    print(
        f"model: {model.card.name} (its training scan); engine {engine['engine']} {engine['precision']}; projections {args.projections or model.card.projections}; surfaces off"
    )
    print(
        f"{'turned about':28} {'off axes':>8} {'all bone':>9} {'femur':>7} {'tibia':>7} {'patella':>8}  verdicts (femur, tibia, patella)   seconds"
    )
    for axis, degrees in TURNS:
        if axis is None:
            moved_scan, moved_truth, name = scan, truth, "none (the scan as acquired)"
        else:
            turn = rotation(axis, degrees)
            moved_scan, moved_truth, name = (
                turned(scan, turn),
                turned(truth, turn, order=0),
                f"{AXES[axis]}, {degrees} deg",
            )
        start = time.perf_counter()
        result = segment(moved_scan, model, options)
        seconds = time.perf_counter() - start
        scores = [dice(result.labels == bone.label, moved_truth.array == bone.label) for bone in BONES]
        verdicts = ", ".join(result.verdict["bones"][bone.key]["verdict"] for bone in BONES)
        print(
            f"{name:28} {obliquity_degrees(moved_scan.geometry.direction):8.1f} {dice(result.labels > 0, moved_truth.array > 0):9.4f}"
            + "".join(f"{score:8.4f}" for score in scores)
            + f"  {verdicts:34} {seconds:6.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
