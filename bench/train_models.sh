#!/usr/bin/env bash
# Train the shipped model and its two held-out fold models on the annotated sample scan.
#
#   KNEEBONESEG_SAMPLE_DIR=path/to/kneebones3dify bench/train_models.sh [MODEL_FOLDER]
#
# Each run uses the default recipe of `kneeboneseg train` (compact U-Net, 32^3 sub-volumes at
# 0.7 mm, 2500 steps of 8, BCE + Dice, Adam 1e-3, full augmentation, seed 0): about 20 minutes
# on 2 CPU cores. The folds split the scan along its first image axis i (left-right) at
# i = SPLIT; each trains on one side up to GAP voxels from SPLIT, and is evaluated on the other
# side of SPLIT (bench/heldout_table.py), so 64 voxels (22.5 mm, more than a 32^3 sub-volume at
# 0.7 mm, which bounds what one prediction sees) separate what it trained on from what it is
# scored on.
set -euo pipefail
data="${KNEEBONESEG_SAMPLE_DIR:?set KNEEBONESEG_SAMPLE_DIR to the folder holding knee_mri.nrrd}"
models="${1:-Resources/Models}"
SPLIT=236  # the middle of the bones along i (they span i = 108..364)
GAP=64
pair=("$data/knee_mri.nrrd" "$data/knee_bones_labels.nrrd")
train() { kneeboneseg -v train "${pair[@]}" --no-progress-bar --overwrite "$@"; }

train --train-range-i 0 $((SPLIT - GAP)) -o "$models/kneeboneseg-compact-fold-right.keras"
train --train-range-i $((SPLIT + GAP)) 512 -o "$models/kneeboneseg-compact-fold-left.keras"
train -o "$models/kneeboneseg-compact.keras"
