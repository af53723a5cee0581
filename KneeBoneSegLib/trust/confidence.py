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

from ..anatomy import BONES

#: How far from the threshold a probability must be to count as sure.
SURE_MARGIN = 0.4


class ProjectionRange:
    """The projections' disagreement, gathered as their maps pass: largest minus smallest probability per voxel.

    ``watch(maps)`` yields the maps unchanged (so they can be fused as they
    come) while keeping a running maximum and minimum; ``disagreement()``
    then returns their difference, or None for a single projection.
    """

    def __init__(self):
        self._high = self._low = None
        self._count = 0

    def watch(self, maps):
        for probability in maps:
            if self._high is None:
                self._high, self._low = probability.astype(np.float32), probability.astype(np.float32)
            else:
                np.maximum(self._high, probability, out=self._high)
                np.minimum(self._low, probability, out=self._low)
            self._count += 1
            yield probability

    def disagreement(self) -> np.ndarray | None:
        if self._count < 2:
            return None
        spread = self._high - self._low
        self._high = self._low = None
        return spread


def bone_confidence(
    labels: np.ndarray,
    probability: np.ndarray,
    disagreement: np.ndarray | None,
    threshold: float = 0.5,
    counted_i: slice | None = None,
) -> dict:
    """Per bone present in ``labels``: ``sure_share`` and ``surface_disagreement`` (see module doc).

    Parameters
    ----------
    labels : ndarray of uint8
        The final bones (after closing and filling).
    probability : ndarray of float
        The fused bone probability on the same grid.
    disagreement : ndarray of float or None
        :class:`ProjectionRange`'s map on the same grid; None gives no
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
        sure = np.count_nonzero(
            probability[box][..., counted][inside[..., counted]] >= threshold + SURE_MARGIN
        ) / np.count_nonzero(inside[..., counted])
        entry = {"sure_share": round(float(sure), 4), "surface_disagreement": None}
        if disagreement is not None:
            surface = inside & ~ndimage.binary_erosion(inside)
            entry["surface_disagreement"] = round(
                float(disagreement[box][..., counted][surface[..., counted]].mean()), 4
            )
        found[bone.key] = entry
    return found
