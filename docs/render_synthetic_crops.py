"""Draw synthetic training crops beside real ones, the bone's outline on each (docs/images/synthetic_crops.png).

    python docs/render_synthetic_crops.py SAMPLE_DIR OTHER_KNEES_DIR docs/images/synthetic_crops.png

The first row holds crops of the annotated low-field scan as the 2D recipe
draws them; the others, crops synthesised from the three other knees' label
maps (KneeBoneSegLib.training.synthesis), seeded: two rows by the first
rows' generator, two with every decoy in every crop (marrow-bright tissue,
dark lines between tissues, cartilage and menisci darker than marrow).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from KneeBoneSegLib.io.images import read_mask, read_volume  # noqa: E402
from KneeBoneSegLib.training.augmentation import Augmentation  # noqa: E402
from KneeBoneSegLib.training.data import SliceSampler, SyntheticSliceSampler, prepare_volume  # noqa: E402
from KneeBoneSegLib.training.synthesis import Synthesis, prepare_label_map  # noqa: E402

MAPS = (
    ("mskt_dess_a_labels.nrrd", (5, 6, 7)),
    ("mskt_dess_b_labels.nrrd", (5, 6, 7)),
    ("skm_pd_labels.nrrd", (1, 2, 3)),
)
COLUMNS = 10


def main(sample: Path, other_knees: Path, output: Path) -> None:
    real = prepare_volume(
        read_volume(sample / "knee_mri.nrrd"), read_mask(sample / "knee_bones_labels.nrrd"), 0.7, soft_labels=True
    )
    maps = [prepare_label_map(read_mask(other_knees / name), bones, 0.7, name=name) for name, bones in MAPS]
    rows = [("real (low-field sample)", SliceSampler([real], 64, 0.5, Augmentation.none(), seed=0).batch(COLUMNS))]
    synthetic = SyntheticSliceSampler(maps, 64, 0.5, Synthesis(), seed=0)
    rows += [("synthetic (other knees)", synthetic.batch(COLUMNS)) for _ in range(2)]
    decoys = SyntheticSliceSampler(
        maps, 64, 0.5, Synthesis(marrow_like_tissue=1.0, tissue_lines=1.0, joint_darker=1.0), seed=0
    )
    rows += [("synthetic with decoys", decoys.batch(COLUMNS)) for _ in range(2)]
    figure, axes = plt.subplots(len(rows), COLUMNS, figsize=(COLUMNS * 1.3, len(rows) * 1.45))
    for (title, (images, targets)), line in zip(rows, axes):
        line[0].set_title(title, fontsize=8, loc="left")
        for axis, image, target in zip(line, images[..., 0], targets[..., 0]):
            axis.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
            axis.contour(target, levels=[0.5], colors="orange", linewidths=0.6)
            axis.axis("off")
    figure.tight_layout(pad=0.3)
    figure.savefig(output, dpi=70)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
