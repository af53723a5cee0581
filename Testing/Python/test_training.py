"""Training smoke tests: a few steps of a tiny U-Net on a small crop; the sampler; the held-out split; resume."""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_ENV, knee_phantom

pytest.importorskip("keras", reason="training needs Keras: pip install kneeboneseg[train]")

from KneeBoneSegLib.errors import Cancelled, InputError
from KneeBoneSegLib.io.images import read_mask, read_volume, write_volume
from KneeBoneSegLib.network.models import file_sha256, load_model
from KneeBoneSegLib.preprocess.resampling import grid_shape_for_spacing
from KneeBoneSegLib.training.arguments import add_arguments, command_line, config_from_args
from KneeBoneSegLib.training.augmentation import Augmentation
from KneeBoneSegLib.training.config import TrainingConfig
from KneeBoneSegLib.training.data import PatchSampler, SliceSampler, TrainingVolume, heldout_range, prepare_volume
from KneeBoneSegLib.training.loop import bone_loss, train
from KneeBoneSegLib.training.plot import TRAINING_COLOUR, VALIDATION_COLOUR
from KneeBoneSegLib.volume import Geometry, Volume

CROP = 64  # voxels of the sample scan around the patella: bone, cartilage, soft tissue and femur


@pytest.fixture(scope="module")
def training_pair(tmp_path_factory):
    """An image + label-map pair on disk: a 64^3 crop of the sample scan when it is available, else the phantom."""
    folder = tmp_path_factory.mktemp("training_pair")
    sample = os.environ.get(SAMPLE_ENV)
    if sample and (Path(sample) / "knee_mri.nrrd").is_file():
        image, labels = (
            read_volume(Path(sample) / "knee_mri.nrrd"),
            read_volume(Path(sample) / "knee_bones_labels.nrrd"),
        )
        centre = np.round(np.mean(np.nonzero(labels.array == 3), axis=1)).astype(int)
        start = np.clip(centre - CROP // 2, 0, np.array(labels.array.shape) - CROP)
        box = tuple(slice(s, s + CROP) for s in start)
        geometry = labels.geometry.cropped(start)
        image, labels = Volume(image.array[box], geometry), Volume(labels.array[box], geometry)
    else:
        array, label_array, geometry = knee_phantom()
        image, labels = Volume(array, geometry), Volume(label_array, geometry)
    image_path, labels_path = folder / "image.nrrd", folder / "labels.nrrd"
    write_volume(image, image_path)
    write_volume(labels, labels_path)
    # Train at twice the scan's voxel size, as the compact model does (0.35 -> 0.7 mm).
    return image_path, labels_path, 2 * max(image.geometry.spacing)


def _tiny_config(training_pair, output: Path, **changes) -> TrainingConfig:
    image_path, labels_path, spacing_mm = training_pair
    config = TrainingConfig(
        images=[image_path],
        labels=[labels_path],
        output=output,
        base_filters=4,
        depth=2,
        patch_size=16,
        stride=8,
        spacing_mm=spacing_mm,
        epochs=2,
        steps_per_epoch=3,
        batch_size=2,
        learning_rate=3e-3,
        dice_weight=0.0,
        validation_patches=4,
        progress_bar=False,
    )
    return replace(config, **changes)


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_a_loadable_model_with_card_and_curves(training_pair, tmp_path):
    output = tmp_path / "tiny.keras"
    result = train(_tiny_config(training_pair, output, epochs=6, steps_per_epoch=5))

    losses = [entry["loss"] for entry in result.history]
    validation_losses = [entry["validation_loss"] for entry in result.history]
    assert len(losses) == 6 and result.steps == 30
    assert losses[-1] < 0.7 * losses[0], losses
    # Batch-norm running statistics lag in a run this short, so the (inference-mode) validation loss falls
    # slower and less steadily; the model file keeps the best epoch.
    assert min(validation_losses) < validation_losses[0] - 0.05, validation_losses

    model = load_model(output)
    card = model.card
    assert card.patch_size == 16 and card.architecture == {"base_filters": 4, "depth": 2}
    assert card.spacing_mm == [training_pair[2]] * 3
    assert card.heldout is None
    training = card.training
    assert training["steps"] == 30 and len(training["history"]) == 6
    assert training["best_validation_loss"] == min(validation_losses)
    assert training["best_epoch"] == 1 + validation_losses.index(min(validation_losses))
    assert training["data"][0]["image"] == "image.nrrd" and len(training["data"][0]["image_sha256"]) == 64
    assert training["command"].startswith("kneeboneseg train image.nrrd labels.nrrd -o tiny.keras")
    assert training["augmentation"]["projections"] is True

    # The saved file holds the best epoch's weights: on the run's validation sub-volumes it scores the best loss.
    volume = prepare_volume(
        read_volume(training_pair[0]), read_volume(training_pair[1]), training_pair[2], card.normalization
    )
    images, bone = PatchSampler([volume], 16, 0.5, Augmentation.none(), seed=[0, 1]).batch(4)
    probability = np.clip(np.asarray(model.network.predict_on_batch(images), np.float64), 1e-7, 1 - 1e-7)
    saved_loss = -np.mean(bone * np.log(probability) + (1 - bone) * np.log(1 - probability))
    assert saved_loss == pytest.approx(min(validation_losses), rel=1e-3)

    # Beside it, the same network as ONNX, which segmenting runs without Keras; the card records the export.
    exported = load_model(output.with_suffix(".onnx"), engine="onnxruntime")
    assert exported.card.export["onnx"]["onnx_sha256"] == file_sha256(output.with_suffix(".onnx"))
    np.testing.assert_allclose(
        exported.network.predict_on_batch(images), model.network.predict_on_batch(images), atol=1e-4
    )

    curves = sitk.GetArrayFromImage(sitk.ReadImage(str(output.with_suffix(".loss.png"))))[..., :3].astype(int)
    assert curves.shape == (360, 600, 3)
    for colour in TRAINING_COLOUR, VALIDATION_COLOUR:  # training and validation curves are drawn
        assert np.count_nonzero(np.abs(curves - colour).max(axis=-1) <= 30) > 200


@pytest.mark.slow
def test_a_resumed_run_continues_exactly_where_it_stopped(training_pair, tmp_path):
    uninterrupted = train(_tiny_config(training_pair, tmp_path / "whole.keras"))

    def stop_after_four_steps(stage, fraction):
        if fraction >= 4 / 6:  # in the middle of the second epoch
            raise Cancelled("stopped by the user")

    interrupted = _tiny_config(training_pair, tmp_path / "parts.keras")
    with pytest.raises(Cancelled, match="step 4 of 6"):
        train(interrupted, progress=stop_after_four_steps)
    resumed = train(replace(interrupted, resume=True))

    assert resumed.steps == uninterrupted.steps == 6
    assert [e["loss"] for e in resumed.history] == [e["loss"] for e in uninterrupted.history]
    for got, expected in zip(resumed.network.get_weights(), uninterrupted.network.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    saved = load_model(tmp_path / "parts.keras").network.network.get_weights()
    for got, expected in zip(saved, load_model(tmp_path / "whole.keras").network.network.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_refuses_other_settings_and_a_new_run_refuses_to_overwrite(training_pair, tmp_path):
    config = _tiny_config(training_pair, tmp_path / "model.keras", epochs=1, steps_per_epoch=1)
    train(config)
    with pytest.raises(InputError, match="learning_rate"):
        train(replace(config, learning_rate=1e-2, resume=True))
    with pytest.raises(InputError, match="--resume"):
        train(config)


def test_sub_volumes_keep_image_and_labels_aligned_and_boundary_sampling_finds_boundaries():
    array, labels, geometry = knee_phantom()
    volume = prepare_volume(Volume(array, geometry), Volume(labels, geometry))
    spatial_only = replace(Augmentation.none(), projections=True, flips=True, rotation_deg=15.0, scale=0.1)
    images, bone = PatchSampler([volume], 24, 0.5, spatial_only, seed=1).batch(8)
    # The phantom's bone is its bright part: the rotated, flipped, zoomed labels still cover it.
    agreement = np.mean((images > 0.5) == (bone > 0))
    assert agreement > 0.97

    _, at_boundaries = PatchSampler([volume], 24, 1.0, Augmentation.none(), seed=2).batch(16)
    bone_share = at_boundaries.mean(axis=(1, 2, 3, 4))
    assert np.all((bone_share > 0) & (bone_share < 1))

    noisy, _ = PatchSampler([volume], 24, 0.5, Augmentation(), seed=1).batch(8)
    assert not np.allclose(noisy, images)  # intensity augmentation changes the same sub-volumes


def test_sampler_state_replays_the_same_sub_volumes():
    array, labels, geometry = knee_phantom()
    volume = prepare_volume(Volume(array, geometry), Volume(labels, geometry))
    sampler = PatchSampler([volume], 16, 0.5, Augmentation(), seed=3)
    sampler.batch(2)
    state = sampler.state
    first = sampler.batch(2)
    sampler.set_state(state)
    again = sampler.batch(2)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def test_no_held_out_voxel_reaches_training():
    shape = (32, 32, 64)
    image = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)
    image[8:24, 8:24, 8:24], labels[8:24, 8:24, 8:24] = 1000.0, 1  # a bone in the trained part (i < 32)
    image[:, :, 32:], labels[:, :, 32:] = 100000.0, 2  # the held-out half: all bright, all bone
    geometry = Geometry((0.5, 0.5, 0.5), (0.0, 0.0, 0.0))

    volume = prepare_volume(Volume(image, geometry), Volume(labels, geometry), spacing_mm=1.0, train_range_i=(0, 32))
    assert volume.image.shape == (16, 16, 16)
    # Normalised over the whole scan the held-out half is 1.0 and the trained bone 0.01; smoothing
    # before cutting would blend some of the held-out half into the last voxels.
    assert volume.image.max() < 0.02
    assert volume.bone.sum() == 8**3
    assert heldout_range((0, 32), 64) == {"axis": "i", "from": 32, "to": 64}
    assert heldout_range((40, 64), 64) == {"axis": "i", "from": 0, "to": 40}
    assert heldout_range((0, 64), 64) is None
    with pytest.raises(InputError, match="one slab"):
        heldout_range((10, 50), 64)


def test_crops_past_the_range_see_the_image_there_but_never_its_labels():
    shape = (32, 32, 64)
    image = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)
    image[8:24, 8:24, 8:36], labels[8:24, 8:24, 8:36] = 1000.0, 1  # a bone that crosses the range's end (i = 32)
    image[:, :, 40:], labels[:, :, 40:] = 100000.0, 2  # past the range: all bright, all bone
    geometry = Geometry((0.5, 0.5, 0.5), (0.0, 0.0, 0.0))

    volume = prepare_volume(
        Volume(image, geometry), Volume(labels, geometry), spacing_mm=1.0, train_range_i=(0, 32), context_mm=8.0
    )
    assert volume.image.shape == (16, 16, 24) and volume.record["image_range_i"] == [0, 48]
    assert volume.image[:, :, 21:].min() > 0.9  # the bright image past the range is there to be seen
    trained_i = np.flatnonzero(volume.trained.any(axis=(0, 1)))
    assert trained_i[0] == 0 and 13 <= trained_i[-1] < 16  # inside the range, less what smoothing blends across its end
    assert not volume.bone[volume.trained == 0].any()  # no label past the range is kept
    assert np.all(np.unravel_index(volume.boundary, volume.bone.shape)[2] <= trained_i[-1])

    images, targets = PatchSampler([volume], 16, 0.5, Augmentation(), seed=4).batch(8)
    assert targets.shape == (8, 16, 16, 16, 2)
    counted = targets[..., 1]
    assert counted.mean() >= 0.5 and (counted == 0).any()  # each crop has a trained half; some reach past it
    assert not targets[..., 0][counted == 0].any()

    # The loss counts only the trained voxels: labels elsewhere change nothing, labels there do.
    loss = bone_loss(dice_weight=1.0)
    prediction = np.where(targets[..., :1] > 0.5, 0.9, 0.1).astype(np.float32)  # right where counted
    value = float(loss(targets, prediction))
    elsewhere, there = targets.copy(), targets.copy()
    elsewhere[..., 0] = np.where(counted == 0, 1.0, targets[..., 0])
    there[..., 0] = np.where(counted == 1, 1.0 - targets[..., 0], targets[..., 0])
    assert float(loss(elsewhere, prediction)) == pytest.approx(value, rel=1e-6)
    assert float(loss(there, prediction)) > value + 0.1


def test_labels_reach_the_coarse_grid_where_the_bone_is_not_half_a_fine_voxel_off():
    # A bone box whose faces fall in the middle of coarse voxels (odd fine indices at half the resolution):
    # the coarse mask must keep the box's centre, on every axis.
    shape = (40, 40, 40)
    labels = np.zeros(shape, np.uint8)
    labels[11:31, 9:29, 13:33] = 1
    image = np.where(labels > 0, 1000.0, 100.0).astype(np.float32)
    geometry = Geometry((0.35, 0.35, 0.35), (0.0, 0.0, 0.0))
    volume = prepare_volume(Volume(image, geometry), Volume(labels, geometry), spacing_mm=0.7)
    fine_centre_mm = (np.mean(np.nonzero(labels), axis=1) + 0.5) * 0.35
    coarse_centre_mm = (np.mean(np.nonzero(volume.bone), axis=1) + 0.5) * 0.7
    np.testing.assert_allclose(coarse_centre_mm, fine_centre_mm, atol=0.01)
    assert abs(int(volume.bone.sum()) - labels.sum() / 8) <= 0.15 * labels.sum() / 8


@pytest.mark.slow
def test_fine_tuning_uses_each_axis_spacing_of_the_models_card(training_pair, tmp_path):
    from KneeBoneSegLib.network.models import ModelCard, save_model
    from KneeBoneSegLib.network.unet import build_unet

    spacing = [0.7, 0.7, 1.05]  # a model trained on anisotropic voxels
    start = save_model(
        build_unet(16, 4, 2), ModelCard(patch_size=16, stride=8, spacing_mm=spacing), tmp_path / "start.keras"
    )
    result = train(
        _tiny_config(
            training_pair, tmp_path / "tuned.keras", initial_model=start, spacing_mm=None, epochs=1, steps_per_epoch=1
        )
    )
    image = read_volume(training_pair[0])
    expected_kji = grid_shape_for_spacing(image.array.shape, image.geometry.spacing, spacing)
    assert result.card.spacing_mm == spacing
    assert result.card.training["data"][0]["model_grid_ijk"] == list(expected_kji[::-1])


def test_the_card_command_line_rebuilds_the_same_configuration():
    config = TrainingConfig(
        images=[Path("a.nrrd"), Path("c.nii.gz")],
        labels=[Path("b.nrrd"), Path("d.seg.nrrd")],
        output=Path("models/knee.keras"),
        base_filters=12,
        spacing_mm=None,
        train_range_i=(0, 220),
        dice_weight=0.5,
        crops_past_range=True,
        augmentation=replace(Augmentation(), rotation_deg=5.0, flips=False),
        normalization={"method": "minmax"},
    ).validate()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = shlex.split(command_line(config))
    assert words[:2] == ["kneeboneseg", "train"]
    rebuilt = config_from_args(parser.parse_args(words[2:]))
    assert rebuilt == config
    with pytest.raises(InputError, match="odd"):
        config_from_args(parser.parse_args(["a.nrrd", "b.nrrd", "c.nrrd", "-o", "m.keras"]))


def test_an_architecture_gives_the_settings_a_run_leaves_unset():
    from KneeBoneSegLib.network.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE

    for name in ARCHITECTURES:
        config = TrainingConfig(
            images=[Path("a.nrrd")], labels=[Path("b.nrrd")], output=Path("m.keras"), architecture=name
        ).validate()
        preset = ARCHITECTURES[name]
        assert (
            config.base_filters,
            config.depth,
            config.patch_size,
            config.stride,
            config.batch_size,
            config.epochs,
        ) == (preset.base_filters, preset.depth, preset.patch_size, preset.stride, preset.batch_size, preset.epochs)
    assert (
        TrainingConfig(images=[], labels=[], output=Path("m.keras")).architecture == DEFAULT_ARCHITECTURE == "compact"
    )  # the shipped models' recipe
    paper = TrainingConfig(
        images=[Path("a.nrrd")], labels=[Path("b.nrrd")], output=Path("m.keras"), architecture="paper", patch_size=32
    ).validate()
    assert (paper.base_filters, paper.depth, paper.patch_size, paper.stride) == (
        64,
        4,
        32,
        ARCHITECTURES["paper"].stride,
    )
    words = shlex.split(command_line(paper))
    assert words[words.index("--architecture") + 1] == "paper" and words[words.index("--patch-size") + 1] == "32"
    assert "--base-filters" not in words and "--stride" not in words  # the architecture's own values need no option


@pytest.mark.slow
def test_the_coarse_recipe_trains_on_soft_targets_with_instance_norm_resumes_and_exports(training_pair, tmp_path):
    """The whole-knee experiments' recipe (architecture ``coarse``) on a crop: few steps, the full path."""
    import onnxruntime

    coarse = partial(
        _tiny_config,
        training_pair,
        architecture="coarse",
        norm_layer=None,
        soft_labels=None,
        epochs=3,
        learning_rate=1e-2,
    )
    config = coarse(tmp_path / "coarse.keras").validate()
    assert (config.norm_layer, config.soft_labels) == ("instance", True)  # the architecture's, as it gives them
    result = train(config)
    losses = [entry["loss"] for entry in result.history]
    assert losses[-1] < losses[0]
    assert result.card.architecture["normalization"] == "instance" and result.card.projections == 1

    # Soft targets: the labels stay shares of bone on the coarse grid, not 0/1.
    image_path, labels_path, spacing_mm = training_pair
    volume = prepare_volume(read_volume(image_path), read_mask(labels_path), spacing_mm, soft_labels=True)
    assert volume.bone.dtype == np.float32 and np.any((volume.bone > 0.05) & (volume.bone < 0.95))

    # A run stopped by its time budget resumes where it stopped and ends where an uninterrupted one does.
    budgeted = coarse(tmp_path / "budget.keras", max_minutes=1e-6)
    assert train(budgeted).steps == budgeted.steps_per_epoch  # the budget is spent at the first epoch end
    resumed = train(replace(budgeted, max_minutes=None, resume=True))
    assert resumed.steps == 3 * budgeted.steps_per_epoch

    # Crops past the training range: the image reaches half a sub-volume further, the loss stays on the range.
    past = train(coarse(tmp_path / "past.keras", train_range_i=(0, 40), crops_past_range=True, epochs=1))
    (record,) = past.card.training["data"]
    context = round(
        8 * past.card.spacing_mm[0] / float(read_volume(image_path).geometry.spacing[0])
    )  # half of a 16-voxel crop
    assert record["image_range_i"] == [0, 40 + context] and np.isfinite(past.history[-1]["loss"])

    # The ONNX export runs on ONNX Runtime and gives Keras's probabilities.
    session = onnxruntime.InferenceSession(str(tmp_path / "coarse.onnx"), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).normal(0.3, 0.3, (2, 16, 16, 16, 1)).astype(np.float32)
    keras_model = load_model(tmp_path / "coarse.keras").network
    np.testing.assert_allclose(session.run(None, {"image": batch})[0], keras_model.predict_on_batch(batch), atol=1e-4)


@pytest.mark.slow
def test_the_slices_recipe_trains_a_2d_network_on_crops_of_all_three_planes_and_exports_free_sides(
    training_pair, tmp_path
):
    """The whole-knee network's recipe (architecture ``slices``) on a crop: few steps, the full path."""
    slices = partial(
        _tiny_config,
        training_pair,
        architecture="slices",
        base_filters=4,
        depth=2,
        patch_size=16,
        batch_size=4,
        soft_labels=None,
        epochs=3,
        learning_rate=1e-2,
    )
    result = train(slices(tmp_path / "slices.keras", train_range_i=(0, 40), crops_past_range=True))
    losses = [entry["loss"] for entry in result.history]
    assert losses[-1] < losses[0]
    assert result.card.architecture["dimensions"] == 2 and result.card.projections == 3

    # The 2D network and its ONNX export take slices of any size, and agree.
    model = load_model(tmp_path / "slices.onnx")
    assert model.network.input_shape == (None, None, None, 1)
    batch = np.random.default_rng(0).normal(0.3, 0.3, (2, 24, 40, 1)).astype(np.float32)
    keras_model = load_model(tmp_path / "slices.keras").network
    np.testing.assert_allclose(model.network.predict_on_batch(batch), keras_model.predict_on_batch(batch), atol=1e-4)

    # A resumed run draws the same crops: its checkpoint holds the slice sampler's state.
    budgeted = slices(tmp_path / "budget.keras", max_minutes=1e-6)
    assert train(budgeted).steps == budgeted.steps_per_epoch
    resumed = train(replace(budgeted, max_minutes=None, resume=True))
    whole = train(slices(tmp_path / "whole.keras"))
    assert [entry["loss"] for entry in resumed.history] == pytest.approx(
        [entry["loss"] for entry in whole.history], rel=1e-4
    )


def test_slice_crops_keep_image_and_labels_aligned_in_every_plane_and_see_no_label_past_the_range():
    """Crops of a volume whose image is its labels: each crop's image is its bone, whatever plane and flips."""
    rng = np.random.default_rng(3)
    bone = (rng.random((40, 48, 56)) < 0.3).astype(np.float32)
    bone[:, :, 30:] = 0  # past the range: image seen, labels not
    trained = np.zeros(bone.shape, np.uint8)
    trained[:, :, :30] = 1
    image = np.where(trained > 0, bone, 0.5).astype(np.float32)
    volume = TrainingVolume(image, bone, np.flatnonzero(bone > 0), {"model_grid_ijk": [56, 48, 40]}, trained)
    sampler = SliceSampler([volume], 16, 0.5, replace(Augmentation.none(), flips=True), seed=0)
    images, targets = sampler.batch(64)
    assert images.shape == (64, 16, 16, 1) and targets.shape == (64, 16, 16, 2)
    counted = targets[..., 1] > 0
    assert counted.any() and not counted.all()  # crops reach past the range
    np.testing.assert_array_equal(images[..., 0][counted], targets[..., 0][counted])
    assert not targets[..., 0][~counted].any() and np.all(images[..., 0][~counted] == 0.5)
    # The sampler's state replays its crops.
    replay = SliceSampler([volume], 16, 0.5, replace(Augmentation.none(), flips=True), seed=1)
    replay.set_state(sampler.state)
    np.testing.assert_array_equal(replay.batch(8)[0], sampler.batch(8)[0])
    # Crops of all three planes: an image that counts k, j and i in units of 1, 100 and 10000 says each crop's plane.
    k, j, i = np.indices(bone.shape, dtype=np.float32)
    coded = TrainingVolume(k + 100 * j + 10000 * i, bone, volume.boundary, volume.record, trained)
    crops = SliceSampler([coded], 16, 0.5, replace(Augmentation.none(), flips=True), seed=0).batch(60)[0][..., 0]
    steps = {frozenset(np.abs([crop[1, 0] - crop[0, 0], crop[0, 1] - crop[0, 0]]).astype(int)) for crop in crops}
    assert steps == {frozenset({100, 10000}), frozenset({1, 10000}), frozenset({1, 100})}
