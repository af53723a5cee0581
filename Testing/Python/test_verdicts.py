"""Never hand over a wrong bone: plausibility, confidence, input check and verdicts.

The network cases run the shipped model on what this machine has: the
sample scan (cropped around the knee to save time), the sample with inverted
contrast, with its fat suppressed, a femur-only crop, a head phantom and
pure noise. Each must get the right verdict with a reason a person can read,
and no case may name a bone that is not that bone (checked against the
sample's ground truth).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import slicerio
from conftest import knee_phantom, largest_components, measure_components, write_threshold_onnx
from scipy import ndimage

from KneeBoneSegLib.anatomy import BONE_BY_KEY
from KneeBoneSegLib.cli import EXIT_NO_BONE, main
from KneeBoneSegLib.errors import InputError
from KneeBoneSegLib.io.images import read_volume, write_volume
from KneeBoneSegLib.io.outputs import PROBABILITY_FILE, SEGMENTATION_FILE, read_outputs, write_outputs
from KneeBoneSegLib.network.models import ModelCard, default_model_path, load_model
from KneeBoneSegLib.pipeline import SegmentOptions, postprocess, segment
from KneeBoneSegLib.postprocess.components import label_bones
from KneeBoneSegLib.trust.inputcheck import compare_with_card
from KneeBoneSegLib.trust.plausibility import assignment_reasons
from KneeBoneSegLib.trust.verdicts import judge
from KneeBoneSegLib.volume import Geometry, Volume

# Crops of the sample scan (array slices k, j, i), chosen from its ground truth:
# the knee with the air around it removed, the joint (all three bones in part),
# and the femur alone (above the tibia, behind the patella).
KNEE = (slice(0, 286), slice(105, 405), slice(95, 385))
JOINT = (slice(40, 200), slice(105, 405), slice(95, 385))
FEMUR_ONLY = (slice(120, 286), slice(205, 405), slice(95, 385))


def _crop(volume: Volume, box) -> Volume:
    return Volume(np.ascontiguousarray(volume.array[box]), volume.geometry.cropped([s.start for s in box]))


def _assert_no_wrong_bone(result, truth: np.ndarray):
    """Every named bone lies mostly inside that bone's ground truth."""
    for key in result.report["bones"]:
        named = result.labels == BONE_BY_KEY[key].label
        inside = np.count_nonzero(named & (truth == BONE_BY_KEY[key].label)) / np.count_nonzero(named)
        assert inside > 0.8, f"{key} named where the ground truth has no {key} ({inside:.0%} inside)"


# ---- plausibility rules -------------------------------------------------------------------------


def test_rules_fit_the_sample_ground_truth_and_only_as_the_right_bones(sample_labels):
    components, sizes = largest_components(sample_labels.array > 0, count=3)
    measures = measure_components(components, sizes, sample_labels.geometry, 3)
    order = {BONE_BY_KEY[key].label: key for key in ("femur", "tibia", "patella")}
    truth_of = [order[int(np.median(sample_labels.array[components == n + 1]))] for n in range(3)]
    right = {bone: n for n, bone in enumerate(truth_of)}
    assert assignment_reasons(right, measures) == []
    # The femur is too big to be a patella.
    assert any("patella" in reason for reason in assignment_reasons({"patella": right["femur"]}, measures))


def test_a_litre_of_muscle_is_never_named_femur():
    # A 1-litre blob, 120 x 100 x 160 mm, in a 2 mm grid: the size of the posterior thigh muscle
    # a 3 T fat-suppressed scan once gave as "femur".
    geometry = Geometry((2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    k, j, i = np.indices((90, 70, 80))
    blob = ((k - 45) / 40) ** 2 + ((j - 35) / 25) ** 2 + ((i - 40) / 30) ** 2 <= 1
    labels, report = label_bones(blob, geometry)
    assert not labels.any() and report["missing"] == ["femur", "tibia", "patella"]
    (rejected,) = report["rejected"]
    assert rejected["volume_cm3"] > 900
    assert any("more than a femur" in reason for reason in rejected["reasons"]["femur"])
    assert any("was not named a bone" in warning and "cm3" in warning for warning in report["warnings"])


def test_bones_cut_by_the_field_of_view_are_still_named(sample_labels):
    # A 42 mm slab through the joint cuts every bone, the tibia to its top 18 mm (the whole scan shows 36 mm).
    box = (slice(50, 170), slice(0, 512), slice(0, 512))
    cut = _crop(sample_labels, box)
    labels, report = label_bones(cut.array > 0, cut.geometry)
    assert report["missing"] == [] and report["rejected"] == []
    assert all(entry["cut_by_field_of_view"] for entry in report["found"].values())
    np.testing.assert_array_equal(labels, cut.array)


# ---- verdicts, outputs and exit status, with a real small network -----------------------------


def test_verdicts_follow_confidence_and_input_differences():
    thresholds = {"min_sure_share": 0.8, "max_surface_disagreement": 0.3, "failed_sure_share": 0.5}
    report = {
        "bones": {"femur": {}, "tibia": {}},
        "components": {"rejected": [{"volume_cm3": 40.0}]},
        "confidence": {
            "femur": {"sure_share": 0.95, "surface_disagreement": 0.1},
            "tibia": {"sure_share": 0.7, "surface_disagreement": 0.1},
        },
        "input_check": {"differences": []},
    }
    verdict = judge(report, thresholds)
    assert verdict["run"] == "review"
    assert [verdict["bones"][key]["verdict"] for key in ("femur", "tibia", "patella")] == ["ok", "review", "missing"]
    assert (
        "sure" in verdict["bones"]["tibia"]["reasons"][0]
        and "1 component rejected" in verdict["bones"]["patella"]["reasons"][0]
    )

    report["confidence"]["femur"]["sure_share"] = 0.3
    report["confidence"]["tibia"]["surface_disagreement"] = 0.5
    report["input_check"]["differences"] = ["a 3 T scanner (the model was trained on 0.3 T)"]
    verdict = judge(report, thresholds)
    assert verdict["bones"]["femur"]["verdict"] == "failed" and verdict["bones"]["tibia"]["verdict"] == "review"
    assert any("3 T" in reason for reason in verdict["bones"]["tibia"]["reasons"])
    assert any("disagree" in reason for reason in verdict["bones"]["tibia"]["reasons"])

    # Thresholds calibrated on one projection have no disagreement limit: a three-projection run is judged by sureness alone.
    report["input_check"]["differences"] = []
    report["confidence"]["tibia"] = {"sure_share": 0.95, "surface_disagreement": 0.9}
    verdict = judge(report, {**thresholds, "max_surface_disagreement": None})
    assert verdict["bones"]["tibia"] == {"verdict": "ok", "reasons": []}


def test_input_check_names_what_differs_from_the_card(sample_dicom):
    card = load_model(default_model_path()).card
    trained = read_volume(sample_dicom).tags
    image = np.random.default_rng(0).random((40, 40, 40), np.float32)
    same = compare_with_card(image, (0.35, 0.35, 0.35), trained, card)
    assert not any("T scanner" in d or "fat" in d or "body part" in d for d in same["differences"])
    other = {
        **trained,
        "MagneticFieldStrength": "3",
        "ScanOptions": "FS\\SAT_GEMS",
        "EchoTime": "85",
        "BodyPartExamined": "HEAD",
    }
    differences = " | ".join(compare_with_card(image, (0.31, 0.31, 1.5), other, card)["differences"])
    for words in ("3 T scanner", "fat-suppressed", "T2-weighted", "body part HEAD", "coarser", "histogram"):
        assert words in differences


@pytest.fixture
def phantom_on_disk(tmp_path):
    image, labels, geometry = knee_phantom()
    write_volume(Volume(image, geometry), tmp_path / "knee.nrrd")
    noise = np.random.default_rng(3).random((40, 40, 40)).astype(np.float32)
    write_volume(
        Volume(noise, Geometry((0.1, 0.1, 0.1), (0.0, 0.0, 0.0))), tmp_path / "noise.nrrd"
    )  # 4 mm: no bone fits
    card = ModelCard(name="threshold", patch_size=16, stride=8, normalization={"method": "minmax"})
    write_threshold_onnx(tmp_path / "threshold.onnx", card)
    return tmp_path


def test_cli_exits_3_when_no_bone_passes_and_keeps_the_outputs_marked(phantom_on_disk, capsys):
    folder = phantom_on_disk
    code = main(
        [
            "segment",
            str(folder / "noise.nrrd"),
            "-o",
            str(folder / "out"),
            "--model",
            str(folder / "threshold.onnx"),
            "--progress",
            "none",
        ]
    )
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == EXIT_NO_BONE == 3
    assert last_line.startswith("FAILED: femur missing (not found")
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["verdict"]["run"] == "failed" and "no bone passed" in summary["verdict"]["reasons"][0]
    assert (folder / "out" / "segmentation.seg.nrrd").is_file()

    code = main(
        [
            "segment",
            str(folder / "knee.nrrd"),
            "-o",
            str(folder / "knee"),
            "--model",
            str(folder / "threshold.onnx"),
            "--progress",
            "none",
            "--save-uncertainty",
        ]
    )
    assert code == 0
    summary = json.loads((folder / "knee" / "summary.json").read_text())
    assert summary["verdict"]["run"] == "ok" and set(summary["confidence"]) == {"femur", "tibia", "patella"}
    uncertainty = read_volume(folder / "knee" / "uncertainty.nrrd")
    assert (
        uncertainty.array.shape == knee_phantom()[0].shape
        and 0 <= uncertainty.array.min()
        and uncertainty.array.max() <= 1
    )


def test_failed_bones_are_marked_in_segment_names_and_files(tmp_path):
    image, truth, geometry = knee_phantom()
    result = postprocess(Volume(truth, geometry), SegmentOptions(closing_radius=0, smoothing_iterations=2))
    result.report["verdict"]["bones"]["tibia"]["verdict"] = "failed"
    result.report["verdict"]["bones"]["patella"]["verdict"] = "review"
    written = write_outputs(result, tmp_path / "out")
    assert (tmp_path / "out" / "tibia.failed.stl").is_file() and not (tmp_path / "out" / "tibia.stl").exists()
    segments = {
        s["id"]: s
        for s in slicerio.read_segmentation(str(tmp_path / "out" / "segmentation.seg.nrrd"), skip_voxels=True)[
            "segments"
        ]
    }
    assert segments["Femur"]["name"] == "Femur" and segments["Tibia"]["name"] == "Tibia (failed)"
    assert segments["Tibia"]["status"] == "flagged" and segments["Patella"]["name"] == "Patella (review)"
    assert "tibia failed" in written["summary_line"]

    # Read back by the one reader: the failed bone's surface under its own key, its verdict with it.
    read = read_outputs(tmp_path / "out")
    assert set(read.surfaces) == set(result.surfaces) and read.verdict["bones"]["tibia"]["verdict"] == "failed"
    np.testing.assert_array_equal(read.labels.array, result.labels)
    for key in ("tibia", "patella"):  # the same mesh (STL keeps float32 triangles, not the vertex order)
        read_mesh, mesh = read.surfaces[key], result.surfaces[key]
        assert len(read_mesh.faces) == len(mesh.faces)
        np.testing.assert_allclose(
            [read_mesh.vertices.min(0), read_mesh.vertices.max(0)],
            [mesh.vertices.min(0), mesh.vertices.max(0)],
            atol=1e-4,
        )
    assert read.path(PROBABILITY_FILE) is None and read.path(SEGMENTATION_FILE) == tmp_path / "out" / SEGMENTATION_FILE
    with pytest.raises(InputError, match="not an output folder"):
        read_outputs(tmp_path)


def test_slicer_segments_show_the_verdict(tmp_path):
    slicer = pytest.importorskip("slicer", reason="needs the PyPI package slicer-core")
    import vtk

    from KneeBoneSegLib.io.outputs import VERDICT_TAG
    from KneeBoneSegLib.slicer.mrml import labels_to_segmentation_node, mark_verdicts

    _, truth, geometry = knee_phantom()
    result = postprocess(Volume(truth, geometry), SegmentOptions(closing_radius=0, surfaces=False))
    verdict = result.verdict
    verdict["bones"]["patella"] = {"verdict": "failed", "reasons": ["the network is sure of only 20 % of it"]}
    verdict["run"] = "review"
    node = labels_to_segmentation_node(truth, geometry, slicer.vtkMRMLScene(), name="knee")
    mark_verdicts(node, verdict)
    segmentation = node.GetSegmentation()
    assert segmentation.GetSegment("Femur").GetName() == "Femur"
    assert segmentation.GetSegment("Patella").GetName() == "Patella (failed)"
    status = vtk.reference("")
    assert segmentation.GetSegment("Patella").GetTag("Segmentation.Status", status) and status.get() == "flagged"
    assert node.GetAttribute(VERDICT_TAG) == "review"
    assert segmentation.GetSegment("Patella").GetTag(VERDICT_TAG, status) and status.get() == "failed"


# ---- the shipped model on cases built from the sample scan -------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return load_model(default_model_path())


@pytest.fixture(scope="module")
def sample_scan(sample_dir):
    return read_volume(sample_dir / "knee_mri.nrrd")


@pytest.mark.slow
def test_sample_knee_is_ok_for_all_three_bones(sample_scan, sample_labels, shipped):
    result = segment(_crop(sample_scan, KNEE), shipped, SegmentOptions(surfaces=False))
    verdict = result.verdict
    assert verdict["run"] == "ok", verdict
    assert all(verdict["bones"][key]["verdict"] == "ok" for key in ("femur", "tibia", "patella"))
    assert result.report["input_check"]["differences"] == []
    _assert_no_wrong_bone(result, sample_labels.array[KNEE])


@pytest.mark.slow
def test_femur_only_crop_gives_a_femur_to_review_and_two_missing(sample_scan, sample_labels, shipped):
    result = segment(_crop(sample_scan, FEMUR_ONLY), shipped, SegmentOptions(surfaces=False))
    bones = result.verdict["bones"]
    # Right, but a lone bone's name rests on its shape alone: never ok.
    assert (
        bones["femur"]["verdict"] == "review" and bones["tibia"]["verdict"] == bones["patella"]["verdict"] == "missing"
    )
    assert any(reason.startswith("name uncertain") for reason in bones["femur"]["reasons"])
    assert "not found" in bones["tibia"]["reasons"][0] and result.verdict["run"] == "review"
    _assert_no_wrong_bone(result, sample_labels.array[FEMUR_ONLY])


def _assert_untrusted(result, truth, words):
    """The run is not ok, says why in ``words``, and whatever bone it names is that bone."""
    verdict = result.verdict
    assert verdict["run"] in ("review", "failed"), verdict
    assert words in " ".join(verdict["reasons"]), verdict
    assert all(v["reasons"] for v in verdict["bones"].values() if v["verdict"] != "ok"), verdict
    _assert_no_wrong_bone(result, truth)


@pytest.mark.slow
def test_inverted_contrast_is_not_trusted(sample_scan, sample_labels, shipped):
    joint = _crop(sample_scan, JOINT)
    inverted = Volume(joint.array.max() - joint.array, joint.geometry)
    result = segment(inverted, shipped, SegmentOptions(surfaces=False))
    assert any("inverted" in d for d in result.report["input_check"]["differences"])
    _assert_untrusted(result, sample_labels.array[JOINT], "inverted")


@pytest.mark.slow
def test_suppressed_fat_is_not_trusted(sample_scan, sample_labels, shipped):
    joint = _crop(sample_scan, JOINT)
    low, bright = np.percentile(joint.array, [50, 85])
    suppressed = np.where(joint.array > bright, low, joint.array).astype(joint.array.dtype)
    result = segment(Volume(suppressed, joint.geometry), shipped, SegmentOptions(surfaces=False))
    # Normalisation stretches what is left back to the training range, so the histogram's shape stays
    # within tolerance here (DICOM tags name fat suppression where present); the network's confidence does not.
    _assert_untrusted(result, sample_labels.array[JOINT], "the network is sure")


@pytest.mark.slow
def test_a_head_is_not_a_knee(shipped):
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    # scikit-image's Shepp-Logan head phantom made 3D: each axial slice the 2D phantom scaled to an
    # ellipsoidal head, 1.2 mm voxels. (skimage.data.brain() needs a download.)
    slice_2d = resize(shepp_logan_phantom(), (96, 96), anti_aliasing=True)
    head = np.zeros((48, 96, 96), np.float32)
    for k in range(48):
        scale = np.sqrt(max(0.0, 1 - ((k - 24) / 24) ** 2))
        size = max(2, int(round(96 * scale)) // 2 * 2)
        start = (96 - size) // 2
        head[k, start : start + size, start : start + size] = resize(slice_2d, (size, size), anti_aliasing=True)
    head = ndimage.gaussian_filter(head, 0.7) * 1000 + np.random.default_rng(1).normal(0, 10, head.shape)
    result = segment(
        Volume(head.astype(np.float32), Geometry((1.2, 1.2, 1.2), (0, 0, 0))), shipped, SegmentOptions(surfaces=False)
    )
    assert result.report["bones"] == {} and result.verdict["run"] == "failed", result.verdict
    assert all(v["verdict"] == "missing" for v in result.verdict["bones"].values())


def test_pure_noise_fails(shipped):
    noise = np.random.default_rng(2).random((64, 64, 64)).astype(np.float32) * 1000
    result = segment(Volume(noise, Geometry((0.7, 0.7, 0.7), (0, 0, 0))), shipped, SegmentOptions(surfaces=False))
    assert result.report["bones"] == {} and result.verdict["run"] == "failed"
    assert "no bone passed" in result.verdict["reasons"][0]
    assert any("histogram" in d for d in result.report["input_check"]["differences"])
