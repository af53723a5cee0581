"""The U-Net variants ``kneeboneseg train --architecture`` builds, and how each is trained and run.

Kept apart from :mod:`.unet` so that reading them needs no Keras (the
command line builds its parser from them).

- ``slices`` (the whole-knee network, chosen by ``bench/coarse_experiments.py``):
  a 2D U-Net, 16-32-64-128 filters, a 256 bridge and batch normalisation,
  trained on 64^2 crops of slices of all three planes at 0.7 mm, on soft
  targets. It predicts every slice whole (whole slices in one pass, no
  tiles), once for each plane: the three projections are its axial,
  coronal and sagittal slices.

- ``coarse`` (the whole-knee experiments, ``bench/coarse_experiments.py``):
  16-32-64-128 filters, a 256 bridge and instance normalisation, trained on
  soft targets (the share of bone per voxel) at a coarse spacing (1.4 mm by
  the experiments' recipe): its receptive field spans well over 60 mm, and
  a 32^3 sub-volume at 1.4 mm sees 45 mm. One projection, stride 16.
- ``compact`` (the shipped models): 16-32-64, bridge 128, on 32^3
  sub-volumes (22 mm), three projections.
- ``paper``: the paper's network, 64-128-256-512 and a 1024 bridge, 64^3
  sub-volumes at stride 32 on the scan's own grid, three projections.

A ``context`` preset (8-16-32-64 filters on 64^3 sub-volumes) was tried and
dropped: held out it scored below ``compact`` (``docs/model.md``,
``bench/results/heldout_context.txt``, made at commit fcd5289 and before).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Normalisation after each convolution (see :func:`.unet.build_unet`): the paper's batch norm, or
#: instance norm, which does not depend on the batch and so suits the small batches a CPU trains.
NORMALIZATIONS = ("batch", "instance")


@dataclass(frozen=True)
class Architecture:
    """A network (``base_filters``, ``depth``: see :func:`.unet.build_unet`) and its defaults."""

    base_filters: int
    depth: int
    patch_size: int  # sub-volume edge in voxels, for training and inference
    stride: int  # inference step between sub-volumes, recorded in the card
    batch_size: int  # training sub-volumes per step
    epochs: int  # of 100 steps: what the architecture needs on the sample scan
    projections: int  # projections predicted at inference, recorded in the card
    norm_layer: str = "batch"  # normalisation after each convolution (NORMALIZATIONS)
    soft_labels: bool = False  # train on the share of bone per voxel rather than on bone / not bone
    dimensions: int = 3  # 3: sub-volumes; 2: slices (patch_size is then the training crop's edge)
    fusion: str | None = None  # the projections' fusion the card names (None: or, the paper's rule)


ARCHITECTURES = {
    "slices": Architecture(
        base_filters=16,
        depth=4,
        patch_size=64,
        stride=64,
        batch_size=16,
        epochs=40,
        projections=3,
        soft_labels=True,
        dimensions=2,
        fusion="vote",
    ),
    "coarse": Architecture(
        base_filters=16,
        depth=4,
        patch_size=32,
        stride=16,
        batch_size=4,
        epochs=10,
        projections=1,
        norm_layer="instance",
        soft_labels=True,
    ),
    "compact": Architecture(base_filters=16, depth=3, patch_size=32, stride=24, batch_size=8, epochs=25, projections=3),
    "paper": Architecture(base_filters=64, depth=4, patch_size=64, stride=32, batch_size=2, epochs=25, projections=3),
}
DEFAULT_ARCHITECTURE = "compact"
#: The settings an architecture gives a training run that does not set them.
PRESET_SETTINGS = ("base_filters", "depth", "patch_size", "stride", "batch_size", "epochs", "norm_layer", "soft_labels")
