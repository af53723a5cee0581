"""The whole pipeline, end to end, through the same entry points the CLI and Slicer use."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import knee_phantom, position_network, write_threshold_onnx

from KneeBoneSegLib.errors import Cancelled, InputError
from KneeBoneSegLib.io.outputs import write_outputs
from KneeBoneSegLib.network.engines import KerasNetwork
from KneeBoneSegLib.network.models import Model, ModelCard, load_model
from KneeBoneSegLib.pipeline import SegmentOptions, postprocess, segment
from KneeBoneSegLib.volume import Volume

MINMAX = {"method": "minmax"}


@pytest.fixture(scope="module")
def phantom():
    return knee_phantom()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    card = ModelCard(name="threshold", patch_size=16, stride=8, normalization=MINMAX)
    return load_model(write_threshold_onnx(tmp_path_factory.mktemp("model") / "threshold.onnx", card))


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize(
    "projections,fusion,aggregate", [(3, "mean", "mean"), (3, "or", "or"), (3, "vote", "mean"), (1, "mean", "or")]
)
def test_segment_finds_and_names_the_three_bones(phantom, model, projections, fusion, aggregate):
    image, truth, geometry = phantom
    options = SegmentOptions(
        projections=projections, fusion=fusion, aggregate=aggregate, closing_radius=2, smoothing_iterations=5
    )
    result = segment(Volume(image, geometry), model, options)
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert result.report["missing"] == []
    for label in (1, 2, 3):
        assert _dice(result.labels == label, truth == label) > 0.97
    assert set(result.surfaces) == {"femur", "tibia", "patella"}
    assert all(bone["surface"]["watertight"] for bone in result.report["bones"].values())
    assert result.probability.shape == image.shape


def test_segment_reports_stages_in_order_and_can_be_cancelled(phantom, model):
    image, _, geometry = phantom
    seen = []
    segment(
        Volume(image, geometry),
        model,
        SegmentOptions(projections=1, closing_radius=1, surfaces=False),
        progress=lambda s, f: seen.append(s),
    )
    stages = list(dict.fromkeys(seen))
    assert stages[0] == "normalise" and stages.index("network: axial") < stages.index("components") < stages.index(
        "closing"
    )

    def stop_in_network(stage, fraction):
        if stage.startswith("network: ") and fraction > 0:
            raise RuntimeError("user pressed Cancel")  # what a GUI's callback raises: an ordinary exception

    with pytest.raises(Cancelled, match="stopped during network: axial: user pressed Cancel"):
        segment(Volume(image, geometry), model, SegmentOptions(projections=1), progress=stop_in_network)


def test_model_spacing_resamples_there_and_back_onto_the_input_grid(phantom, model):
    image, truth, geometry = phantom
    coarse = Model(model.network, ModelCard(patch_size=16, stride=8, normalization=MINMAX, spacing_mm=[1.0, 1.0, 1.0]))
    result = segment(Volume(image, geometry), coarse, SegmentOptions(projections=1, closing_radius=0, surfaces=False))
    assert result.labels.shape == image.shape
    assert _dice(result.labels > 0, truth > 0) > 0.95


def test_postprocess_accepts_label_maps_with_other_values_and_probabilities(phantom):
    _, truth, geometry = phantom
    foreign = np.select([truth == 1, truth == 2, truth == 3], [7, 3, 12]).astype(np.int16)
    result = postprocess(Volume(foreign, geometry), SegmentOptions(closing_radius=0, surfaces=False))
    np.testing.assert_array_equal(result.labels, truth)
    probability = np.where(truth > 0, 0.8, 0.1).astype(np.float32)
    result = postprocess(Volume(probability, geometry), SegmentOptions(closing_radius=0, surfaces=False))
    np.testing.assert_array_equal(result.labels, truth)


def test_options_are_checked(phantom, model):
    for bad in (
        dict(projections=2),
        dict(fusion="and"),
        dict(aggregate="max"),
        dict(closing_units="cm"),
        dict(threshold=1.5),
        dict(stride=0),
    ):
        with pytest.raises(InputError):
            SegmentOptions(**bad).validate()
    image, _, geometry = phantom
    with pytest.raises(InputError, match="stride 20 is larger than the model's 16-voxel sub-volumes"):
        segment(Volume(image, geometry), model, SegmentOptions(stride=20))


def test_a_stride_other_than_the_cards_changes_the_tiling_and_still_segments(phantom, model):
    image, truth, geometry = phantom
    batches = {}
    for stride in (None, 16):
        seen = []
        options = SegmentOptions(projections=1, stride=stride, batch_size=1, closing_radius=0, surfaces=False)
        result = segment(
            Volume(image, geometry),
            model,
            options,
            progress=lambda s, f: seen.append(f) if s == "network: axial" else None,
        )
        batches[stride] = round(1 / min(f for f in seen if f > 0))
        assert _dice(result.labels > 0, truth > 0) > 0.97
    assert batches == {None: 7 * 7 * 8, 16: 4 * 4 * 5}  # the card's stride 8 on 72 x 64 x 64, then 16


def test_projection_and_fusion_variants_give_their_own_maps(phantom):
    image, _, geometry = phantom
    # A network whose output depends on where a voxel lies in its sub-volume, differently along
    # each axis: each projection (the patient axes in another order) predicts its own map.
    model = Model(KerasNetwork(position_network(16)), ModelCard(patch_size=16, stride=8, normalization=MINMAX))
    options = SegmentOptions(closing_radius=0, fill_holes=False, surfaces=False)
    volume = Volume(image, geometry)
    maps = list(model.projection_maps(model.model_input(volume), options))
    assert len(maps) == 3 and all(
        not np.allclose(a, b, atol=1e-3) for a, b in ((maps[0], maps[1]), (maps[0], maps[2]), (maps[1], maps[2]))
    )
    expected = {
        "or": np.max(maps, axis=0),
        "vote": np.median(maps, axis=0),
        "mean": np.mean(maps, axis=0),
    }
    for fusion, fused in expected.items():
        result = segment(volume, model, replace(options, fusion=fusion))
        np.testing.assert_allclose(result.probability, fused, atol=1e-6, err_msg=fusion)
        # The default, "model", is the card's rule, and OR (the paper's) for a card that names none.
        carded = segment(volume, Model(model.network, replace(model.card, fusion=fusion)), options)
        np.testing.assert_allclose(carded.probability, fused, atol=1e-6, err_msg=fusion)
        assert carded.report["fusion"] == fusion
    np.testing.assert_allclose(segment(volume, model, options).probability, expected["or"], atol=1e-6)
    one = segment(volume, model, replace(options, projections=1)).probability
    np.testing.assert_allclose(one, maps[0], atol=1e-6)
    assert len({round(float(m.sum()), 1) for m in (*expected.values(), one)}) == 4


def test_the_model_card_says_how_many_projections_a_run_predicts_unless_told(phantom):
    image, _, geometry = phantom
    volume = Volume(image, geometry)
    for card_projections in (1, 3):
        model = Model(
            KerasNetwork(position_network(16)),
            ModelCard(patch_size=16, stride=8, normalization=MINMAX, projections=card_projections),
        )
        assert len(list(model.projection_maps(model.model_input(volume)))) == card_projections
        assert (
            len(
                list(model.projection_maps(model.model_input(volume), SegmentOptions(projections=4 - card_projections)))
            )
            == 4 - card_projections
        )
    old_card = ModelCard.from_dict({"name": "before the field", "patch_size": 16, "stride": 8})
    assert (
        old_card.projections == 3
    )  # cards written before the field keep the three projections they were measured with


def test_an_uncertainty_map_needs_three_projections(phantom, model):
    image, _, geometry = phantom
    with pytest.raises(InputError, match="three projections"):
        segment(Volume(image, geometry), model, SegmentOptions(projections=1, keep_uncertainty=True))


def test_a_2d_model_predicts_the_slices_of_each_plane_and_segments_the_bones(phantom, tmp_path):
    image, truth, geometry = phantom
    card = ModelCard(
        name="threshold-slices", architecture={"depth": 2, "dimensions": 2}, patch_size=16, normalization=MINMAX
    )
    slices = load_model(write_threshold_onnx(tmp_path / "slices.onnx", card, dimensions=2))
    assert slices.network.input_shape == (None, None, None, 1)
    maps = list(
        slices.projection_maps(slices.model_input(Volume(image, geometry)), SegmentOptions(skip_air_tiles=False))
    )
    # The network is voxel-wise, so each plane's slices, predicted whole, give one map: the scan's, thresholded.
    minmax = (image - image.min()) / (image.max() - image.min())
    for plane in maps:
        np.testing.assert_allclose(plane, 1 / (1 + np.exp(-(40 * minmax - 20))), atol=1e-5)
    result = segment(
        Volume(image, geometry), slices, SegmentOptions(closing_radius=2, smoothing_iterations=5, surfaces=False)
    )
    for label in (1, 2, 3):
        assert _dice(result.labels == label, truth == label) > 0.97
    with pytest.raises(InputError, match="whole slices"):
        segment(Volume(image, geometry), slices, SegmentOptions(stride=8))


def test_the_report_cannot_name_another_engine_precision_or_device_than_the_one_that_ran(phantom, tmp_path):
    """The opened model says how the network runs; options that say otherwise are refused, and the summary records what ran."""
    image, _, geometry = phantom
    card = ModelCard(name="threshold", patch_size=16, stride=8, normalization=MINMAX)
    model = load_model(
        write_threshold_onnx(tmp_path / "threshold.onnx", card), engine="onnxruntime", device="cpu", threads=1
    )
    volume = Volume(image, geometry)
    for contradiction, opened in (
        (dict(precision="bf16"), "f32"),
        (dict(device="gpu"), "cpu"),
        (dict(engine="openvino"), "onnxruntime"),
        (dict(threads=2), "1"),
    ):
        with pytest.raises(
            InputError, match=f"but the model was opened for {opened}; open it with load_model"
        ) as refused:
            segment(volume, model, SegmentOptions(projections=1, surfaces=False, **contradiction))
        assert "\n" not in str(refused.value)
    for agreeing in (
        SegmentOptions(projections=1, surfaces=False),
        SegmentOptions(projections=1, surfaces=False, engine="onnxruntime", device="cpu", threads=1),
    ):
        result = segment(volume, model, agreeing)
        write_outputs(result, tmp_path / "out", overwrite=True)
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        ran, recorded = summary["engine"], summary["options"]
        assert (ran["engine"], ran["device"], ran["precision"], ran["threads"]) == ("onnxruntime", "cpu", "f32", 1)
        assert {name: recorded[name] for name in ("engine", "device", "precision", "threads")} == {
            "engine": "onnxruntime",
            "device": "cpu",
            "precision": "f32",
            "threads": 1,
        }
