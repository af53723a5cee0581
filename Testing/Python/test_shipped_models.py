"""The models shipped in Resources/Models: they load, their cards say how they were made, and they segment bone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from KneeBoneSegLib.anatomy import BONES
from KneeBoneSegLib.metrics import dice
from KneeBoneSegLib.models import SHIPPED_MODEL, load_model
from KneeBoneSegLib.pipeline import SegmentOptions, segment
from KneeBoneSegLib.volume import Volume

MODELS = Path(__file__).resolve().parents[2] / "Resources" / "Models"
FOLDS = tuple(f"{Path(SHIPPED_MODEL).stem}-fold-{side}.onnx" for side in ("right", "left"))


def test_the_shipped_model_loads_and_its_card_says_how_it_was_trained():
    model = load_model(MODELS / SHIPPED_MODEL)
    card = model.card
    assert card.heldout is None and card.spacing_mm == [0.7, 0.7, 0.7] and card.patch_size == 64 and card.projections == 1
    assert card.training["command"].startswith("kneeboneseg train knee_mri.nrrd knee_bones_labels.nrrd")
    assert card.training["data"][0]["image"] == "knee_mri.nrrd" and card.training["steps"] > 0
    assert (MODELS / SHIPPED_MODEL).stat().st_size < 20 * 2**20


def test_the_fold_models_leave_out_opposite_sides_with_a_gap():
    ranges = [load_model(MODELS / name).card.heldout for name in FOLDS]
    assert all(r["axis"] == "i" for r in ranges)
    right, left = ranges  # right: trained on low i, held out above; left: the reverse
    assert right["to"] == 512 and left["from"] == 0
    overlap = left["to"] - right["from"]
    assert overlap >= 2 * 64  # each fold's scored half starts 64 voxels (22.5 mm) past what it trained on


@pytest.fixture(scope="module")
def sample_scan(sample_dir):
    from KneeBoneSegLib.io import read_volume

    return read_volume(sample_dir / "knee_mri.nrrd"), read_volume(sample_dir / "knee_bones_labels.nrrd")


#: How far each bone's Dice may stray from the figure in the shipped model's card. The card's
#: figures (bench/heldout_table.py, probabilities stitched) come from the same computation as this
#: test's: each fold predicts the whole scan and keeps its held-out side of the split.
CARD_TOLERANCE = 1e-3


def test_the_fold_models_reproduce_their_cards_held_out_figures(sample_scan):
    from KneeBoneSegLib.pipeline import postprocess, predict_projection_maps
    from KneeBoneSegLib.projections import fuse_probabilities
    from KneeBoneSegLib.resampling import resample_to_shape

    image, truth = sample_scan
    card = load_model(MODELS / SHIPPED_MODEL).card.quality["heldout"]
    assert card["pipeline"] == "default pipeline"
    right, left = (load_model(MODELS / name) for name in FOLDS)
    split = (right.card.heldout["from"] + left.card.heldout["to"]) // 2  # where the card's stitching cut
    assert f"at {split}" in card["protocol"]
    probability = np.empty(image.array.shape, np.float32)
    for model, side in ((left, slice(0, split)), (right, slice(split, None))):
        fused = fuse_probabilities(predict_projection_maps(image, model, SegmentOptions()), "or")
        probability[..., side] = resample_to_shape(fused, image.array.shape, order=1)[..., side]
    options = SegmentOptions(surfaces=False)
    result = postprocess(Volume(probability, image.geometry), options)
    assert result.report["missing"] == []
    # Each label is the bone the ground truth calls by that name, and scores as the card says.
    scores = {bone.key: dice(result.labels == bone.label, truth.array == bone.label) for bone in BONES}
    figures = {key: card["metrics"][key]["dice"] for key in scores}
    assert all(abs(scores[key] - figures[key]) <= CARD_TOLERANCE for key in scores), (scores, figures)
