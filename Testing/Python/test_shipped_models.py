"""The models shipped in Resources/Models: they load, their cards say how they were made, and they segment bone."""

from __future__ import annotations

from pathlib import Path

import pytest

from KneeBoneSegLib.metrics import dice
from KneeBoneSegLib.models import SHIPPED_MODEL, load_model
from KneeBoneSegLib.pipeline import SegmentOptions, segment
from KneeBoneSegLib.volume import Volume

MODELS = Path(__file__).resolve().parents[2] / "Resources" / "Models"
FOLDS = ("kneeboneseg-compact-fold-right.onnx", "kneeboneseg-compact-fold-left.onnx")


def test_the_shipped_model_loads_and_its_card_says_how_it_was_trained():
    model = load_model(MODELS / SHIPPED_MODEL)
    card = model.card
    assert card.heldout is None and card.spacing_mm == [0.7, 0.7, 0.7] and card.patch_size == 32
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


def test_each_fold_model_segments_bone_on_the_side_it_never_trained_on(sample_scan):
    image, truth = sample_scan
    models = [load_model(MODELS / name) for name in FOLDS]
    right, left = (model.card.heldout for model in models)
    split = (right["from"] + left["to"]) // 2  # the middle of the range both folds held out
    # 128 voxels (45 mm) of each model's held-out side next to the split, where the bones are.
    for model, start in zip(models, (split, split - 128)):
        box = (slice(None), slice(100, 420), slice(start, start + 128))
        crop = Volume(image.array[box], image.geometry.cropped((0, 100, start)))
        result = segment(crop, model, SegmentOptions(surfaces=False))  # the default pipeline
        assert dice(result.labels > 0, truth.array[box] > 0) > 0.9, model.card.name
