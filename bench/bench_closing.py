"""Closing each ground-truth bone with a ball of radius 9: KneeBoneSeg before and after, and scikit-image, side by side.

    python bench/bench_closing.py [--radius 9] [--threads N] [--full]

"before" is the library at the baseline commit (scipy's distance
transforms, ``bench/_baseline.py``), "after" this checkout (the ``edt``
package's, on the run's threads). scikit-image's ``closing(mask, ball(9))``
runs on each bone's bounding box grown by radius + 1 voxels, which gives the
same voxels as the whole volume (checked here) in far less time; ``--full``
runs it on the whole 512 x 512 x 286 volume as the paper did (minutes per
bone).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _baseline import baseline_module
from _sample import sample_dir
from skimage.morphology import ball, closing

from KneeBoneSegLib.anatomy import BONES
from KneeBoneSegLib.io.images import read_volume
from KneeBoneSegLib.postprocess.morphology import close_bones
from KneeBoneSegLib.threads import using_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--radius", type=int, default=9)
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for KneeBoneSeg's closing (default: all cores)"
    )
    parser.add_argument("--full", action="store_true", help="run scikit-image on the whole volume, not the bone's box")
    args = parser.parse_args()
    labels = read_volume(sample_dir() / "knee_bones_labels.nrrd").array
    closing_before = baseline_module("morphology").closing_ball
    footprint = ball(args.radius)
    with using_threads(args.threads) as threads:
        print(
            f"closing with a ball of radius {args.radius} voxels, ground-truth bones of the sample scan {labels.shape[::-1]}, {threads} threads, load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{'bone':8}{'voxels':>11}{'before s':>10}{'after s':>10}{'skimage s':>11}{'after vs skimage':>18}  identical"
        )
        totals = np.zeros(3)
        for bone in BONES:
            mask = labels == bone.label
            seconds = []
            start = time.perf_counter()
            before = closing_before(mask, args.radius)
            seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            after = close_bones(mask.astype(np.uint8), args.radius) == 1  # the pipeline's closing of one bone
            seconds.append(time.perf_counter() - start)

            box = (slice(None),) * 3
            if not args.full:
                present = np.argwhere(mask)
                low = np.maximum(present.min(axis=0) - args.radius - 1, 0)
                high = present.max(axis=0) + args.radius + 2
                box = tuple(slice(a, b) for a, b in zip(low, high))
            start = time.perf_counter()
            reference = closing(mask[box], footprint).astype(bool)
            seconds.append(time.perf_counter() - start)
            identical = (
                np.array_equal(after, before)
                and np.array_equal(after[box], reference)
                and not after[~_inside(mask.shape, box)].any()
            )
            totals += seconds
            print(
                f"{bone.key:8}{np.count_nonzero(mask):11d}{seconds[0]:10.2f}{seconds[1]:10.2f}{seconds[2]:11.2f}{seconds[2] / seconds[1]:17.1f}x  {identical}"
            )
        print(f"{'total':8}{'':11}{totals[0]:10.2f}{totals[1]:10.2f}{totals[2]:11.2f}{totals[2] / totals[1]:17.1f}x")
    print(
        "(skimage on "
        + ("the whole volume" if args.full else "each bone's box grown by radius + 1")
        + "; the paper reports 455 s for this step)"
    )


def _inside(shape, box) -> np.ndarray:
    inside = np.zeros(shape, bool)
    inside[box] = True
    return inside


if __name__ == "__main__":
    main()
