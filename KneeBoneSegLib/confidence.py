"""How sure the network is of each bone, from its own outputs.

Two measures per bone, both on the input's grid:

``sure_share``
    The share of the bone's voxels (those the network called bone, inside the
    final bone) whose fused probability is far from the threshold: at least
    ``threshold + SURE_MARGIN``. A network on familiar ground is sure of the
    inside of a bone; on an unfamiliar scan much of it hovers near 0.5.
``surface_disagreement``
    The mean, over the voxels on the bone's surface, of the disagreement
    between the three projections: the largest minus the smallest of their
    probabilities (0: all three agree; 1: one is sure of bone, another sure
    of background). The same map, written on request, shows a user where to look.

The thresholds that turn these into ``review`` are a model's own, in its card
(``confidence``), calibrated on held-out predictions of the fold models
(``bench/calibrate_confidence.py``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .anatomy import BONES

#: How far from the threshold a probability must be to count as sure.
SURE_MARGIN = 0.4


def projection_disagreement(maps: list[np.ndarray]) -> np.ndarray | None:
    """Voxel-wise range (max - min) of the projections' probabilities; None for a single projection."""
    if len(maps) < 2:
        return None
    high, low = maps[0].copy(), maps[0].copy()
    for probability in maps[1:]:
        np.maximum(high, probability, out=high)
        np.minimum(low, probability, out=low)
    high -= low
    return high.astype(np.float32, copy=False)


def bone_confidence(
    labels: np.ndarray, probability: np.ndarray, disagreement: np.ndarray | None, threshold: float = 0.5, counted_i: slice | None = None
) -> dict:
    """Per bone present in ``labels``: ``sure_share`` and ``surface_disagreement`` (see module doc).

    Parameters
    ----------
    labels : ndarray of uint8
        The final bones (after closing and filling).
    probability : ndarray of float
        The fused bone probability on the same grid.
    disagreement : ndarray of float or None
        :func:`projection_disagreement` on the same grid; None gives no
        ``surface_disagreement`` (one projection).
    threshold : float
        The probability at which a voxel is bone.
    counted_i : slice, optional
        Count only voxels whose i index (last array axis) lies here; the
        bone's surface is still that of the whole bone. For calibrating on
        the part of a scan a fold model never trained on.

    Returns
    -------
    dict
        ``{bone key: {"sure_share": float, "surface_disagreement": float or None}}``.
    """
    found = {}
    boxes = ndimage.find_objects(labels, max_label=max(bone.label for bone in BONES))
    for bone in BONES:
        box = boxes[bone.label - 1]
        if box is None:
            continue
        inside = probability[box] >= threshold
        inside &= labels[box] == bone.label
        counted = np.ones(inside.shape[2], bool)
        if counted_i is not None:
            i = np.arange(box[2].start, box[2].stop)
            counted = (i >= counted_i.start) & (i < counted_i.stop)
        if not inside[..., counted].any():
            continue
        sure = np.count_nonzero(probability[box][..., counted][inside[..., counted]] >= threshold + SURE_MARGIN) / np.count_nonzero(inside[..., counted])
        entry = {"sure_share": round(float(sure), 4), "surface_disagreement": None}
        if disagreement is not None:
            surface = inside & ~ndimage.binary_erosion(inside)
            entry["surface_disagreement"] = round(float(disagreement[box][..., counted][surface[..., counted]].mean()), 4)
        found[bone.key] = entry
    return found
