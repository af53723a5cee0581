"""Training pairs on the model's grid and the crops drawn from them: sub-volumes (3D) or slices of the three planes (2D)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..preprocess.normalization import normalize_intensities
from ..preprocess.resampling import ModelGrid
from .augmentation import Augmentation, augment_intensities, spatial_matrix
from .config import TrainingConfig
from .synthesis import Synthesis, elastic_displacement, synthesize_crop


@dataclass
class TrainingVolume:
    """One training pair on the model's grid: normalised image, bone mask, boundary voxels."""

    image: np.ndarray  # float32 [k, j, i]
    bone: np.ndarray  # uint8 0/1, or float32 share of bone per voxel (soft labels); 0 where not trained on
    boundary: np.ndarray  # flat indices of trained bone voxels that touch background
    record: dict  # what the card says about this pair
    trained: np.ndarray | None = (
        None  # uint8 1 where the loss counts (None: everywhere), when the image reaches past the range
    )


def prepare_volume(
    image, labels, spacing_mm=None, normalization=None, train_range_i=None, name="", soft_labels=False, context_mm=0.0
) -> TrainingVolume:
    """Bring an image and its label map (:class:`~KneeBoneSegLib.volume.Volume`) to the model's grid.

    The image is normalised over the whole scan (as at inference), both are
    cut to ``train_range_i`` (input voxels ``from <= i < to``) before any
    resampling, so no voxel outside the range reaches training, then
    brought to the model's grid as inference brings a scan there
    (:class:`~KneeBoneSegLib.preprocess.resampling.ModelGrid`: upright where
    the scan is oblique, at ``spacing_mm``, a number or one per axis; linear for the
    image, the labels as the share of bone in each voxel, kept from a half,
    or with ``soft_labels`` kept as that share: a coarse grid then loses
    almost nothing of the bone's outline).

    ``context_mm`` keeps the image (never the labels) that far past each
    end of the range, so sub-volumes can reach past it; ``trained`` then
    marks the model-grid voxels that lie wholly inside the range (no label
    beyond it blends into them), and the labels are zero everywhere else.
    """
    if image.array.shape != labels.array.shape:
        raise InputError(
            f"{name}: the image has {image.shape_ijk} voxels but its labels {labels.shape_ijk}; give labels on the image's grid"
        )
    if not np.allclose(image.geometry.ijk_to_lps, labels.geometry.ijk_to_lps, atol=1e-3 * min(image.geometry.spacing)):
        raise InputError(
            f"{name}: the label map does not lie on the image's grid (spacing, origin or direction differ); resample it to the image"
        )
    if np.issubdtype(labels.array.dtype, np.floating):
        raise InputError(
            f"{name}: the labels are a probability map; give a label map or binary mask (labels > 0 are bone)"
        )
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
    # The model's grid as inference builds it (ModelGrid: the card's spacing, upright where the scan is oblique).
    grid = ModelGrid(image.geometry.cropped((0, 0, first)), normalized.shape, spacing_mm)
    if grid.resamples:
        normalized = grid.from_scan(normalized)
        # The share of each model-grid voxel that is bone, kept where it is at least half: nearest-neighbour
        # sampling would take one of two fine voxels on every tie (halving the spacing gives only ties)
        # and shift the labels half a fine voxel off the image.
        bone = grid.from_scan(bone.astype(np.float32))
        bone = np.clip(bone, 0.0, 1.0) if soft_labels else bone >= 0.5
        # A model-grid voxel counts only if smoothing and interpolation drew (almost) nothing from past the range.
        inside = grid.from_scan(inside.astype(np.float32)) >= 0.999
    bone = np.ascontiguousarray(np.where(inside, bone, 0), dtype=np.float32 if soft_labels else np.uint8)
    if not bone.any():
        raise InputError(
            f"{name}: the labels mark no bone (no voxel > 0) in the training range; check the label map and --train-range-i"
        )
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
            if min(volume.bone.shape) < self.patch_size:
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
        return stack_crops([self._patch() for _ in range(size)])

    def _patch(self) -> tuple[np.ndarray, ...]:
        volume = self.volumes[self.rng.integers(len(self.volumes))]
        centre = self._corner(volume) + (self.patch_size - 1) / 2
        coordinates = spatial_matrix(self.augmentation, self.rng) @ self._offsets + centre[:, None]
        shape = (self.patch_size,) * 3
        image = ndimage.map_coordinates(volume.image, coordinates, order=1, mode="nearest", output=np.float32)
        # Soft labels are shares, interpolated as the image is; hard ones stay 0/1.
        bone = ndimage.map_coordinates(
            volume.bone, coordinates, order=1 if volume.bone.dtype == np.float32 else 0, mode="nearest"
        )
        image = augment_intensities(image.reshape(shape), self.augmentation, self.rng, self._unit)
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


def stack_crops(crops) -> tuple[np.ndarray, np.ndarray]:
    """Crops ``(image, bone[, trained])`` as a batch ``(images, targets)``; a crop without ``trained`` counts everywhere."""
    counted = any(len(crop) == 3 for crop in crops)
    images = np.stack([crop[0] for crop in crops])[..., None]
    channels = [crop[1:] if len(crop) == 3 or not counted else (crop[1], np.ones_like(crop[1])) for crop in crops]
    targets = np.stack([np.stack(channel, axis=-1) for channel in channels]).astype(np.float32)
    return images, targets


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
        volume, axis, index, coordinates = self._crop()
        image = self._sample(volume.image, axis, index, coordinates, order=1)
        bone = self._sample(volume.bone, axis, index, coordinates, order=1 if volume.bone.dtype == np.float32 else 0)
        image = augment_intensities(image, self.augmentation, self.rng, self._unit)
        if volume.trained is None:
            return image, bone
        return image, bone, self._sample(volume.trained, axis, index, coordinates, order=0, outside=0)

    def _crop(self):
        """A random crop: ``(volume, plane axis, slice index, the crop's (2, P*P) coordinates in the slice)``."""
        which = self.rng.integers(len(self.volumes))
        volume, trained = self.volumes[which], self._trained[which]
        shape, size = np.asarray(volume.bone.shape), self.patch_size
        if volume.boundary.size and self.rng.random() < self.boundary_fraction:
            voxel = np.unravel_index(volume.boundary[self.rng.integers(volume.boundary.size)], shape)
        elif trained is not None:
            voxel = np.unravel_index(trained[self.rng.integers(trained.size)], shape)
        else:
            voxel = self.rng.integers(0, shape)
        axis = int(self.rng.integers(3))
        in_plane = np.delete(np.asarray(voxel), axis)
        corner = np.clip(
            in_plane - size // 2 + self.rng.integers(-(size // 4), size // 4 + 1, size=2),
            0,
            np.delete(shape, axis) - size,
        )
        coordinates = (
            spatial_matrix(self.augmentation, self.rng, dimensions=2) @ self._offsets
            + (corner + (size - 1) / 2)[:, None]
        )
        return volume, axis, int(voxel[axis]), coordinates

    def _sample(self, array, axis: int, index: int, coordinates, order: int, outside=None) -> np.ndarray:
        """``array``'s slice ``index`` across ``axis`` at ``coordinates``, as a crop (``outside``: the value past its edge, else the nearest)."""
        plane = np.moveaxis(array, axis, 0)[index]
        mode = "nearest" if outside is None else "constant"
        values = ndimage.map_coordinates(plane, coordinates, order=order, mode=mode, cval=outside or 0)
        return values.reshape(self.patch_size, self.patch_size)


class SyntheticSliceSampler(SliceSampler):
    """Draws crops of slices of label maps (:class:`~.synthesis.LabelMap`) with images synthesised for each crop.

    The crops are placed as :class:`SliceSampler` places them, then bent by
    an elastic displacement; the image comes from :func:`~.synthesis.synthesize_crop`
    and goes through ``synthesis.augmentation``'s intensity changes.
    """

    def __init__(self, maps, patch_size: int, boundary_fraction: float, synthesis: Synthesis, seed):
        super().__init__(maps, patch_size, boundary_fraction, synthesis.augmentation, seed)
        self.synthesis = synthesis

    def _patch(self) -> tuple[np.ndarray, np.ndarray]:
        label_map, axis, index, coordinates = self._crop()
        spacing = np.delete(label_map.spacing_mm, axis)
        coordinates = coordinates + elastic_displacement(self.patch_size, spacing, self.synthesis, self.rng)
        labels = self._sample(label_map.labels, axis, index, coordinates, order=0)
        bone = self._sample(
            label_map.bone, axis, index, coordinates, order=1 if label_map.bone.dtype == np.float32 else 0
        )
        depth = self._sample(label_map.bone_depth_mm, axis, index, coordinates, order=1)
        body = self._sample(label_map.body_mm, axis, index, coordinates, order=1)
        image = synthesize_crop(labels, label_map.is_bone, depth, body, spacing, self.synthesis, self.rng)
        return augment_intensities(image, self.augmentation, self.rng, self._unit), bone


class MixedSampler:
    """Real crops and synthetic crops at a set ratio, each crop's source drawn at random.

    Its state is its own generator's and both samplers', so a resumed run
    draws what an uninterrupted one would.
    """

    def __init__(self, real: SliceSampler | None, synthetic: SyntheticSliceSampler, synthetic_fraction: float, seed):
        self.real, self.synthetic = real, synthetic
        self.synthetic_fraction = 1.0 if real is None else float(synthetic_fraction)
        self.rng = np.random.default_rng(seed)

    @property
    def state(self) -> dict:
        return {
            "mix": self.rng.bit_generator.state,
            "synthetic": self.synthetic.state,
            "real": None if self.real is None else self.real.state,
        }

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["mix"]
        self.synthetic.set_state(state["synthetic"])
        if self.real is not None:
            self.real.set_state(state["real"])

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        sources = [self.synthetic if self.rng.random() < self.synthetic_fraction else self.real for _ in range(size)]
        return stack_crops([source._patch() for source in sources])


def samplers(
    volumes, config: "TrainingConfig", patch_size: int, dimensions: int, label_maps=()
) -> tuple[PatchSampler, tuple[np.ndarray, np.ndarray]]:
    """The training sampler for the network's ``dimensions`` and its fixed validation batch.

    With ``label_maps`` (:class:`~.synthesis.LabelMap`), a share
    ``config.synthetic_fraction`` of the crops, of the validation batch too,
    is synthesised from them (real validation crops are unaugmented,
    synthetic ones are what synthesis makes them).
    """
    kind = SliceSampler if dimensions == 2 else PatchSampler
    real = (
        kind(volumes, patch_size, config.boundary_fraction, config.augmentation, seed=config.seed) if volumes else None
    )
    real_validation = (
        kind(volumes, patch_size, config.boundary_fraction, Augmentation.none(), seed=[config.seed, 1])
        if volumes
        else None
    )
    if not label_maps:
        return real, real_validation.batch(config.validation_patches)
    synthetic = SyntheticSliceSampler(
        label_maps, patch_size, config.boundary_fraction, config.synthesis, seed=[config.seed, 2]
    )
    synthetic_validation = SyntheticSliceSampler(
        label_maps, patch_size, config.boundary_fraction, config.synthesis, seed=[config.seed, 3]
    )
    sampler = MixedSampler(real, synthetic, config.synthetic_fraction, seed=[config.seed, 4])
    validation = MixedSampler(
        real_validation, synthetic_validation, config.synthetic_fraction, seed=[config.seed, 5]
    ).batch(config.validation_patches)
    return sampler, validation
