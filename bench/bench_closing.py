"""Closing each ground-truth bone with a ball of radius 9: KneeBoneSeg against scikit-image, side by side.

    python bench/bench_closing.py [--radius 9] [--full]

scikit-image's ``closing(mask, ball(9))`` runs on each bone's bounding box
grown by radius + 1 voxels, which gives the same voxels as the whole volume
(checked here) in far less time; ``--full`` runs it on the whole
512 x 512 x 286 volume as the paper did (minutes per bone).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _sample import sample_dir
from skimage.morphology import ball, closing

from KneeBoneSegLib.anatomy import BONES
from KneeBoneSegLib.io import read_volume
from KneeBoneSegLib.morphology import closing_ball


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--radius", type=int, default=9)
    parser.add_argument("--full", action="store_true", help="run scikit-image on the whole volume, not the bone's box")
    args = parser.parse_args()
    labels = read_volume(sample_dir() / "knee_bones_labels.nrrd").array
    footprint = ball(args.radius)
    print(f"closing with a ball of radius {args.radius} voxels, ground-truth bones of the sample scan {labels.shape[::-1]}")
    print(f"{'bone':8}{'voxels':>11}{'KneeBoneSeg s':>15}{'skimage s':>11}{'speed-up':>10}  identical")
    totals = [0.0, 0.0]
    for bone in BONES:
        mask = labels == bone.label
        start = time.perf_counter()
        ours = closing_ball(mask, args.radius)
        ours_s = time.perf_counter() - start

        box = (slice(None),) * 3
        if not args.full:
            present = np.argwhere(mask)
            low = np.maximum(present.min(axis=0) - args.radius - 1, 0)
            high = present.max(axis=0) + args.radius + 2
            box = tuple(slice(a, b) for a, b in zip(low, high))
        start = time.perf_counter()
        reference = closing(mask[box], footprint).astype(bool)
        skimage_s = time.perf_counter() - start
        identical = np.array_equal(ours[box], reference) and not ours[~_inside(mask.shape, box)].any()
        totals[0] += ours_s
        totals[1] += skimage_s
        print(f"{bone.key:8}{np.count_nonzero(mask):11d}{ours_s:15.2f}{skimage_s:11.2f}{skimage_s / ours_s:9.1f}x  {identical}")
    print(f"{'total':8}{'':11}{totals[0]:15.2f}{totals[1]:11.2f}{totals[1] / totals[0]:9.1f}x")
    print("(skimage on " + ("the whole volume" if args.full else "each bone's box grown by radius + 1") + "; the paper reports 455 s for this step)")


def _inside(shape, box) -> np.ndarray:
    inside = np.zeros(shape, bool)
    inside[box] = True
    return inside


if __name__ == "__main__":
    main()
