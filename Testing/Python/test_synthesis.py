"""Training images synthesised from label maps: the maps on the model's grid, each crop's image, the mixed sampler, the command line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import knee_phantom

from KneeBoneSegLib.errors import InputError
from KneeBoneSegLib.io.images import write_volume
from KneeBoneSegLib.training.augmentation import Augmentation
from KneeBoneSegLib.training.config import TrainingConfig
from KneeBoneSegLib.training.data import MixedSampler, SliceSampler, SyntheticSliceSampler, prepare_volume
from KneeBoneSegLib.training.synthesis import Synthesis, prepare_label_map, smooth_field, synthesize_crop
from KneeBoneSegLib.volume import Volume

#: No blur, no spread, no change after synthesis: each structure one intensity, so the tests can read them back.
PLAIN = Synthesis(spread=0.0, resolution_mm=(0.7, 0.7), elastic_mm=0.0, augmentation=Augmentation.none())


def _other_knee(cartilage: bool = True) -> Volume:
    """A phantom's bones as an mskt-style map: bones 5, 6, 7, a cartilage layer 1 on the femur, a fibula 8 by the tibia."""
    _, labels, geometry = knee_phantom(shape=(40, 40, 40), spacing=(1.0, 1.0, 1.0))
    values = np.zeros(labels.shape, np.uint8)
    for label, value in ((1, 5), (2, 6), (3, 7)):
        values[labels == label] = value
    if cartilage:
        from scipy import ndimage

        femur = values == 5
        values[ndimage.binary_dilation(femur, iterations=2) & ~femur & (values == 0)] = 1
    fibula = np.zeros_like(femur := values == 5)
    fibula[5:12, 5:9, 30:34] = True
    values[fibula & (values == 0)] = 8
    return Volume(values, geometry)


def test_a_label_map_on_the_model_grid_keeps_bones_and_other_structures_apart():
    knee = _other_knee()
    label_map = prepare_label_map(knee, bone_labels=(5, 6, 7), spacing_mm=2.0, name="knee")
    assert label_map.record["bone_labels"] == [5, 6, 7] and label_map.record["other_labels"] == [1, 8]
    assert label_map.labels.shape == (20, 20, 20) and label_map.record["spacing_kji_mm"] == [2.0, 2.0, 2.0]
    bone_structures = np.flatnonzero(label_map.is_bone)
    assert len(bone_structures) == 3 and not label_map.is_bone[0]
    # The target is the bones' share, never the cartilage's or the fibula's.
    original_share = np.isin(knee.array, (5, 6, 7)).mean()
    assert label_map.bone.mean() == pytest.approx(original_share, rel=0.05)
    from scipy import ndimage

    near_bone = ndimage.binary_dilation(label_map.is_bone[label_map.labels], iterations=2)
    on_other = ~near_bone & (label_map.labels > 0)
    assert on_other.any() and label_map.bone[on_other].max() == 0, "only partial volume at a bone's edge counts as bone"
    # Depth is measured inside bone, the body distance outside every structure.
    inside = label_map.is_bone[label_map.labels]
    assert (label_map.bone_depth_mm[~inside] == 0).all() and label_map.bone_depth_mm[inside].min() >= 2.0 - 1e-6
    assert (label_map.body_mm[label_map.labels > 0] == 0).all() and label_map.body_mm[label_map.labels == 0].min() > 0
    # Bone values the map lacks, or a probability map, are refused in one line.
    with pytest.raises(InputError, match=r"no voxel has the bone label\(s\) \[9\]"):
        prepare_label_map(knee, bone_labels=(5, 9), name="knee")
    with pytest.raises(InputError, match="probability map"):
        prepare_label_map(Volume(knee.array.astype(np.float32), knee.geometry), name="knee")


def test_a_fold_synthesises_only_from_its_training_side():
    knee = _other_knee()
    whole = prepare_label_map(knee, spacing_mm=None)
    side = prepare_label_map(knee, spacing_mm=None, train_range_i=(20, 40))
    assert side.labels.shape == (40, 40, 20) and side.record["train_range_i"] == [20, 40]
    np.testing.assert_array_equal(side.labels, whole.labels[:, :, 20:40])
    assert whole.record["bone_labels"] == [1, 5, 6, 7, 8], "without bone values every labelled structure is bone"


def _square_bone_and_cartilage():
    """A 64^2 crop: a bone (structure 1) with cartilage (2) beside it, their depth and body distances."""
    labels = np.zeros((64, 64), np.uint8)
    labels[16:48, 16:48] = 1
    labels[16:48, 48:52] = 2
    yy, xx = np.mgrid[:64, :64]
    depth = np.where(labels == 1, np.minimum.reduce([yy - 16, 47 - yy, xx - 16, 47 - xx]) + 0.5, 0).astype(np.float32)
    body = np.maximum.reduce([16 - yy, yy - 47, 16 - xx, xx - 51, np.zeros_like(yy)]).astype(np.float32)
    return labels, np.array([False, True, False]), depth, body


def test_each_structure_gets_its_own_intensity_a_dark_cortex_and_air_beyond_the_body():
    rng = np.random.default_rng(3)
    labels, is_bone, depth, body = _square_bone_and_cartilage()
    image = synthesize_crop(labels, is_bone, depth, body, (1.0, 1.0), PLAIN, rng)
    marrow, cartilage = image[24:40, 24:40], image[20:44, 49:51]
    assert np.ptp(marrow) == 0 and np.ptp(cartilage) < 0.1, (
        "no spread: one intensity per structure (cortex noise aside)"
    )
    cortex = image[labels == 1][depth[labels == 1] < PLAIN.cortex_mm[0]]
    assert cortex.max() < PLAIN.cortex_intensity[1] + 0.1
    air = image[body > PLAIN.body_margin_mm[1] * 1.3]
    assert air.size == 0 or air.max() < PLAIN.air_intensity[1] + 0.1
    # Seeded: the same generator state gives the same image, another state another one.
    again = synthesize_crop(labels, is_bone, depth, body, (1.0, 1.0), PLAIN, np.random.default_rng(3))
    other = synthesize_crop(labels, is_bone, depth, body, (1.0, 1.0), PLAIN, np.random.default_rng(4))
    np.testing.assert_array_equal(image, again)
    assert not np.allclose(image, other)


def test_decoys_make_marrow_bright_tissue_dark_lines_and_a_dark_joint():
    labels, is_bone, depth, body = _square_bone_and_cartilage()
    # Wide margin: no air, so every background voxel is a pseudo-tissue.
    plain = replace(PLAIN, body_margin_mm=(100.0, 100.0))
    decoys = replace(plain, marrow_like_tissue=1.0, tissue_lines=1.0, joint_darker=1.0)
    background = labels == 0
    marrow_gaps, dark_shares, plain_dark_shares = [], [], []
    for seed in range(40):
        image = synthesize_crop(labels, is_bone, depth, body, (1.0, 1.0), decoys, np.random.default_rng(seed))
        marrow, cartilage = image[32, 32], image[30, 50]
        assert cartilage <= marrow + 1e-6, "with joint_darker the cartilage is never brighter than the marrow"
        tissue = image[background & (image > PLAIN.cortex_intensity[1] + 0.1)]
        marrow_gaps.append(np.abs(tissue - marrow).min() if tissue.size else 1.0)
        dark_shares.append((image[background] < PLAIN.cortex_intensity[1] + 0.1).mean())
        plain_image = synthesize_crop(labels, is_bone, depth, body, (1.0, 1.0), plain, np.random.default_rng(seed))
        plain_dark_shares.append((plain_image[background] < PLAIN.cortex_intensity[1] + 0.1).mean())
    # Some background tissue takes the marrow's intensity (to within its jitter) in most crops.
    assert np.median(marrow_gaps) < 0.05
    # Dark lines: far more dark background than the tissues alone give, yet lines, not the whole background.
    assert np.mean(dark_shares) > np.mean(plain_dark_shares) + 0.03 and np.mean(dark_shares) < 0.6
    # Off by default: the earlier rows' generator.
    assert Synthesis().marrow_like_tissue == Synthesis().tissue_lines == Synthesis().joint_darker == 0.0


def test_smooth_fields_interpolate_their_coarse_grid():
    coarse = np.arange(12, dtype=np.float32).reshape(3, 4)
    field = smooth_field(coarse, (5, 7))
    assert field.shape == (5, 7)
    np.testing.assert_allclose(field[[0, 0, -1, -1], [0, -1, 0, -1]], coarse[[0, 0, -1, -1], [0, -1, 0, -1]])
    np.testing.assert_allclose(field[2, 0], coarse[1, 0])  # the middle row falls on the middle node


def test_synthetic_crops_carry_the_maps_bone_and_replay_from_their_state():
    label_map = prepare_label_map(_other_knee(), bone_labels=(5, 6, 7), spacing_mm=1.0)
    sampler = SyntheticSliceSampler([label_map], 16, 0.5, replace(PLAIN, elastic_mm=2.0), seed=0)
    images, targets = sampler.batch(12)
    assert images.shape == (12, 16, 16, 1) and targets.shape == (12, 16, 16, 1)
    assert 0.0 <= targets.min() and targets.max() <= 1.0 and 0.05 < targets.mean() < 0.95, (
        "boundary crops hold bone and not bone"
    )
    state = sampler.state
    first = sampler.batch(4)
    sampler.set_state(state)
    second = sampler.batch(4)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_the_mixed_sampler_draws_both_sources_at_its_ratio():
    image, labels, geometry = knee_phantom(shape=(40, 40, 40), spacing=(1.0, 1.0, 1.0))
    real = prepare_volume(Volume(image, geometry), Volume(labels, geometry), 1.0, train_range_i=(0, 30), context_mm=4.0)
    label_map = prepare_label_map(_other_knee(), bone_labels=(5, 6, 7), spacing_mm=1.0)
    real_sampler = SliceSampler([real], 16, 0.5, Augmentation.none(), seed=0)
    synthetic = SyntheticSliceSampler([label_map], 16, 0.5, PLAIN, seed=1)
    mixed = MixedSampler(real_sampler, synthetic, 0.25, seed=2)
    images, targets = mixed.batch(200)
    # Real crops near the range's end mark what is trained on (channel 2); synthetic crops count everywhere.
    assert targets.shape[-1] == 2
    uncounted = (targets[..., 1] == 0).any(axis=(1, 2))
    assert uncounted.any()
    state = mixed.state
    again = mixed.batch(8)
    mixed.set_state(state)
    np.testing.assert_array_equal(mixed.batch(8)[0], again[0])
    only_synthetic = MixedSampler(None, SyntheticSliceSampler([label_map], 16, 0.5, PLAIN, seed=1), 0.25, seed=2)
    assert only_synthetic.synthetic_fraction == 1.0 and only_synthetic.batch(3)[1].shape == (3, 16, 16, 1)


def test_the_command_line_takes_label_maps_their_bones_and_the_ratio(tmp_path):
    import argparse

    from KneeBoneSegLib.training.arguments import add_arguments, command_line, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    arguments = [
        "-o",
        str(tmp_path / "m.keras"),
        "--architecture",
        "slices",
        "--synthetic-map",
        "a.nrrd",
        "5,6,7",
        "--synthetic-map",
        "b.nrrd",
        "all",
        "--synthetic-fraction",
        "1",
    ]
    config = config_from_args(parser.parse_args(arguments))
    assert config.images == [] and config.synthetic_maps == [(Path("a.nrrd"), (5, 6, 7)), (Path("b.nrrd"), None)]
    rebuilt = config_from_args(parser.parse_args(__import__("shlex").split(command_line(config))[2:]))
    assert rebuilt.synthetic_maps == config.synthetic_maps and rebuilt.synthetic_fraction == 1.0
    # The generator's settings: some overridden as JSON, recorded in the command, read back the same.
    decoys = config_from_args(
        parser.parse_args(
            [*arguments, "--synthesis", '{"tissue_lines": 0.5, "line_mm": [0.2, 0.4], "augmentation": {"noise": 0.1}}']
        )
    )
    assert decoys.synthesis == replace(
        Synthesis(), tissue_lines=0.5, line_mm=(0.2, 0.4), augmentation=replace(Synthesis().augmentation, noise=0.1)
    )
    assert "--synthesis" in command_line(decoys) and "--synthesis" not in command_line(config)
    assert (
        config_from_args(parser.parse_args(__import__("shlex").split(command_line(decoys))[2:])).synthesis
        == decoys.synthesis
    )
    with pytest.raises(SystemExit):
        parser.parse_args([*arguments, "--synthesis", '{"tissue_line": 0.5}'])
    with pytest.raises(SystemExit):
        parser.parse_args([*arguments, "--synthesis", '{"augmentation": {"nois": 0.1}}'])

    def refused(*extra, pairs=()):
        with pytest.raises(InputError) as error:
            config_from_args(parser.parse_args([*pairs, "-o", str(tmp_path / "m.keras"), *extra]))
        return str(error.value)

    assert "IMAGE LABELS" in refused(
        "--architecture", "slices", "--synthetic-map", "a.nrrd", "all", "--synthetic-fraction", "0.5"
    )
    assert "both or neither" in refused(
        "--architecture", "slices", "--synthetic-fraction", "0.5", pairs=("i.nrrd", "l.nrrd")
    )
    assert "both or neither" in refused(
        "--architecture", "slices", "--synthetic-map", "a.nrrd", "all", pairs=("i.nrrd", "l.nrrd")
    )
    assert "--architecture slices" in refused(
        "--synthetic-map", "a.nrrd", "all", "--synthetic-fraction", "0.5", pairs=("i.nrrd", "l.nrrd")
    )
    assert "integers" in refused(
        "--architecture", "slices", "--synthetic-map", "a.nrrd", "femur", "--synthetic-fraction", "1"
    )
    unknown = TrainingConfig(
        images=[],
        labels=[],
        output=tmp_path / "m.keras",
        architecture="unet9",
        synthetic_maps=[("a.nrrd", None)],
        synthetic_fraction=1.0,
    )
    with pytest.raises(InputError, match="architecture must be one of"):
        unknown.validate()
    assert TrainingConfig(images=[], labels=[], output=tmp_path / "m.keras").synthetic_fraction == 0.0


@pytest.mark.slow
def test_a_fold_trained_on_synthetic_images_alone_never_reads_the_real_image(tmp_path):
    """Synthetic alone plus the real scan's label map on the training side: its shape, never its image."""
    from conftest import needs_keras

    needs_keras()
    from KneeBoneSegLib.training.loop import train

    image, labels, geometry = knee_phantom(shape=(40, 48, 48), spacing=(1.0, 1.0, 1.0))
    write_volume(Volume(labels, geometry), tmp_path / "labels.nrrd")
    write_volume(_other_knee(), tmp_path / "other.nrrd")
    (tmp_path / "image.nrrd").write_text("not an image: never read")
    config = TrainingConfig(
        images=[tmp_path / "image.nrrd"],
        labels=[tmp_path / "labels.nrrd"],
        output=tmp_path / "fold.keras",
        architecture="slices",
        base_filters=4,
        depth=2,
        patch_size=16,
        stride=16,
        spacing_mm=1.0,
        epochs=2,
        steps_per_epoch=2,
        batch_size=4,
        validation_patches=4,
        train_range_i=(0, 30),
        synthetic_maps=[(tmp_path / "other.nrrd", (5, 6, 7))],
        synthetic_fraction=1.0,
        synthesize_training_labels=True,
        progress_bar=False,
    )
    result = train(config)
    training = result.card.training
    assert training["data"] == [], "no real image was read"
    maps = training["synthesis"]["label_maps"]
    assert [m["map"] for m in maps] == ["other.nrrd", "labels.nrrd"] and maps[1]["train_range_i"] == [0, 30]
    assert all(len(m["sha256"]) == 64 for m in maps) and training["synthesis"]["fraction"] == 1.0
    assert tuple(training["synthesis"]["settings"]["cortex_mm"]) == Synthesis().cortex_mm
    assert result.card.heldout == {"axis": "i", "from": 30, "to": 48}
    assert (
        "--synthetic-map other.nrrd 5,6,7" in training["command"]
        and "--synthesize-training-labels True" in training["command"]
    )
