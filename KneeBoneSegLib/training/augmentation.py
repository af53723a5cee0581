"""The random changes each training crop goes through: which (:class:`Augmentation`) and how (the spatial map, the intensities)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class Augmentation:
    """Random changes applied to each training sub-volume; 0 or False turns one off.

    Each strength is the largest change: a sub-volume gets a change drawn
    uniformly between none and that.
    """

    projections: bool = True  # random permutation of the axes: the paper's three projections
    flips: bool = True  # random flip of each axis (left and right knees)
    rotation_deg: float = 10.0  # rotation about a random axis
    scale: float = 0.1  # isotropic zoom in [1 - scale, 1 + scale]
    gamma: float = 0.3  # intensity ** exp(U(-gamma, gamma))
    bias_field: float = 0.3  # largest |log| of a smooth quadratic multiplicative field
    contrast: float = 0.15  # scale about the mean by U(1 - contrast, 1 + contrast)
    noise: float = 0.05  # Gaussian noise, standard deviation up to this (normalised units)

    @classmethod
    def none(cls) -> "Augmentation":
        return cls(**{f.name: type(f.default)() for f in fields(cls)})


def spatial_matrix(augmentation: Augmentation, rng: np.random.Generator, dimensions: int = 3) -> np.ndarray:
    """Map from crop offsets to volume (or slice) offsets: axis permutation (3D only), flips, rotation, zoom."""
    matrix = np.eye(dimensions)
    if augmentation.projections and dimensions == 3:
        matrix = matrix[:, rng.permutation(3)]
    if augmentation.flips:
        matrix = matrix * rng.choice([-1.0, 1.0], size=dimensions)
    if augmentation.rotation_deg and dimensions == 2:
        angle = np.deg2rad(rng.uniform(-augmentation.rotation_deg, augmentation.rotation_deg))
        matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ matrix
    elif augmentation.rotation_deg:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = np.deg2rad(rng.uniform(-augmentation.rotation_deg, augmentation.rotation_deg))
        cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross  # Rodrigues
        matrix = rotation @ matrix
    if augmentation.scale:
        matrix = matrix * rng.uniform(1 - augmentation.scale, 1 + augmentation.scale)
    return matrix


def augment_intensities(
    image: np.ndarray, augmentation: Augmentation, rng: np.random.Generator, unit: np.ndarray
) -> np.ndarray:
    """Gamma, a smooth bias field, contrast and noise on a normalised sub-volume (or slice crop).

    ``unit`` is the crop's axis coordinates scaled to [-1, 1], the same along each axis.
    """
    if augmentation.gamma:
        image = np.clip(image, 0.0, None) ** np.float32(np.exp(rng.uniform(-augmentation.gamma, augmentation.gamma)))
    if augmentation.bias_field:
        # A quadratic in the crop's coordinates: each axis, its square, and each pair's product.
        axes = [unit.reshape([-1 if a == axis else 1 for a in range(image.ndim)]) for axis in range(image.ndim)]
        terms = (
            axes + [u**2 for u in axes] + [axes[a] * axes[b] for a, b in itertools.combinations(range(image.ndim), 2)]
        )
        c = rng.uniform(-1.0, 1.0, size=len(terms)).astype(np.float32)
        log_field = sum(coefficient * term for coefficient, term in zip(c, terms))
        amplitude = rng.uniform(0.0, augmentation.bias_field) / max(float(np.abs(log_field).max()), 1e-6)
        image = image * np.exp(np.float32(amplitude) * log_field)
    if augmentation.contrast:
        mean = image.mean()
        image = (image - mean) * np.float32(rng.uniform(1 - augmentation.contrast, 1 + augmentation.contrast)) + mean
    if augmentation.noise:
        image = image + np.float32(rng.uniform(0.0, augmentation.noise)) * rng.standard_normal(
            image.shape, dtype=np.float32
        )
    return image.astype(np.float32, copy=False)
