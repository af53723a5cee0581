"""Draw the outlines of a segmentation on one sagittal slice of the scan, as a PNG.

    python docs/render_slice.py $KNEEBONESEG_SAMPLE_DIR/knee_mri.nrrd knee_bones/labels.nii.gz docs/images/slice.png

The slice is the sagittal one (constant i) through the patella's centre, or
``--i`` if given; superior is up and anterior to the left. Outline colours
are the bones' display colours from :mod:`KneeBoneSegLib.anatomy`. With
``--uncertainty uncertainty.nrrd`` (from ``kneeboneseg segment
--save-uncertainty``) the projections' disagreement is laid over the scan in
red, opaque where they disagree completely.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from KneeBoneSegLib.anatomy import BONES
from KneeBoneSegLib.io.images import read_mask, read_volume
from KneeBoneSegLib.preprocess.normalization import normalize_intensities


def outlined_slice(
    image: np.ndarray, labels: np.ndarray, i: int, zoom: int = 2, uncertainty: np.ndarray | None = None
) -> np.ndarray:
    """RGB uint8 picture of sagittal slice ``i`` of ``image`` (k, j, i) with the outline of each bone.

    ``uncertainty`` (same grid, 0 to 1) is blended in red under the outlines.
    """
    gray = normalize_intensities(image[:, :, i][..., None], {"method": "percentile"})[..., 0]
    rgb = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=-1) * 255
    if uncertainty is not None:
        weight = np.clip(uncertainty[:, :, i], 0, 1)[..., None]
        rgb = rgb * (1 - weight) + np.array([255.0, 0.0, 0.0]) * weight
    rgb = np.repeat(np.repeat(rgb.astype(np.uint8), zoom, axis=0), zoom, axis=1)
    for bone in BONES:
        mask = np.repeat(np.repeat(labels[:, :, i] == bone.label, zoom, axis=0), zoom, axis=1)
        outline = mask & ~ndimage.binary_erosion(mask, iterations=2)
        rgb[outline] = (np.asarray(bone.color) * 255).astype(np.uint8)
    return rgb[::-1]  # superior (high k) up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("labels", type=Path, help="label map or .seg.nrrd: 1 femur, 2 tibia, 3 patella")
    parser.add_argument("output", type=Path, help="PNG file to write")
    parser.add_argument("--i", type=int, default=None, help="sagittal slice index (default: through the patella)")
    parser.add_argument(
        "--uncertainty", type=Path, default=None, help="disagreement map (uncertainty.nrrd) to lay over the scan in red"
    )
    args = parser.parse_args()
    image, labels = read_volume(args.image).array, read_mask(args.labels).array
    uncertainty = read_volume(args.uncertainty).array if args.uncertainty else None
    i = args.i if args.i is not None else int(round(np.argwhere(labels == 3)[:, 2].mean()))
    picture = outlined_slice(image, labels, i, uncertainty=uncertainty)
    sitk.WriteImage(sitk.GetImageFromArray(picture, isVector=True), str(args.output))


if __name__ == "__main__":
    main()
