"""The paper's three projections and their fusion.

A 3D network sees a sub-volume in one axis order; feeding it the same volume
with its axes permuted (the axial, coronal and sagittal "projections") gives
three different predictions of the same voxels, which are brought back to one
grid and fused voxel-wise.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

#: Axis orders of ``array[k, j, i]`` that present each projection's slices first.
VIEWS = {
    "axial": (0, 1, 2),
    "coronal": (1, 0, 2),
    "sagittal": (2, 0, 1),
}

FUSIONS = ("or", "vote", "mean")


def predict_projections(
    image: np.ndarray,
    predict: Callable[[np.ndarray, str], np.ndarray],
    projections: int = 3,
) -> list[np.ndarray]:
    """Predict ``image`` in 1 (axial) or 3 projections, each returned on ``image``'s grid.

    Parameters
    ----------
    image : ndarray, shape (k, j, i)
    predict : callable
        ``predict(view, name)`` returns a probability map of the same shape as
        ``view``; ``name`` is ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    projections : {1, 3}
    """
    if projections not in (1, 3):
        raise ValueError(f"projections must be 1 or 3, not {projections}")
    maps = []
    for name, order in list(VIEWS.items())[:projections]:
        view = np.ascontiguousarray(image.transpose(order))
        maps.append(np.ascontiguousarray(predict(view, name).transpose(np.argsort(order))))
    return maps


def fuse_probabilities(maps: list[np.ndarray], method: str = "mean") -> np.ndarray:
    """Fuse per-projection probability maps voxel by voxel.

    ``"or"`` (the paper's) keeps a voxel that any projection calls bone: the
    maximum, so that thresholding it at 0.5 is the OR of the thresholded maps.
    ``"vote"`` keeps what most projections call bone: the median, which is
    at least 0.5 exactly where a majority is. ``"mean"`` averages the
    probabilities. All three return a float32 map whose 0.5 level is the fused
    decision.
    """
    if method not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {method!r}")
    if len(maps) == 1:
        return maps[0].astype(np.float32, copy=False)
    stack = np.stack(maps)
    if method == "or":
        fused = stack.max(axis=0)
    elif method == "vote":
        fused = np.median(stack, axis=0)
    else:
        fused = stack.mean(axis=0)
    return fused.astype(np.float32, copy=False)
