"""The U-Net variants ``kneeboneseg train --architecture`` builds, and how each is trained and run.

Kept apart from :mod:`.network` so that reading them needs no Keras (the
command line builds its parser from them).

- ``context`` (tried as the shipped models' successor, not shipped: held out it
  scored below ``compact``, ``bench/results/heldout_context.txt``): 8-16-32-64 filters down, a 128-filter
  bridge, on 64^3 sub-volumes at 0.7 mm (45 mm). Four poolings give each
  prediction a receptive field wider than the sub-volume, so it sees bone
  edges from deep inside the femur; few filters at full resolution keep its
  cost per voxel about a quarter of ``compact``'s. One projection with
  overlapping tiles (stride 48) is about 2.4 evaluations per voxel.
- ``compact`` (the shipped models): 16-32-64, bridge 128, on 32^3
  sub-volumes (22 mm), three projections.
- ``paper``: the paper's network, 64-128-256-512 and a 1024 bridge, 64^3
  sub-volumes at stride 32 on the scan's own grid, three projections.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """A network (``base_filters``, ``depth``: see :func:`.network.build_unet`) and its defaults."""

    base_filters: int
    depth: int
    patch_size: int  # sub-volume edge in voxels, for training and inference
    stride: int  # inference step between sub-volumes, recorded in the card
    batch_size: int  # training sub-volumes per step
    epochs: int  # of 100 steps: what the architecture needs on the sample scan
    projections: int  # projections predicted at inference, recorded in the card

    @property
    def network(self) -> dict:
        return {"base_filters": self.base_filters, "depth": self.depth}


ARCHITECTURES = {
    "context": Architecture(base_filters=8, depth=4, patch_size=64, stride=48, batch_size=2, epochs=15, projections=1),
    "compact": Architecture(base_filters=16, depth=3, patch_size=32, stride=24, batch_size=8, epochs=25, projections=3),
    "paper": Architecture(base_filters=64, depth=4, patch_size=64, stride=32, batch_size=2, epochs=25, projections=3),
}
DEFAULT_ARCHITECTURE = "compact"
#: The settings an architecture gives a training run that does not set them.
PRESET_SETTINGS = ("base_filters", "depth", "patch_size", "stride", "batch_size", "epochs")
