"""Training images synthesised from label maps: other knees' anatomy, without their MR images.

After SynthSeg (Billot et al., Medical Image Analysis 2023), which trains on
images made from label maps alone and segments real scans of any contrast and
resolution. Each crop gets new random intensities, so the network cannot learn
one scanner's contrast, only shapes and boundaries:

- a random mean and spread per labelled structure (bones, cartilage, menisci,
  whatever the map holds); each bone a dark cortical shell of random
  thickness around marrow of its own intensity;
- a background of a few pseudo-tissues, cut from a smooth random field, and
  air outside a body outline a random margin from the labelled structures, so
  that "bone" is never simply "not uniform";
- decoys, each in a random share of the crops, so that neither a dark outline
  nor a marrow-bright inside is by itself bone: one background tissue as
  bright as a bone's marrow (fat is, in the low-field scan), the boundaries
  between background tissues drawn as dark lines (fascia, tendons, vessel
  walls), and cartilage and menisci darker than every marrow (as the real
  joint space is);
- elastic deformation on top of the sampler's flips, rotation and zoom; blur
  to a random resolution along each in-plane axis (thick slices either way);
  then the sampler's gamma, bias field, contrast and noise.

:func:`prepare_label_map` brings a map to the model's grid once;
:func:`synthesize_crop` makes one crop's image from its sampled labels
(about a millisecond for a 64^2 crop). The samplers that draw the crops are
in :mod:`.data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..preprocess.resampling import grid_shape_for_spacing, resample_to_shape
from .augmentation import Augmentation


@dataclass(frozen=True)
class Synthesis:
    """How crops are synthesised from label maps; each (low, high) range is drawn from uniformly per crop."""

    cortex_mm: tuple = (1.0, 2.0)  # thickness of the dark cortical shell around each bone's marrow
    cortex_intensity: tuple = (0.0, 0.2)
    spread: float = 0.1  # largest standard deviation of the intensity within a structure
    background_classes: tuple = (3, 6)  # pseudo-tissues cut from a smooth random field
    body_margin_mm: tuple = (5.0, 40.0)  # soft tissue around the labelled structures before the air
    air_intensity: tuple = (0.0, 0.1)
    elastic_mm: float = 3.0  # largest elastic displacement
    resolution_mm: tuple = (0.7, 4.0)  # blurred to this resolution (FWHM) along each in-plane axis, drawn apart
    # Decoys: the share of crops that get each (0: never, the generator of the first rows).
    marrow_like_tissue: float = 0.0  # one background tissue takes a bone's marrow intensity
    tissue_lines: float = 0.0  # dark lines along the background tissues' boundaries
    line_mm: tuple = (0.3, 1.0)  # half the width of those lines
    joint_darker: float = 0.0  # the labelled structures that are not bone darker than every marrow
    # The sampler's own changes for synthetic crops, whatever the real crops get.
    augmentation: Augmentation = Augmentation(
        rotation_deg=15.0, scale=0.15, gamma=0.4, bias_field=0.5, contrast=0.2, noise=0.05
    )


@dataclass
class LabelMap:
    """A label map on the model's grid, ready to synthesise crops from.

    Its ``bone``, ``boundary`` and ``trained`` serve the samplers as a
    :class:`~.data.TrainingVolume`'s do.
    """

    labels: np.ndarray  # uint8: 0 unlabelled, n the map's n-th structure
    is_bone: np.ndarray  # bool, one entry per structure index: which structures are bone
    bone: np.ndarray  # the target: float32 share of bone per voxel, or uint8 0/1
    bone_depth_mm: np.ndarray  # float32: depth inside a bone (distance to its surface); 0 outside bone
    body_mm: np.ndarray  # float32: distance from the labelled structures; 0 on them
    boundary: np.ndarray  # flat indices of bone voxels that touch non-bone
    record: dict
    trained: np.ndarray | None = None  # always None: a map is cut to its training range

    @property
    def spacing_mm(self) -> np.ndarray:
        """The model grid's spacing along the array's axes (k, j, i)."""
        return np.asarray(self.record["spacing_kji_mm"], dtype=np.float32)


def prepare_label_map(
    labels, bone_labels=None, spacing_mm=None, train_range_i=None, name: str = "", soft_labels: bool = True
) -> LabelMap:
    """Bring a label map (:class:`~KneeBoneSegLib.volume.Volume`) to the model's grid for synthesis.

    Parameters
    ----------
    labels : Volume
        Integer labels, 0 where nothing is labelled.
    bone_labels : sequence of int, optional
        The values that are bone (the target); the other non-zero values are
        other structures, synthesised but not bone. None: every non-zero value.
    spacing_mm : float or sequence, optional
        The model's voxel size (None: the map's own grid).
    train_range_i : (int, int), optional
        Keep only voxels ``from <= i < to`` (a fold's training side), before anything else.
    soft_labels : bool
        The target as the share of bone per voxel (else bone from a half).
    """
    values = np.asarray(labels.array)
    if np.issubdtype(values.dtype, np.floating):
        raise InputError(f"{name}: synthesis needs a label map (integer labels), not a probability map")
    if train_range_i is not None:
        values = values[:, :, train_range_i[0] : train_range_i[1]]
    present = [int(v) for v in np.unique(values) if v]
    bones = present if bone_labels is None else [int(v) for v in bone_labels]
    missing = sorted(set(bones) - set(present))
    if missing:
        raise InputError(f"{name}: no voxel has the bone label(s) {missing}; the map holds {present}")
    # Structures renumbered 1..n in the order of their values.
    lookup = np.zeros(int(values.max()) + 1, np.uint8)
    lookup[present] = np.arange(1, len(present) + 1)
    structures = lookup[values]
    is_bone = np.zeros(len(present) + 1, bool)
    is_bone[[lookup[v] for v in bones]] = True
    spacing_ijk = np.asarray(labels.geometry.spacing, float)
    if spacing_mm:
        shape = grid_shape_for_spacing(structures.shape, spacing_ijk, spacing_mm)
        spacing_ijk = spacing_ijk * np.asarray(structures.shape[::-1]) / np.asarray(shape[::-1])
        share = np.clip(resample_to_shape(is_bone[structures].astype(np.float32), shape, order=1), 0.0, 1.0)
        structures = resample_to_shape(structures, shape, order=0)
    else:
        share = is_bone[structures].astype(np.float32)
    spacing_kji = spacing_ijk[::-1]
    bone = np.ascontiguousarray(share if soft_labels else share >= 0.5, dtype=np.float32 if soft_labels else np.uint8)
    solid = is_bone[structures]
    depth = ndimage.distance_transform_edt(solid, sampling=spacing_kji).astype(np.float32)
    body = ndimage.distance_transform_edt(structures == 0, sampling=spacing_kji).astype(np.float32)
    hard = bone >= 0.5
    boundary = np.flatnonzero(hard & ~ndimage.binary_erosion(hard, border_value=1))
    if not boundary.size:
        raise InputError(f"{name}: the label map holds no bone on the model's grid")
    record = {
        "map": name,
        "shape_ijk": list(labels.array.shape[::-1]),
        "spacing_mm": [round(float(s), 5) for s in labels.geometry.spacing],
        "bone_labels": bones,
        "other_labels": [v for v in present if v not in bones],
        **({"train_range_i": [int(train_range_i[0]), int(train_range_i[1])]} if train_range_i is not None else {}),
        "model_grid_ijk": list(structures.shape[::-1]),
        "spacing_kji_mm": [round(float(s), 5) for s in spacing_kji],
        "bone_fraction": round(float(bone.mean()), 4),
    }
    return LabelMap(np.ascontiguousarray(structures, np.uint8), is_bone, bone, depth, body, boundary, record)


@lru_cache(maxsize=16)
def _upsampling(coarse: int, size: int) -> np.ndarray:
    """The (size, coarse) matrix of linear interpolation from ``coarse`` nodes spanning ``size`` samples."""
    position = np.linspace(0.0, coarse - 1.0, size)
    low = np.minimum(position.astype(int), coarse - 2)
    matrix = np.zeros((size, coarse), np.float32)
    matrix[np.arange(size), low] = 1.0 - (position - low)
    matrix[np.arange(size), low + 1] = position - low
    return matrix


def smooth_field(coarse: np.ndarray, shape) -> np.ndarray:
    """A coarse 2D grid of values interpolated linearly onto ``shape`` (two small matrix products)."""
    return _upsampling(coarse.shape[0], shape[0]) @ coarse @ _upsampling(coarse.shape[1], shape[1]).T


def elastic_displacement(size: int, spacing_mm, settings: Synthesis, rng: np.random.Generator) -> np.ndarray:
    """A smooth random displacement of a ``size``^2 crop's sample points, in voxels of the slice: shape (2, size*size)."""
    if not settings.elastic_mm:
        return np.zeros((2, size * size), np.float32)
    field = np.stack(
        [smooth_field(rng.uniform(-1.0, 1.0, size=(4, 4)).astype(np.float32), (size, size)) for _ in range(2)]
    )
    scale = rng.uniform(0.0, settings.elastic_mm) / np.asarray(spacing_mm, np.float32)
    return (field * scale[:, None, None]).reshape(2, -1)


def _distance_to_cuts(field: np.ndarray, cuts: np.ndarray, spacing_mm) -> np.ndarray:
    """About how far (mm) each pixel lies from the nearest level ``cuts`` of a smooth ``field``: the value gap over the slope."""
    gradient = np.gradient(field, *np.asarray(spacing_mm, dtype=np.float32))
    slope = np.sqrt(gradient[0] ** 2 + gradient[1] ** 2) + 1e-6
    return np.abs(field[..., None] - cuts).min(axis=-1) / slope


def synthesize_crop(
    labels, is_bone, bone_depth_mm, body_mm, spacing_mm, settings: Synthesis, rng: np.random.Generator
) -> np.ndarray:
    """One crop's image from its sampled label map: structures, cortex, background tissues, air and blur.

    Parameters
    ----------
    labels : ndarray of uint8, shape (P, P)
        Structure indices (0: unlabelled), as :class:`LabelMap` numbers them.
    is_bone : ndarray of bool
        Which structure indices are bone.
    bone_depth_mm, body_mm : ndarray of float32, shape (P, P)
        Depth inside bone, distance from the labelled structures.
    spacing_mm : (float, float)
        The crop's voxel size along its two axes.

    Returns
    -------
    ndarray of float32, shape (P, P)
        Intensities in about [0, 1], before the sampler's gamma, bias field, contrast and noise.
    """
    size = labels.shape
    count = is_bone.size
    means = rng.uniform(0.0, 1.0, size=count).astype(np.float32)
    spreads = rng.uniform(0.0, settings.spread, size=count).astype(np.float32)
    # Background: a smooth random field cut into a few pseudo-tissues at random levels.
    classes = int(rng.integers(settings.background_classes[0], settings.background_classes[1] + 1))
    field = smooth_field(rng.standard_normal((6, 6)).astype(np.float32), size)
    cuts = np.sort(rng.uniform(field.min(), field.max(), size=classes - 1))
    tissue_means = rng.uniform(0.0, 1.0, size=classes).astype(np.float32)
    tissue_spreads = rng.uniform(0.0, settings.spread, size=classes).astype(np.float32)
    marrows = means[is_bone]
    if settings.joint_darker and rng.uniform() < settings.joint_darker:
        others = ~is_bone & (np.arange(count) > 0)
        means[others] = rng.uniform(0.0, marrows.min(), size=int(others.sum()))
    if settings.marrow_like_tissue and rng.uniform() < settings.marrow_like_tissue:
        tissue_means[rng.integers(classes)] = np.clip(rng.choice(marrows) + rng.normal(0.0, 0.03), 0.0, 1.0)
    tissue = np.searchsorted(cuts, field)
    image = np.where(labels > 0, means[labels], tissue_means[tissue])
    spread = np.where(labels > 0, spreads[labels], tissue_spreads[tissue])
    image = image + spread * rng.standard_normal(size, dtype=np.float32)
    if settings.tissue_lines and classes > 1 and rng.uniform() < settings.tissue_lines:
        lines = (labels == 0) & (_distance_to_cuts(field, cuts, spacing_mm) < rng.uniform(*settings.line_mm))
        image[lines] = rng.uniform(*settings.cortex_intensity) + 0.02 * rng.standard_normal(
            int(lines.sum()), dtype=np.float32
        )
    # Cortex: a dark shell of random thickness inside every bone.
    in_bone = is_bone[labels]
    cortex = in_bone & (bone_depth_mm < rng.uniform(*settings.cortex_mm))
    image[cortex] = rng.uniform(*settings.cortex_intensity) + 0.02 * rng.standard_normal(
        int(cortex.sum()), dtype=np.float32
    )
    # Air beyond a body outline a random margin from the structures, the outline wavy.
    wave = smooth_field(rng.standard_normal((4, 4)).astype(np.float32), size)
    margin = rng.uniform(*settings.body_margin_mm) * (1.0 + 0.3 * wave)
    air = body_mm > margin
    image[air] = rng.uniform(*settings.air_intensity) + 0.02 * rng.standard_normal(int(air.sum()), dtype=np.float32)
    # Blur to a random resolution along each axis: a thick slice lies along either.
    resolution = rng.uniform(*settings.resolution_mm, size=2)
    sigma = np.sqrt(np.maximum(resolution**2 - np.asarray(spacing_mm) ** 2, 0.0)) / 2.355 / np.asarray(spacing_mm)
    if sigma.max() > 0.1:
        image = ndimage.gaussian_filter(image, sigma, mode="nearest")
    return np.clip(image, 0.0, None).astype(np.float32, copy=False)
