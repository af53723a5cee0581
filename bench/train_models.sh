#!/usr/bin/env bash
# Train the shipped model and its two held-out fold models on the annotated sample scan.
#
#   KNEEBONESEG_SAMPLE_DIR=path/to/kneebones3dify [ARCHITECTURE=compact] bench/train_models.sh [MODEL_FOLDER [WHICH...]]
#
# WHICH is any of fold-right, fold-left, shipped (default: all three, one after the other;
# two shells may train two of them at once). The models are kneeboneseg-ARCHITECTURE*.keras
# (and .onnx): the shipped ones with the default, compact (32^3 sub-volumes at 0.7 mm, 2500
# steps of 8, BCE + Dice, Adam 1e-3, full augmentation, seed 0); ARCHITECTURE=slices gives the
# whole-knee 2D network with the recipe bench/coarse_experiments.py chose (mirroring and gamma
# only, fold crops reaching half their edge past the training range, at most 24 minutes). A run
# resumes where it stopped if its checkpoint is there. Keras runs on its torch backend where PyTorch is
# installed: on the 2-core CPU it trained twice as fast as on TensorFlow
# (bench/results/training_backends.txt).
#
# The folds split the scan along its first image axis i (left-right) at i = SPLIT; each trains
# on one side up to GAP voxels from SPLIT, and is evaluated on the other side of SPLIT
# (bench/heldout_table.py), so 64 voxels (22.5 mm) separate what it trained on from what it
# is scored on. A fold never sees the image beyond its training range.
set -euo pipefail
data="${KNEEBONESEG_SAMPLE_DIR:?set KNEEBONESEG_SAMPLE_DIR to the folder holding knee_mri.nrrd}"
models="${1:-Resources/Models}"
shift || true
which=("${@:-fold-right fold-left shipped}")
SPLIT=236  # the middle of the bones along i (they span i = 108..364)
GAP=64
architecture="${ARCHITECTURE:-compact}"
NAME="kneeboneseg-$architecture"
pair=("$data/knee_mri.nrrd" "$data/knee_bones_labels.nrrd")
recipe=() fold=()
if [[ "$architecture" == slices ]]; then
  recipe=(--augmentation '{"rotation_deg": 0, "scale": 0, "bias_field": 0, "contrast": 0, "noise": 0}' --max-minutes 24)
  fold=(--crops-past-range true)
fi
if python -c "import torch" 2>/dev/null; then export KERAS_BACKEND="${KERAS_BACKEND:-torch}"; fi
train() {
  local output="$1"; shift
  local again=(--overwrite)
  [[ -f "${output%.keras}.checkpoint.npz" ]] && again=(--resume)
  kneeboneseg -v train "${pair[@]}" --architecture "$architecture" --no-progress-bar "${again[@]}" ${recipe[@]+"${recipe[@]}"} "$@" -o "$output"
}
for model in ${which[*]}; do
  case "$model" in
    fold-right) train "$models/$NAME-fold-right.keras" --train-range-i 0 $((SPLIT - GAP)) ${fold[@]+"${fold[@]}"} ;;
    fold-left) train "$models/$NAME-fold-left.keras" --train-range-i $((SPLIT + GAP)) 512 ${fold[@]+"${fold[@]}"} ;;
    shipped) train "$models/$NAME.keras" ;;
    *) echo "unknown model $model (fold-right, fold-left or shipped)" >&2; exit 2 ;;
  esac
done
