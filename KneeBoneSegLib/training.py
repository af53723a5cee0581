"""Training the 3D U-Net on image + label-map pairs (``kneeboneseg train``).

The network is binary (bone against background; the three bones are named
afterwards by anatomy), so any label value above 0 is bone. Training follows
the paper, with what a network trained on very few scans needs to generalise:

- **Data.** Each pair is normalised as the model's card says (over the whole
  scan, as inference does), optionally restricted to a voxel range along the
  first image axis ``i`` (the spatial held-out split: the card's ``heldout``
  records the range never trained on) and resampled to the card's
  ``spacing_mm``, with the same functions the pipeline uses at inference.
- **Sub-volumes** are drawn on the fly, never all materialised: a
  ``boundary_fraction`` of them centred (with jitter) on bone-boundary voxels,
  where the errors are, the rest anywhere in the volume.
- **Augmentation** (:class:`Augmentation`): the paper's three projections as a
  random permutation of each sub-volume's axes, random flips, small rotations
  and scaling (all in one resampling of the sub-volume), then gamma, bias
  field, contrast and noise.
- **Loss** binary cross-entropy (the paper's) plus ``dice_weight`` times the
  soft Dice loss of the batch (1.0 by default; 0 is the paper's loss alone); Adam.
- **Validation** on a fixed, seeded sample of unaugmented sub-volumes of the
  training data; the model file holds the weights of the best validation loss.
- **Exact resume.** After every epoch (and when ``progress`` cancels) a
  checkpoint beside the model stores weights, optimiser state, step, history
  and the sampler's random state, so a resumed run continues exactly where
  the last one stopped.

Files written beside ``OUTPUT.keras``: ``OUTPUT.onnx`` (the same network for
segmenting without Keras, :mod:`.export`), ``OUTPUT.json`` (the card: data,
augmentation, steps, time, machine, the command that reproduces it, the
export), ``OUTPUT.loss.png`` (loss curves) and ``OUTPUT.checkpoint.npz``.
Only Keras 3 APIs are used; the ONNX export goes through tf2onnx and so needs
the TensorFlow backend.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import os
import platform
import shlex
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from .errors import Cancelled, InputError
from .io.atomic import atomic_file
from .network.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE, NORMALIZATIONS, PRESET_SETTINGS
from .network.models import Model, ModelCard, file_sha256, load_model, network_dimensions, save_model
from .preprocess.normalization import DEFAULT_NORMALIZATION, normalize_intensities
from .preprocess.resampling import grid_shape_for_spacing, resample_to_shape

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]



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


@dataclass
class TrainingConfig:
    """Everything that defines a training run; ``kneeboneseg train`` fills it from its arguments.

    ``output`` is the ``.keras`` model to write. ``train_range_i`` restricts
    training to input voxels ``from <= i < to`` along the first image axis;
    the range left out must be one slab at either end (it becomes the card's
    ``heldout``). ``None`` for ``base_filters``, ``depth``, ``patch_size``,
    ``stride``, ``batch_size`` or ``epochs`` takes the architecture's
    (:data:`~KneeBoneSegLib.network.architectures.ARCHITECTURES`). With
    ``initial_model`` (fine-tuning) the architecture, patch size,
    normalisation and spacing come from that model's card.
    """

    images: list[Path]
    labels: list[Path]
    output: Path
    architecture: str = DEFAULT_ARCHITECTURE
    base_filters: int | None = None
    depth: int | None = None
    patch_size: int | None = None
    stride: int | None = None  # the inference stride the card asks for
    spacing_mm: float | None = 0.7  # None: train on the scans' own grid
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    train_range_i: tuple[int, int] | None = None
    epochs: int | None = None
    steps_per_epoch: int = 100
    batch_size: int | None = None
    norm_layer: str | None = None  # normalisation after each convolution: batch or instance
    soft_labels: bool | None = None  # targets: the share of bone per voxel of the model's grid (else bone from a half)
    # Sub-volumes may reach half their edge past train_range_i: they see the image there, never its labels.
    crops_past_range: bool = False
    max_minutes: float | None = None  # wall-time budget: the run ends at the first epoch end past it
    learning_rate: float = 1e-3
    dice_weight: float = 1.0
    boundary_fraction: float = 0.5
    validation_patches: int = 16
    augmentation: Augmentation = field(default_factory=Augmentation)
    seed: int = 0
    initial_model: Path | None = None
    name: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress_bar: bool = True

    def validate(self) -> "TrainingConfig":
        self.images = [Path(p) for p in self.images]
        self.labels = [Path(p) for p in self.labels]
        self.output = Path(self.output)
        if not self.images or len(self.images) != len(self.labels):
            raise InputError("give one or more IMAGE LABELS pairs (an image, then its label map)")
        if self.output.suffix != ".keras":
            raise InputError(f"{self.output}: the model file must end in .keras")
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"architecture must be one of {', '.join(ARCHITECTURES)}, not {self.architecture!r}")
        _fill_from_architecture(self)
        positive = {"epochs": self.epochs, "steps per epoch": self.steps_per_epoch, "batch size": self.batch_size,
                    "validation patches": self.validation_patches, "learning rate": self.learning_rate}
        for what, value in positive.items():
            if not value > 0:
                raise InputError(f"{what} must be positive, not {value}")
        if not 0.0 <= self.boundary_fraction <= 1.0 or self.dice_weight < 0:
            raise InputError("boundary fraction must lie in [0, 1] and the Dice weight must be >= 0")
        if not 0 < self.stride <= self.patch_size:
            raise InputError(f"stride must lie in 1..patch size ({self.patch_size}), not {self.stride}")
        if self.norm_layer not in NORMALIZATIONS:
            raise InputError(f"normalisation layer must be one of {', '.join(NORMALIZATIONS)}, not {self.norm_layer!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InputError(f"the time budget must be a positive number of minutes, not {self.max_minutes}")
        if self.spacing_mm is not None and not self.spacing_mm > 0:
            raise InputError(f"spacing must be positive (or none for the scan's grid), not {self.spacing_mm}")
        if self.train_range_i is not None:
            start, stop = (int(v) for v in self.train_range_i)
            if not 0 <= start < stop:
                raise InputError(f"training range along i must satisfy 0 <= from < to, not {start} {stop}")
            self.train_range_i = (start, stop)
        return self

    @property
    def checkpoint_path(self) -> Path:
        return self.output.with_suffix(".checkpoint.npz")

    @property
    def curves_path(self) -> Path:
        return self.output.with_suffix(".loss.png")


def _fill_from_architecture(config: TrainingConfig) -> TrainingConfig:
    """Give the settings ``config`` leaves at ``None`` its architecture's values."""
    preset = ARCHITECTURES[config.architecture]
    for name in PRESET_SETTINGS:
        if getattr(config, name) is None:
            setattr(config, name, getattr(preset, name))
    return config


@dataclass
class TrainingResult:
    """What a finished run produced: the model file (best validation loss) and the run's record."""

    model_path: Path
    card: ModelCard
    history: list[dict]
    network: object  # the keras.Model in its last state (not the best one, which is in model_path)
    steps: int
    seconds: float


@dataclass
class TrainingVolume:
    """One training pair on the model's grid: normalised image, bone mask, boundary voxels."""

    image: np.ndarray  # float32 [k, j, i]
    bone: np.ndarray  # uint8 0/1, or float32 share of bone per voxel (soft labels); 0 where not trained on
    boundary: np.ndarray  # flat indices of trained bone voxels that touch background
    record: dict  # what the card says about this pair
    trained: np.ndarray | None = None  # uint8 1 where the loss counts (None: everywhere), when the image reaches past the range


def prepare_volume(image, labels, spacing_mm=None, normalization=None, train_range_i=None, name="", soft_labels=False, context_mm=0.0) -> TrainingVolume:
    """Bring an image and its label map (:class:`~KneeBoneSegLib.volume.Volume`) to the model's grid.

    The image is normalised over the whole scan (as at inference), both are
    cut to ``train_range_i`` (input voxels ``from <= i < to``) before any
    resampling, so no voxel outside the range reaches training, then
    resampled to ``spacing_mm`` (a number or one per axis; linear for the
    image, the labels as the share of bone in each voxel, kept from a half,
    or with ``soft_labels`` kept as that share: a coarse grid then loses
    almost nothing of the bone's outline).

    ``context_mm`` keeps the image (never the labels) that far past each
    end of the range, so sub-volumes can reach past it; ``trained`` then
    marks the model-grid voxels that lie wholly inside the range (no label
    beyond it blends into them), and the labels are zero everywhere else.
    """
    if image.array.shape != labels.array.shape:
        raise InputError(f"{name}: the image has {image.shape_ijk} voxels but its labels {labels.shape_ijk}; give labels on the image's grid")
    if not np.allclose(image.geometry.ijk_to_lps, labels.geometry.ijk_to_lps, atol=1e-3 * min(image.geometry.spacing)):
        raise InputError(f"{name}: the label map does not lie on the image's grid (spacing, origin or direction differ); resample it to the image")
    if np.issubdtype(labels.array.dtype, np.floating):
        raise InputError(f"{name}: the labels are a probability map; give a label map or binary mask (labels > 0 are bone)")
    normalized = normalize_intensities(image.array, normalization)
    bone = labels.array > 0
    shape_i = image.array.shape[2]
    start, stop = train_range_i if train_range_i is not None else (0, shape_i)
    if stop > shape_i:
        raise InputError(f"{name}: the training range ends at i = {stop} but the image has {shape_i} voxels along i")
    context = int(round(context_mm / image.geometry.spacing[0])) if context_mm else 0
    first, last = max(0, start - context), min(shape_i, stop + context)
    inside = np.zeros(bone.shape, bool)
    inside[:, :, start:stop] = True
    normalized, bone, inside = normalized[:, :, first:last], bone[:, :, first:last], inside[:, :, first:last]
    if spacing_mm:
        spacing_ijk = image.geometry.spacing
        shape = grid_shape_for_spacing(normalized.shape, spacing_ijk, spacing_mm)
        normalized = resample_to_shape(normalized, shape, order=1)
        # The share of each coarse voxel that is bone, kept where it is at least half: nearest-neighbour
        # sampling would take one of two fine voxels on every tie (halving the spacing gives only ties)
        # and shift the labels half a fine voxel off the image.
        bone = resample_to_shape(bone.astype(np.float32), shape, order=1)
        bone = np.clip(bone, 0.0, 1.0) if soft_labels else bone >= 0.5
        # A coarse voxel counts only if smoothing and interpolation drew (almost) nothing from past the range.
        inside = resample_to_shape(inside.astype(np.float32), shape, order=1) >= 0.999
    bone = np.ascontiguousarray(np.where(inside, bone, 0), dtype=np.float32 if soft_labels else np.uint8)
    if not bone.any():
        raise InputError(f"{name}: the labels mark no bone (no voxel > 0) in the training range; check the label map and --train-range-i")
    solid = bone >= 0.5
    boundary = np.flatnonzero(solid & ~ndimage.binary_erosion(solid | ~inside, border_value=1))
    record = {
        "shape_ijk": list(image.shape_ijk),
        "spacing_mm": [round(s, 5) for s in image.geometry.spacing],
        "train_range_i": [start, stop],
        **({"image_range_i": [first, last]} if context else {}),
        "model_grid_ijk": list(bone.shape[::-1]),
        "bone_fraction": round(float(bone[inside].mean()), 4),
        "boundary_voxels": int(boundary.size),
    }
    trained = np.ascontiguousarray(inside, dtype=np.uint8) if context else None
    return TrainingVolume(np.ascontiguousarray(normalized, dtype=np.float32), bone, boundary, record, trained)


def heldout_range(train_range_i, shape_i: int) -> dict | None:
    """The card's ``heldout`` entry: the voxel range along ``i`` never trained on (``from <= i < to``).

    ``None`` when training used every voxel. The range trained on must reach
    one end of the axis so that what is left out is one slab.
    """
    if train_range_i is None:
        return None
    start, stop = train_range_i
    if start == 0 and stop >= shape_i:
        return None
    if start == 0:
        return {"axis": "i", "from": int(stop), "to": int(shape_i)}
    if stop >= shape_i:
        return {"axis": "i", "from": 0, "to": int(start)}
    raise InputError(
        f"the training range {start}..{stop} along i leaves out both ends of the {shape_i} voxels; "
        "train on one side (from 0, or up to the end) so the held-out part is one slab"
    )


class PatchSampler:
    """Draws (augmented) training sub-volumes on the fly.

    Its whole state is one :class:`numpy.random.Generator` (``state`` /
    ``set_state``), so a checkpoint can store it and a resumed run draws the
    same sub-volumes an uninterrupted one would.
    """

    def __init__(self, volumes, patch_size: int, boundary_fraction: float, augmentation: Augmentation, seed):
        self.volumes = list(volumes)
        self.patch_size = int(patch_size)
        self.boundary_fraction = float(boundary_fraction)
        self.augmentation = augmentation
        self.rng = np.random.default_rng(seed)
        for volume in self.volumes:
            if min(volume.image.shape) < self.patch_size:
                raise InputError(
                    f"the training volume is {volume.record['model_grid_ijk']} voxels on the model's grid, smaller than the "
                    f"{self.patch_size}^3 sub-volumes; use a wider training range, a finer spacing or a smaller patch size"
                )
        offsets = np.arange(self.patch_size, dtype=float) - (self.patch_size - 1) / 2
        self._offsets = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij")).reshape(3, -1)
        self._unit = (offsets / max(offsets.max(), 1.0)).astype(np.float32)

    @property
    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``size`` sub-volumes as ``(images, targets)``, float32 ``(size, P, P, P, 1)`` and ``(size, P, P, P, C)``.

        The targets' first channel is the bone; where the volumes mark the
        voxels trained on, a second channel is 1 there and 0 elsewhere
        (:func:`bone_loss` counts only those).
        """
        patches = [self._patch() for _ in range(size)]
        images = np.stack([patch[0] for patch in patches])[..., None]
        targets = np.stack([np.stack(patch[1:], axis=-1) for patch in patches]).astype(np.float32)
        return images, targets

    def _patch(self) -> tuple[np.ndarray, ...]:
        volume = self.volumes[self.rng.integers(len(self.volumes))]
        centre = self._corner(volume) + (self.patch_size - 1) / 2
        coordinates = _spatial_matrix(self.augmentation, self.rng) @ self._offsets + centre[:, None]
        shape = (self.patch_size,) * 3
        image = ndimage.map_coordinates(volume.image, coordinates, order=1, mode="nearest", output=np.float32)
        # Soft labels are shares, interpolated as the image is; hard ones stay 0/1.
        bone = ndimage.map_coordinates(volume.bone, coordinates, order=1 if volume.bone.dtype == np.float32 else 0, mode="nearest")
        image = _augment_intensities(image.reshape(shape), self.augmentation, self.rng, self._unit)
        if volume.trained is None:
            return image, bone.reshape(shape)
        trained = ndimage.map_coordinates(volume.trained, coordinates, order=0, mode="constant", cval=0)
        return image, bone.reshape(shape), trained.reshape(shape)

    def _corner(self, volume: TrainingVolume) -> np.ndarray:
        """Index (k, j, i) of the sub-volume's first voxel before any rotation."""
        shape = np.asarray(volume.image.shape)
        size = self.patch_size
        if volume.boundary.size and self.rng.random() < self.boundary_fraction:
            voxel = np.asarray(np.unravel_index(volume.boundary[self.rng.integers(volume.boundary.size)], shape))
            # Jitter so the boundary is not always at the centre, where the network never sees it at inference.
            corner = voxel - size // 2 + self.rng.integers(-(size // 4), size // 4 + 1, size=3)
        else:
            corner = self.rng.integers(0, shape - size + 1)
        return np.clip(corner, 0, shape - size).astype(float)


class SliceSampler(PatchSampler):
    """Draws (augmented) ``patch_size``^2 crops of slices for the 2D U-Net, of the three planes alike.

    Each crop lies in a slice, of a plane drawn at random, through a voxel
    trained on (a ``boundary_fraction`` of them on the bone's boundary),
    shifted by up to a quarter of its edge so that the boundary is not always
    at its centre. Flips, in-plane rotation and zoom map the crop's offsets
    into the slice, as :class:`PatchSampler` does in 3D; ``projections`` has
    no say: the crops always come from all three planes, whose slices the
    network predicts. Its state is its generator's, as :class:`PatchSampler`'s.
    """

    def __init__(self, volumes, patch_size: int, boundary_fraction: float, augmentation: Augmentation, seed):
        super().__init__(volumes, patch_size, boundary_fraction, augmentation, seed)
        offsets = np.arange(self.patch_size, dtype=float) - (self.patch_size - 1) / 2
        self._offsets = np.stack(np.meshgrid(offsets, offsets, indexing="ij")).reshape(2, -1)
        self._trained = [None if volume.trained is None else np.flatnonzero(volume.trained) for volume in self.volumes]

    def _patch(self) -> tuple[np.ndarray, ...]:
        which = self.rng.integers(len(self.volumes))
        volume, trained = self.volumes[which], self._trained[which]
        shape, size = np.asarray(volume.image.shape), self.patch_size
        if volume.boundary.size and self.rng.random() < self.boundary_fraction:
            voxel = np.unravel_index(volume.boundary[self.rng.integers(volume.boundary.size)], shape)
        elif trained is not None:
            voxel = np.unravel_index(trained[self.rng.integers(trained.size)], shape)
        else:
            voxel = self.rng.integers(0, shape)
        axis = int(self.rng.integers(3))
        arrays = [volume.image, volume.bone] + ([] if volume.trained is None else [volume.trained])
        planes = [np.moveaxis(array, axis, 0)[voxel[axis]] for array in arrays]
        in_plane = np.delete(np.asarray(voxel), axis)
        corner = np.clip(in_plane - size // 2 + self.rng.integers(-(size // 4), size // 4 + 1, size=2), 0, np.delete(shape, axis) - size)
        coordinates = _spatial_matrix(self.augmentation, self.rng, dimensions=2) @ self._offsets + (corner + (size - 1) / 2)[:, None]
        image = ndimage.map_coordinates(planes[0], coordinates, order=1, mode="nearest", output=np.float32).reshape(size, size)
        bone = ndimage.map_coordinates(planes[1], coordinates, order=1 if planes[1].dtype == np.float32 else 0, mode="nearest").reshape(size, size)
        image = _augment_intensities(image, self.augmentation, self.rng, self._unit)
        if volume.trained is None:
            return image, bone
        return image, bone, ndimage.map_coordinates(planes[2], coordinates, order=0, mode="constant", cval=0).reshape(size, size)


def samplers(volumes, config: "TrainingConfig", patch_size: int, dimensions: int) -> tuple[PatchSampler, tuple[np.ndarray, np.ndarray]]:
    """The training sampler for the network's ``dimensions`` and its fixed, unaugmented validation batch."""
    kind = SliceSampler if dimensions == 2 else PatchSampler
    sampler = kind(volumes, patch_size, config.boundary_fraction, config.augmentation, seed=config.seed)
    validation = kind(volumes, patch_size, config.boundary_fraction, Augmentation.none(), seed=[config.seed, 1]).batch(config.validation_patches)
    return sampler, validation


def _spatial_matrix(augmentation: Augmentation, rng: np.random.Generator, dimensions: int = 3) -> np.ndarray:
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


def _augment_intensities(image: np.ndarray, augmentation: Augmentation, rng: np.random.Generator, unit: np.ndarray) -> np.ndarray:
    """Gamma, a smooth bias field, contrast and noise on a normalised sub-volume (or slice crop).

    ``unit`` is the crop's axis coordinates scaled to [-1, 1], the same along each axis.
    """
    if augmentation.gamma:
        image = np.clip(image, 0.0, None) ** np.float32(np.exp(rng.uniform(-augmentation.gamma, augmentation.gamma)))
    if augmentation.bias_field:
        # A quadratic in the crop's coordinates: each axis, its square, and each pair's product.
        axes = [unit.reshape([-1 if a == axis else 1 for a in range(image.ndim)]) for axis in range(image.ndim)]
        terms = axes + [u**2 for u in axes] + [axes[a] * axes[b] for a, b in itertools.combinations(range(image.ndim), 2)]
        c = rng.uniform(-1.0, 1.0, size=len(terms)).astype(np.float32)
        log_field = sum(coefficient * term for coefficient, term in zip(c, terms))
        amplitude = rng.uniform(0.0, augmentation.bias_field) / max(float(np.abs(log_field).max()), 1e-6)
        image = image * np.exp(np.float32(amplitude) * log_field)
    if augmentation.contrast:
        mean = image.mean()
        image = (image - mean) * np.float32(rng.uniform(1 - augmentation.contrast, 1 + augmentation.contrast)) + mean
    if augmentation.noise:
        image = image + np.float32(rng.uniform(0.0, augmentation.noise)) * rng.standard_normal(image.shape, dtype=np.float32)
    return image.astype(np.float32, copy=False)


def bone_loss(dice_weight: float = 0.0):
    """Binary cross-entropy plus ``dice_weight`` times the batch's soft Dice loss (Keras 3 ops only).

    Targets with a second channel (:meth:`PatchSampler.batch`) count only the
    voxels where it is 1: the mean cross-entropy and the Dice are over those.
    """
    from keras import ops

    def loss(y_true, y_pred):
        y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        bone = y_true[..., :1]
        counted = y_true[..., 1:] if y_true.shape[-1] == 2 else ops.ones_like(bone)
        p = ops.clip(y_pred, 1e-7, 1.0 - 1e-7)
        bce = -(bone * ops.log(p) + (1.0 - bone) * ops.log(1.0 - p))
        total = ops.sum(counted * bce) / ops.maximum(ops.sum(counted), 1.0)
        if not dice_weight:
            return total
        overlap = ops.sum(counted * bone * y_pred)
        dice = 1.0 - (2.0 * overlap + 1.0) / (ops.sum(counted * bone) + ops.sum(counted * y_pred) + 1.0)
        return total + dice_weight * dice

    return loss


@dataclass
class _State:
    """What a checkpoint holds besides weights and optimiser variables."""

    step: int = 0
    epoch_loss_sum: float = 0.0
    best_loss: float = float("inf")
    best_epoch: int | None = None
    seconds: float = 0.0
    history: list = field(default_factory=list)
    sampler: dict | None = None
    signature: dict | None = None


def train(config: TrainingConfig, progress: Progress | None = None) -> TrainingResult:
    """Train (or fine-tune, or resume) the U-Net as ``config`` says; see the module doc.

    ``progress(stage, fraction)`` is called after every step; an exception
    raised from it stops the run after saving a checkpoint (resume with
    ``config.resume``) and is raised as :class:`~KneeBoneSegLib.errors.Cancelled`.
    """
    import keras
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .network.export import export_onnx
    from .io.images import read_mask, read_volume

    config = config.validate()
    _check_output(config)
    started = datetime.datetime.now(datetime.timezone.utc)
    keras.utils.set_random_seed(config.seed)
    network, card = _initial_network(config)

    volumes, data = [], []
    for image_path, labels_path in zip(config.images, config.labels):
        image = read_volume(image_path)
        # Half a sub-volume past the range: every crop still has at least half its voxels trained on.
        context_mm = card.patch_size / 2 * (card.spacing_mm[0] if card.spacing_mm else image.geometry.spacing[0]) if config.crops_past_range else 0.0
        volume = prepare_volume(image, read_mask(labels_path), card.spacing_mm, card.normalization, config.train_range_i,
                                name=str(labels_path), soft_labels=config.soft_labels, context_mm=context_mm)
        volume.record.update(image=image_path.name, labels=labels_path.name, image_sha256=_sha256(image_path), labels_sha256=_sha256(labels_path))
        volumes.append(volume)
        data.append(volume.record)
    card.heldout = heldout_range(config.train_range_i, volumes[0].record["shape_ijk"][0])
    sampler, (validation_x, validation_y) = samplers(volumes, config, card.patch_size, network_dimensions(card))

    network.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=bone_loss(config.dice_weight))
    network.optimizer.build(network.trainable_variables)
    state = _State(signature=_signature(config), sampler=sampler.state)
    best_weights = network.get_weights()
    if config.resume and config.checkpoint_path.is_file():
        state, best_weights = _load_checkpoint(config.checkpoint_path, network, state.signature)
        sampler.set_state(state.sampler)
        log.info("Resuming %s at step %d (epoch %d)", config.output, state.step, state.step // config.steps_per_epoch + 1)

    total_steps = config.epochs * config.steps_per_epoch
    run_start = time.perf_counter() - state.seconds
    with logging_redirect_tqdm(), tqdm(total=total_steps, initial=state.step, unit="step", disable=None if config.progress_bar else True, desc="training") as bar:
        while state.step < total_steps:
            images, bone = sampler.batch(config.batch_size)
            loss = float(network.train_on_batch(images, bone, return_dict=True)["loss"])
            network.reset_metrics()  # train_on_batch reports a running mean; keep per-step losses
            state.step += 1
            state.epoch_loss_sum += loss
            state.sampler = sampler.state
            state.seconds = time.perf_counter() - run_start
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if state.step % config.steps_per_epoch == 0:
                best_weights = _end_epoch(config, card, network, state, best_weights, (validation_x, validation_y), data, started)
                if config.max_minutes is not None and state.seconds >= 60 * config.max_minutes:
                    log.info("time budget of %g min spent at step %d of %d", config.max_minutes, state.step, total_steps)
                    break
            try:
                if progress is not None:
                    progress("training", state.step / total_steps)
            except Exception as error:
                _save_checkpoint(config.checkpoint_path, network, best_weights, state)
                message = f"training stopped at step {state.step} of {total_steps}; continue with --resume"
                raise Cancelled(message if isinstance(error, Cancelled) else f"{message} ({error})") from None
    if not config.checkpoint_path.is_file() or state.step % config.steps_per_epoch:
        _save_checkpoint(config.checkpoint_path, network, best_weights, state)
    card.training = _training_record(config, state, data, started)
    save_model(_export(network, best_weights, card), config.output)
    card.export = {"onnx": export_onnx(config.output)}  # what segmenting runs, beside the .keras file
    return TrainingResult(config.output, card, state.history, network, state.step, round(state.seconds, 1))


def _end_epoch(config, card, network, state: _State, best_weights, validation, data, started):
    """Validate, keep the best weights, save model, checkpoint and curves, log one line."""
    epoch = state.step // config.steps_per_epoch
    validation_loss = float(network.evaluate(*validation, batch_size=config.batch_size, verbose=0, return_dict=True)["loss"])
    entry = {
        "epoch": epoch,
        "step": state.step,
        "loss": round(state.epoch_loss_sum / config.steps_per_epoch, 6),
        "validation_loss": round(validation_loss, 6),
        "seconds": round(state.seconds, 1),
    }
    state.history.append(entry)
    state.epoch_loss_sum = 0.0
    improved = validation_loss < state.best_loss
    if improved:
        state.best_loss, state.best_epoch = validation_loss, epoch
        best_weights = network.get_weights()
        card.training = _training_record(config, state, data, started)
        save_model(_export(network, best_weights, card), config.output)
    _save_checkpoint(config.checkpoint_path, network, best_weights, state)
    write_loss_curves(state.history, config.curves_path)
    log.info(
        "epoch %d/%d: loss %.4f, validation loss %.4f%s, %.0f s",
        epoch, config.epochs, entry["loss"], validation_loss, " (best, saved)" if improved else "", state.seconds,
    )
    return best_weights


def _check_output(config: TrainingConfig) -> None:
    if config.resume or config.overwrite:
        return
    existing = [p for p in (config.output, config.checkpoint_path) if p.exists()]
    if existing:
        raise InputError(f"{existing[0]} exists; pass --resume to continue that training or --overwrite to start again")
    if not config.output.parent.is_dir():
        raise InputError(f"{config.output.parent} does not exist; create the folder for the model first")


def _initial_network(config: TrainingConfig):
    """The network to train and the card it will be saved with."""
    if config.initial_model is not None:
        if Path(config.initial_model).suffix != ".keras":
            raise InputError(f"{config.initial_model}: fine-tuning starts from the .keras file (an .onnx file holds no trainable weights)")
        start = load_model(config.initial_model)
        card = ModelCard(
            name=config.name or config.output.stem,
            architecture=dict(start.card.architecture),
            patch_size=start.card.patch_size,
            stride=start.card.stride,
            normalization=dict(start.card.normalization),
            spacing_mm=start.card.spacing_mm,
        )
        log.info("Fine-tuning %s: patch size, normalisation and spacing come from its card", config.initial_model)
        return start.network.network, card  # the Keras model inside the engine wrapper
    from .network.unet import build_unet

    architecture = {"base_filters": int(config.base_filters), "depth": int(config.depth)}
    if config.norm_layer != "batch":  # the shipped cards predate the choice and mean batch norm
        architecture["normalization"] = config.norm_layer
    dimensions = ARCHITECTURES[config.architecture].dimensions
    if dimensions == 2:  # cards without the entry mean 3D sub-volumes
        architecture["dimensions"] = dimensions
    try:
        # A 2D network takes slices of any size: it predicts whole slices, trained on crops of them.
        network = build_unet(patch_size=config.patch_size if dimensions == 3 else None, **architecture)
    except ValueError as error:
        raise InputError(f"cannot build the network: {error}") from None
    card = ModelCard(
        name=config.name or config.output.stem,
        architecture=architecture,
        patch_size=config.patch_size,
        stride=config.stride,
        projections=ARCHITECTURES[config.architecture].projections,
        fusion=ARCHITECTURES[config.architecture].fusion,
        normalization=dict(config.normalization),
        spacing_mm=[float(config.spacing_mm)] * 3 if config.spacing_mm else None,
    )
    return network, card


def _export(network, weights, card: ModelCard) -> Model:
    """An uncompiled copy of ``network`` holding ``weights``: the shipped file carries no optimiser state."""
    copy = type(network).from_config(network.get_config())
    copy.set_weights(weights)
    return Model(network=copy, card=card)


def _signature(config: TrainingConfig) -> dict:
    """The settings a resumed run must share with the run it continues (all but length and output handling)."""
    settings = asdict(config)
    for name in ("epochs", "max_minutes", "resume", "overwrite", "progress_bar", "output"):
        settings.pop(name)
    return json.loads(json.dumps(settings, default=lambda value: Path(value).name))


def _save_checkpoint(path: Path, network, best_weights, state: _State) -> None:
    """Write the checkpoint atomically (a stopped write never leaves a broken one)."""
    import keras

    arrays = {f"weight{n}": w for n, w in enumerate(network.get_weights())}
    arrays.update({f"best{n}": w for n, w in enumerate(best_weights)})
    arrays.update({f"optimizer{n}": keras.ops.convert_to_numpy(v) for n, v in enumerate(network.optimizer.variables)})
    arrays["state"] = np.array(json.dumps(asdict(state)))
    with atomic_file(path) as partial, open(partial, "wb") as file:
        np.savez(file, **arrays)


def _load_checkpoint(path: Path, network, signature: dict):
    """Restore weights and optimiser variables; return the run's state and the best weights so far."""
    with np.load(path, allow_pickle=False) as stored:
        state = _State(**json.loads(str(stored["state"])))
        if state.signature != signature:
            changed = sorted(k for k in signature if signature.get(k) != (state.signature or {}).get(k))
            raise InputError(f"{path} was made with other settings ({', '.join(changed)}); resume with the same ones or start again with --overwrite")
        count = len(network.get_weights())
        network.set_weights([stored[f"weight{n}"] for n in range(count)])
        best_weights = [stored[f"best{n}"] for n in range(count)]
        for n, variable in enumerate(network.optimizer.variables):
            variable.assign(stored[f"optimizer{n}"])
    return state, best_weights


def _training_record(config: TrainingConfig, state: _State, data: list, started: datetime.datetime) -> dict:
    """The card's ``training`` entry: enough to reproduce the run and to judge it."""
    return {
        "command": command_line(config),
        "data": data,
        "initial_model": config.initial_model.name if config.initial_model else None,
        "sampling": {
            "patch_size": int(config.patch_size),
            "batch_size": config.batch_size,
            "boundary_fraction": config.boundary_fraction,
            "validation": f"{config.validation_patches} fixed unaugmented sub-volumes of the training data (seeded)",
        },
        "augmentation": asdict(config.augmentation),
        "loss": {"binary_crossentropy": 1.0, "soft_dice": config.dice_weight},
        "optimizer": {"name": "adam", "learning_rate": config.learning_rate},
        "seed": config.seed,
        "epochs": len(state.history),
        "steps_per_epoch": config.steps_per_epoch,
        "steps": state.step,
        "best_epoch": state.best_epoch,
        "best_validation_loss": None if state.best_epoch is None else round(state.best_loss, 6),
        "history": state.history,
        "seconds": round(state.seconds, 1),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
    }


def _machine() -> dict:
    import keras

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "system": platform.system(),
        "machine": platform.machine(),
        "cpus": cpus,
        "devices": _devices(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "keras": keras.__version__,
        "backend": keras.config.backend(),
    }


def _devices() -> list[str]:
    """The devices the backend trains on, as Keras names them (its torch backend has no device list)."""
    import keras

    if keras.config.backend() == "torch":
        import torch

        return [f"cuda:{n}" for n in range(torch.cuda.device_count())] or ["cpu:0"]
    return [str(device) for device in keras.distribution.list_devices()]


def _sha256(path: Path) -> str | None:
    """Checksum of a data file, so a card names exactly what it was trained on (None for a DICOM folder)."""
    return file_sha256(path) if path.is_file() else None


# ----------------------------------------------------------------------------------------------
# Command line: every TrainingConfig field F is the option --F (underscores as dashes).

_NOT_OPTIONS = ("images", "labels", "output", "resume", "overwrite", "progress_bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``kneeboneseg train``'s arguments to ``parser`` (read them back with :func:`config_from_args`)."""
    default = TrainingConfig(images=[], labels=[], output=Path("model.keras"))
    parser.add_argument("pairs", nargs="+", type=Path, metavar="IMAGE LABELS", help="training scans, each followed by its label map (labels > 0 are bone)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="model file to write (.keras); its card, loss curves and checkpoint go beside it")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=default.architecture,
                        help="the network and its sub-volumes, stride, batch and epochs (see KneeBoneSegLib.network.architectures; default: %(default)s)")
    parser.add_argument("--base-filters", type=int, default=None, help="filters of the first level (default: the architecture's)")
    parser.add_argument("--depth", type=int, default=None, help="pooling steps (default: the architecture's)")
    parser.add_argument("--patch-size", type=int, default=None, help="sub-volume edge in voxels (default: the architecture's)")
    parser.add_argument("--stride", type=int, default=None, help="inference stride recorded in the card (default: the architecture's)")
    parser.add_argument("--spacing-mm", type=_spacing, default=default.spacing_mm,
                        help="isotropic voxel size the model works at, or 'none' for the scan's own grid (default: %(default)s)")
    parser.add_argument("--normalization", type=_json_object, default=default.normalization,
                        help="intensity normalisation as JSON (default: %(default)s)")
    parser.add_argument("--train-range-i", type=int, nargs=2, metavar=("FROM", "TO"), default=None,
                        help="train only on input voxels FROM <= i < TO along the first image axis; the rest is recorded as held out")
    parser.add_argument("--epochs", type=int, default=None, help="(default: the architecture's)")
    parser.add_argument("--steps-per-epoch", type=int, default=default.steps_per_epoch, help="batches per epoch (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None, help="sub-volumes per batch (default: the architecture's)")
    parser.add_argument("--norm-layer", choices=NORMALIZATIONS, default=None, help="normalisation after each convolution (default: the architecture's)")
    parser.add_argument("--soft-labels", type=_boolean, default=None, metavar="true|false",
                        help="train on the share of bone per voxel of the model's grid (default: the architecture's)")
    parser.add_argument("--crops-past-range", type=_boolean, default=default.crops_past_range, metavar="true|false",
                        help="let sub-volumes reach half their edge past --train-range-i, seeing the image there but not its labels (default: %(default)s)")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-time budget: stop at the first epoch end past it (a later --resume goes on)")
    parser.add_argument("--learning-rate", type=float, default=default.learning_rate, help="Adam's learning rate (default: %(default)s; the paper used 1e-4)")
    parser.add_argument("--dice-weight", type=float, default=default.dice_weight, help="weight of a soft Dice term added to the cross-entropy (default: %(default)s)")
    parser.add_argument("--boundary-fraction", type=float, default=default.boundary_fraction,
                        help="share of sub-volumes centred near a bone boundary (default: %(default)s)")
    parser.add_argument("--validation-patches", type=int, default=default.validation_patches, help="fixed validation sub-volumes (default: %(default)s)")
    parser.add_argument("--augmentation", type=_augmentation, default=default.augmentation,
                        help=f"'none', or JSON overriding some of {json.dumps(asdict(default.augmentation))}")
    parser.add_argument("--seed", type=int, default=default.seed, help="(default: %(default)s)")
    parser.add_argument("--initial-model", type=Path, default=None,
                        help="fine-tune this .keras model (its card sets patch size, normalisation and spacing)")
    parser.add_argument("--name", default=None, help="model name in its card (default: the output's file name)")
    parser.add_argument("--resume", action="store_true", help="continue the training whose checkpoint is beside OUTPUT, exactly where it stopped")
    parser.add_argument("--overwrite", action="store_true", help="start again even if OUTPUT or its checkpoint exists")
    parser.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", help="no progress bar (epoch lines are still logged)")


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The :class:`TrainingConfig` of parsed :func:`add_arguments` arguments."""
    if len(args.pairs) % 2:
        raise InputError(f"give IMAGE LABELS pairs; {len(args.pairs)} paths is an odd number")
    values = {f.name: getattr(args, f.name) for f in fields(TrainingConfig) if hasattr(args, f.name)}
    values.update(images=args.pairs[0::2], labels=args.pairs[1::2])
    return TrainingConfig(**values).validate()


def command_line(config: TrainingConfig) -> str:
    """The ``kneeboneseg train`` command that reproduces ``config`` (data folders left out of absolute paths)."""
    default = TrainingConfig(images=[], labels=[], output=config.output)
    architecture_default = _fill_from_architecture(replace(default, architecture=config.architecture))
    words = ["kneeboneseg", "train"]
    for image, labels in zip(config.images, config.labels):
        words += [_portable(image), _portable(labels)]
    words += ["-o", _portable(config.output)]
    for f in fields(TrainingConfig):
        value = getattr(config, f.name)
        unchanged = getattr(default if f.name == "architecture" else architecture_default, f.name)
        if f.name in _NOT_OPTIONS or value == unchanged:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, Augmentation):
            changed = {k: v for k, v in asdict(value).items() if v != getattr(default.augmentation, k)}
            words += [flag, "none" if value == Augmentation.none() else json.dumps(changed)]
        elif isinstance(value, dict):
            words += [flag, json.dumps(value)]
        elif isinstance(value, tuple):
            words += [flag, *map(str, value)]
        else:
            words += [flag, "none" if value is None else _portable(value) if isinstance(value, Path) else str(value)]
    return shlex.join(words)


def _portable(path: Path) -> str:
    """A path as a card may record it: relative paths as given, absolute ones by name only."""
    path = Path(path)
    return path.name if path.is_absolute() else str(path)


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() == "true"


def _spacing(text: str) -> float | None:
    return None if text.lower() in ("none", "native", "0") else float(text)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object, e.g. '{\"method\": \"percentile\"}'")
    return value


def _augmentation(text: str) -> Augmentation:
    if text.lower() == "none":
        return Augmentation.none()
    changes = _json_object(text)
    unknown = set(changes) - {f.name for f in fields(Augmentation)}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown augmentation {', '.join(sorted(unknown))}")
    return replace(Augmentation(), **changes)


# ----------------------------------------------------------------------------------------------
# Loss curves, drawn with numpy and written with SimpleITK; VTK's FreeType renders the labels
# (no OpenGL needed, so this works on headless machines).

_TRAINING_COLOR = (31, 119, 180)
_VALIDATION_COLOR = (230, 110, 0)
_AXIS_COLOR = (60, 60, 60)
_GRID_COLOR = (225, 225, 225)


def write_loss_curves(history: list[dict], path, size: tuple[int, int] = (360, 600)) -> Path:
    """Plot training and validation loss per epoch (logarithmic loss axis) as a PNG."""
    import SimpleITK as sitk

    path = Path(path)
    height, width = size
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 72, width - 16, 34, height - 44
    epochs = np.array([entry["epoch"] for entry in history], dtype=float)
    curves = [(np.array([entry[key] for entry in history], dtype=float), color) for key, color in (("loss", _TRAINING_COLOR), ("validation_loss", _VALIDATION_COLOR))]
    values = np.concatenate([c for c, _ in curves])
    low, high = np.log10(np.clip([values.min(), values.max()], 1e-6, None))
    if high - low < 0.1:
        low, high = low - 0.05, high + 0.05
    first, last = epochs.min(), max(epochs.max(), epochs.min() + 1)

    def x_of(epoch):
        return left + (np.asarray(epoch) - first) / (last - first) * (right - left)

    def y_of(loss):
        return bottom - (np.log10(np.clip(loss, 1e-6, None)) - low) / (high - low) * (bottom - top)

    decades = np.arange(np.floor(low), np.ceil(high) + 1)
    ticks = (10.0 ** decades[:, None] * np.array([1.0, 2.0, 5.0])).ravel()
    ticks = ticks[(np.log10(ticks) >= low) & (np.log10(ticks) <= high)]
    if ticks.size < 2:
        ticks = 10.0 ** np.linspace(low, high, 3)
    for tick in ticks:
        row = int(round(y_of(tick)))
        canvas[row, left:right] = _GRID_COLOR
        _paste(canvas, _text(f"{tick:.3g}", _AXIS_COLOR), row, left - 6, anchor="right")
    for epoch in np.unique(np.round(np.linspace(first, last, min(int(last - first) + 1, 7)))):
        column = int(round(x_of(epoch)))
        canvas[bottom : bottom + 5, column] = _AXIS_COLOR
        _paste(canvas, _text(f"{epoch:.0f}", _AXIS_COLOR), bottom + 14, column, anchor="centre")
    canvas[top : bottom + 1, left] = _AXIS_COLOR
    canvas[bottom, left : right + 1] = _AXIS_COLOR
    for losses, color in curves:
        _draw_polyline(canvas, x_of(epochs), y_of(losses), color)
    _paste(canvas, _text("epoch", _AXIS_COLOR), height - 14, (left + right) // 2, anchor="centre")
    _paste(canvas, _text("loss", _AXIS_COLOR, angle=90), (top + bottom) // 2, 14, anchor="centre")
    _paste(canvas, _text("training", _TRAINING_COLOR), 16, left + 40, anchor="centre")
    _paste(canvas, _text("validation", _VALIDATION_COLOR), 16, left + 130, anchor="centre")
    sitk.WriteImage(sitk.GetImageFromArray(canvas, isVector=True), str(path))
    return path


def _draw_polyline(canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, color, radius: int = 1) -> None:
    """Draw line segments through the points (x right, y down), ``2 * radius + 1`` pixels wide."""
    dx, dy = np.diff(xs), np.diff(ys)
    counts = np.ceil(np.maximum(np.abs(dx), np.abs(dy))).astype(int) + 1
    segment = np.repeat(np.arange(dx.size), counts)
    step = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    t = step / np.repeat(np.maximum(counts - 1, 1), counts)
    columns = np.concatenate([xs[:1], xs[segment] + t * dx[segment]]) if dx.size else xs
    rows = np.concatenate([ys[:1], ys[segment] + t * dy[segment]]) if dy.size else ys
    rows, columns = np.round(rows).astype(int), np.round(columns).astype(int)
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            r, c = rows + dr, columns + dc
            inside = (r >= 0) & (r < canvas.shape[0]) & (c >= 0) & (c < canvas.shape[1])
            canvas[r[inside], c[inside]] = color


def _text(text: str, color, size: int = 13, angle: float = 0.0) -> np.ndarray:
    """``text`` rendered by FreeType as an RGBA array (rows top to bottom)."""
    import vtkmodules.vtkRenderingFreeType  # noqa: F401  (registers the FreeType text renderer)
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkRenderingCore import vtkTextProperty, vtkTextRenderer

    style = vtkTextProperty()
    style.SetFontSize(size)
    style.SetColor(*(c / 255 for c in color))
    style.SetOrientation(angle)
    image = vtkImageData()
    vtkTextRenderer().RenderString(style, text, image, [0, 0], 72)
    columns, rows, _ = image.GetDimensions()
    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(rows, columns, 4)[::-1]
    # The image is padded to a power of two; keep the inked part (descenders included).
    inked_rows, inked_columns = np.nonzero(rgba[..., 3].any(axis=1))[0], np.nonzero(rgba[..., 3].any(axis=0))[0]
    if not inked_rows.size:
        return rgba[:1, :1]
    return rgba[inked_rows[0] : inked_rows[-1] + 1, inked_columns[0] : inked_columns[-1] + 1]


def _paste(canvas: np.ndarray, rgba: np.ndarray, row: int, column: int, anchor: str = "centre") -> None:
    """Alpha-blend ``rgba`` onto ``canvas``, vertically centred on ``row``, anchored at ``column``."""
    height, width = rgba.shape[:2]
    top = row - height // 2
    start = {"centre": column - width // 2, "right": column - width}[anchor]
    r0, c0 = max(top, 0), max(start, 0)
    r1, c1 = min(top + height, canvas.shape[0]), min(start + width, canvas.shape[1])
    if r1 <= r0 or c1 <= c0:
        return
    patch = rgba[r0 - top : r1 - top, c0 - start : c1 - start].astype(np.float32)
    alpha = patch[..., 3:] / 255.0
    region = canvas[r0:r1, c0:c1].astype(np.float32)
    canvas[r0:r1, c0:c1] = np.round(region * (1 - alpha) + patch[..., :3] * alpha).astype(np.uint8)
