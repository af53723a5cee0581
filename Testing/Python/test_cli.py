"""The kneeboneseg command line: what a user types, what they get back, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import knee_phantom, write_threshold_onnx

from KneeBoneSegLib.cli import main
from KneeBoneSegLib.io.images import read_mask, write_volume
from KneeBoneSegLib.metrics import dice
from KneeBoneSegLib.network.models import ModelCard
from KneeBoneSegLib.volume import Geometry, Volume


@pytest.fixture(scope="module")
def scan_and_model(tmp_path_factory):
    """The phantom knee on disk and a small real ONNX model file that segments it, with its card."""
    folder = tmp_path_factory.mktemp("cli")
    image, labels, geometry = knee_phantom()
    write_volume(Volume(image, geometry), folder / "knee.nrrd")
    write_volume(Volume(labels, geometry), folder / "truth.nrrd")
    card = ModelCard(name="threshold", patch_size=16, stride=8, normalization={"method": "minmax"})
    write_threshold_onnx(folder / "threshold.onnx", card)
    return folder


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_writes_segmentation_surfaces_and_summary(scan_and_model, tmp_path, capsys):
    folder = scan_and_model
    code, out, _ = run(
        [
            "segment",
            folder / "knee.nrrd",
            "-o",
            tmp_path / "out",
            "--model",
            folder / "threshold.onnx",
            "--closing-radius",
            "2",
            "--progress",
            "none",
            "--nifti",
            "--save-probability",
        ],
        capsys,
    )
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "femur.stl",
        "labels.nii.gz",
        "patella.stl",
        "probability.nrrd",
        "segmentation.seg.nrrd",
        "summary.json",
        "tibia.stl",
    ]
    assert "femur" in out and "cm3" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["missing"] == [] and summary["device"].startswith("cpu")
    assert {"normalise", "network", "components", "closing", "surfaces"} <= set(
        summary["timings_s"]
    )  # fusion is part of network
    assert summary["model"]["name"] == "threshold" and summary["options"]["closing_radius"] == 2
    assert summary["options"]["skip_air_tiles"] is True
    truth = read_mask(folder / "truth.nrrd").array
    labels = read_mask(tmp_path / "out" / "labels.nii.gz").array
    for label in (1, 2, 3):  # Dice counts the voxels added where there is no bone as well as those missed
        assert dice(labels == label, truth == label) > 0.97, label


def test_progress_json_streams_stages_then_done(scan_and_model, tmp_path, capsys):
    folder = scan_and_model
    code, out, _ = run(
        [
            "segment",
            folder / "knee.nrrd",
            "-o",
            tmp_path / "out",
            "--model",
            folder / "threshold.onnx",
            "--projections",
            "1",
            "--no-surfaces",
            "--all-tiles",
            "--progress",
            "json",
        ],
        capsys,
    )
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and lines[-1]["done"] is True
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["options"]["skip_air_tiles"] is False
    assert [line["stage"] for line in lines[:-1]][0] == "normalise"
    assert any(line["stage"] == "network: axial" and 0 < line["fraction"] <= 1 for line in lines[:-1])


def _write(path, array, spacing=(0.5, 0.5, 0.5)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize(
    "make_input,words",
    [
        (lambda d: d / "missing.nrrd", "does not exist"),
        (lambda d: (d / "empty_folder").mkdir() or d / "empty_folder", "DICOM"),
        (lambda d: _write(d / "flat.nrrd", np.zeros((40, 40), np.int16)), "2D"),
        (lambda d: _write(d / "rgb.nrrd", np.zeros((20, 20, 20, 3), np.uint8)), "single-channel"),
        (lambda d: _write(d / "constant.nrrd", np.full((20, 20, 20), 7, np.int16)), "constant"),
        (
            lambda d: _write(
                d / "nan.nrrd", np.where(np.indices((20, 20, 20))[0] == 3, np.nan, 1.0).astype(np.float32)
            ),
            "NaN",
        ),
        (lambda d: _write(d / "tiny.nrrd", np.random.default_rng(0).random((8, 30, 30)).astype(np.float32)), "smaller"),
    ],
)
def test_bad_inputs_fail_with_one_line_and_leave_nothing(scan_and_model, tmp_path, capsys, make_input, words):
    path = make_input(tmp_path)
    code, out, err = run(
        ["segment", path, "-o", tmp_path / "out", "--model", scan_and_model / "threshold.onnx", "--progress", "none"],
        capsys,
    )
    assert code == 2
    assert (
        len(err.strip().splitlines()) == 1 and err.startswith("kneeboneseg: error:") and words.lower() in err.lower()
    ), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name,model_content,words",
    [
        ("model.onnx", None, "not found"),
        ("model.onnx", b"not an onnx graph", "could not load the model"),
        ("model.keras", b"not a zip file", "not a Keras"),
        ("model.h5", b"", "ends in .onnx"),
    ],
)
def test_bad_model_files_fail_with_one_line(scan_and_model, tmp_path, capsys, name, model_content, words):
    model = tmp_path / name
    if model_content is not None:
        model.write_bytes(model_content)
    code, _, err = run(
        ["segment", scan_and_model / "knee.nrrd", "-o", tmp_path / "out", "--model", model, "--progress", "none"],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and words.lower() in err.lower(), err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_and_existing_outputs_are_refused(scan_and_model, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["postprocess", scan_and_model / "truth.nrrd", "--progress", "none", "--no-surfaces"]
    code, _, err = run([*argv, "-o", blocker / "out"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(blocker) in err
    assert run([*argv, "-o", tmp_path / "out"], capsys)[0] == 0
    before = (tmp_path / "out" / "segmentation.seg.nrrd").stat().st_mtime_ns
    code, _, err = run([*argv, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "out" / "segmentation.seg.nrrd").stat().st_mtime_ns == before


@pytest.mark.sample
def test_an_occupied_output_folder_is_refused_before_the_scan_is_segmented(sample_dir, tmp_path):
    """The whole run takes a minute or more; the refusal must come before it, and touch nothing."""
    import time

    outdir = tmp_path / "results"
    outdir.mkdir()
    (outdir / "plan.stl").write_bytes(b"the surgeon's own file")
    before = (outdir / "plan.stl").stat()
    start = time.perf_counter()
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "KneeBoneSegLib",
            "segment",
            str(sample_dir / "knee_mri.nrrd"),
            "-o",
            str(outdir),
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    assert completed.returncode == 2 and completed.stderr.count("\n") == 1 and "--overwrite" in completed.stderr, (
        completed.stderr
    )
    assert seconds < 5, f"refused only after {seconds:.1f} s"
    assert sorted(path.name for path in outdir.iterdir()) == ["plan.stl"]
    assert (outdir / "plan.stl").read_bytes() == b"the surgeon's own file" and (
        outdir / "plan.stl"
    ).stat().st_mtime_ns == before.st_mtime_ns


def test_contradicting_options_and_an_unrunnable_precision_are_refused_before_the_scan_is_read(
    scan_and_model, tmp_path, capsys
):
    missing_scan = tmp_path / "not_yet_there.nrrd"  # a refusal that reads the scan would name this file instead
    model = scan_and_model / "threshold.onnx"
    for extra, words in (
        (["--precision", "bf16", "--engine", "onnxruntime"], "--precision bf16 needs OpenVINO"),
        (["--threshold", "1.5"], "threshold must lie between 0 and 1"),
    ):
        code, _, err = run(
            ["segment", missing_scan, "-o", tmp_path / "out", "--model", model, "--progress", "none", *extra], capsys
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err and "not_yet_there" not in err, err
    assert not (tmp_path / "out").exists()


def test_thick_slices_warn_and_still_run(tmp_path, capsys, caplog, scan_and_model):
    image, _, _ = knee_phantom(shape=(24, 64, 64))
    write_volume(Volume(image, Geometry((0.35, 0.35, 3.0), (0, 0, 0))), tmp_path / "thick.nrrd")
    code, _, _ = run(
        [
            "segment",
            tmp_path / "thick.nrrd",
            "-o",
            tmp_path / "out",
            "--model",
            scan_and_model / "threshold.onnx",
            "--closing-radius",
            "0",
            "--no-surfaces",
            "--progress",
            "none",
        ],
        capsys,
    )
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any("3 mm" in w and "isotropic" in w for w in summary["warnings"]), summary["warnings"]


@pytest.mark.slow
def test_postprocess_and_evaluate_the_sample_ground_truth(sample_dir, tmp_path, capsys):
    truth = sample_dir / "knee_bones_labels.nrrd"
    code, _, _ = run(["postprocess", truth, "-o", tmp_path / "bones", "--progress", "none", "--nifti"], capsys)
    assert code == 0
    assert {"femur.stl", "tibia.stl", "patella.stl", "segmentation.seg.nrrd", "summary.json"} <= {
        p.name for p in (tmp_path / "bones").iterdir()
    }
    summary = json.loads((tmp_path / "bones" / "summary.json").read_text())
    assert all(bone["surface"]["watertight"] for bone in summary["bones"].values())
    code, out, _ = run(["evaluate", tmp_path / "bones" / "labels.nii.gz", truth, "--json"], capsys)
    metrics = json.loads(out)
    assert code == 0 and set(metrics) == {"femur", "tibia", "patella", "all"}
    # Closing only adds voxels, so the closed ground truth still overlaps the original almost entirely.
    assert all(0.97 < metrics[key]["dice"] <= 1.0 for key in metrics)
    assert set(metrics["all"]) == {"dice", "iou", "ahd_voxels", "ahd_mm", "hd95_mm"}
    code, out, _ = run(["evaluate", tmp_path / "bones" / "labels.nii.gz", truth, "--surfaces"], capsys)
    assert code == 0 and "surf95 mm" in out.splitlines()[0]
    # The closed truth's surfaces lie within a voxel or two (0.35 mm) of the truth's own, on average well within one.
    patella = next(line for line in out.splitlines() if line.startswith("patella")).split()
    assert 0.0 < float(patella[-2]) < 0.35 and float(patella[-2]) <= float(patella[-1])


def test_the_console_script_runs_as_a_module():
    completed = subprocess.run(
        [sys.executable, "-m", "KneeBoneSegLib", "info", "--json"], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    info = json.loads(completed.stdout)
    assert info["devices"]["auto"] in ("cpu", "gpu") and "onnxruntime" in info["versions"]
    assert "CPUExecutionProvider" in info["devices"]["onnxruntime_providers"]
    engine = info["engine"]  # what a default segment runs on here
    assert engine["precision"] == "f32" and engine["engine"] in ("onnxruntime", "openvino") and engine["version"]
    assert "AVX2" in engine["cpu"]["instruction_sets"] or engine["cpu"]["machine"] not in ("x86_64", "AMD64")


def test_info_is_a_short_summary_for_a_person_and_the_whole_object_with_json(capsys):
    from KneeBoneSegLib.network.models import default_model_path, read_card

    code, out, _ = run(["info"], capsys)
    assert code == 0 and len(out.strip().splitlines()) <= 6
    assert str(default_model_path()) in out and "f32" in out
    dice = read_card(default_model_path()).quality["heldout"]["metrics"]["all"]["dice"]
    assert f"all-bone Dice {dice:.4f}" in out


def test_evaluate_help_says_which_argument_is_the_prediction_and_which_the_reference(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    usage = capsys.readouterr().out
    assert "PRED REFERENCE" in usage and "the label map to score" in usage and "the ground truth" in usage


def test_segmenting_imports_no_scikit_image(scan_and_model, tmp_path):
    """scikit-image is off the run path, so Slicer's first use does not install it (tests and benchmarks compare with it)."""
    folder = scan_and_model
    argv = [
        "segment",
        str(folder / "knee.nrrd"),
        "-o",
        str(tmp_path / "out"),
        "--model",
        str(folder / "threshold.onnx"),
        "--progress",
        "none",
    ]
    code = f"import sys; from KneeBoneSegLib.cli import main; status = main({argv!r}); print(status, 'skimage' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stdout + done.stderr


def test_an_options_file_sets_the_run_and_flags_given_win_over_it(scan_and_model, tmp_path, capsys):
    """The Slicer module hands its background process a request file: the same options, by their names."""
    request = tmp_path / "options.json"
    request.write_text(
        json.dumps({"closing_radius": 0.0, "smoothing_iterations": 2, "threshold": 0.3, "surfaces": False})
    )
    argv = [
        "postprocess",
        scan_and_model / "truth.nrrd",
        "-o",
        tmp_path / "out",
        "--options",
        request,
        "--threshold",
        "0.4",
        "--progress",
        "none",
    ]
    code, _, _ = run(argv, capsys)
    options = json.loads((tmp_path / "out" / "summary.json").read_text())["options"]
    assert code == 0 and (
        options["closing_radius"],
        options["smoothing_iterations"],
        options["surfaces"],
        options["threshold"],
    ) == (0.0, 2, False, 0.4)
    assert not list((tmp_path / "out").glob("*.stl"))

    request.write_text(json.dumps({"closing_radius": -2}))
    refused = [
        "postprocess",
        scan_and_model / "truth.nrrd",
        "-o",
        tmp_path / "refused",
        "--options",
        request,
        "--progress",
        "none",
    ]
    code, _, err = run(refused, capsys)
    assert code == 2 and "closing radius must be at least 0" in err and len(err.strip().splitlines()) == 1
    request.write_text("[1, 2]")
    code, _, err = run(refused, capsys)
    assert code == 2 and "must hold a JSON object of options" in err and not (tmp_path / "refused").exists()


def test_threads_option_reaches_the_run_and_its_summary(scan_and_model, tmp_path, capsys):
    from KneeBoneSegLib.threads import available_cores

    truth = scan_and_model / "truth.nrrd"
    for argv, expected in (([], available_cores()), (["--threads", "1"], 1)):
        out = tmp_path / f"out{expected}{len(argv)}"
        code, _, _ = run(
            ["postprocess", truth, "-o", out, "--closing-radius", "2", "--progress", "none", *argv], capsys
        )
        summary = json.loads((out / "summary.json").read_text())
        assert (
            code == 0 and summary["threads"] == expected and sorted(summary["bones"]) == ["femur", "patella", "tibia"]
        )
    code, _, err = run(["postprocess", truth, "-o", tmp_path / "zero", "--threads", "0", "--progress", "none"], capsys)
    assert code == 2 and "threads" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv,field,value",
    [
        (["--fusion", "vote"], "fusion", "vote"),
        (["--aggregate", "or"], "aggregate", "or"),
        (["--stride", "12"], "stride", 12),
        (["--device", "cpu"], "device", "cpu"),
        (["--threshold", "0.3"], "threshold", 0.3),
        (["--closing-units", "voxels"], "closing_radius", 9.0),  # the paper's rule, with its radius
        (["--closing-units", "voxels", "--closing-radius", "4"], "closing_units", "voxels"),
        ([], "closing_radius", 3.2),
        (["--no-fill-holes"], "fill_holes", False),
        (["--smoothing-iterations", "7"], "smoothing_iterations", 7),
        (["--batch-size", "5"], "batch_size", 5),
        (["--projections", "1"], "projections", 1),
        (["--all-tiles"], "skip_air_tiles", False),
    ],
)
def test_every_segment_option_reaches_the_run(scan_and_model, tmp_path, capsys, argv, field, value):
    folder = scan_and_model
    code, _, err = run(
        [
            "segment",
            folder / "knee.nrrd",
            "-o",
            tmp_path / "out",
            "--model",
            folder / "threshold.onnx",
            "--no-surfaces",
            "--progress",
            "none",
            *argv,
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["options"][field] == value


def test_overwrite_replaces_the_outputs_of_an_earlier_run(scan_and_model, tmp_path, capsys):
    argv = ["postprocess", scan_and_model / "truth.nrrd", "-o", tmp_path / "out", "--no-surfaces", "--progress", "none"]
    assert run([*argv, "--closing-radius", "0"], capsys)[0] == 0
    assert run([*argv, "--closing-radius", "1"], capsys)[0] == 2
    assert run([*argv, "--closing-radius", "1", "--overwrite"], capsys)[0] == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["options"]["closing_radius"] == 1


def test_evaluate_prints_a_table_of_each_bone_and_refuses_bad_inputs(scan_and_model, tmp_path, capsys):
    from KneeBoneSegLib.metrics import evaluate_labels

    truth = read_mask(scan_and_model / "truth.nrrd")
    prediction = truth.array.copy()
    prediction[prediction == 3] = 0  # the patella missed
    prediction[30:34, 10:14, 10:14] = 1  # and a false-positive blob called femur
    write_volume(Volume(prediction, truth.geometry), tmp_path / "prediction.nrrd")
    code, out, _ = run(["evaluate", tmp_path / "prediction.nrrd", scan_and_model / "truth.nrrd"], capsys)
    expected = evaluate_labels(prediction, truth.array, truth.geometry.spacing)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert code == 0 and set(rows) == {"femur", "tibia", "patella", "all"}
    for key in rows:
        assert float(rows[key][0]) == pytest.approx(expected[key]["dice"], abs=5e-5), key
    assert float(rows["patella"][0]) == 0.0 and float(rows["tibia"][0]) == 1.0 and float(rows["femur"][0]) < 1.0
    code, _, err = run(["evaluate", tmp_path / "missing.nrrd", scan_and_model / "truth.nrrd"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing.nrrd" in err


@pytest.mark.slow
def test_train_runs_through_the_command_line(scan_and_model, tmp_path, capsys):
    pytest.importorskip("keras", reason="training needs Keras: pip install kneeboneseg[train]")
    folder = scan_and_model
    code, _, err = run(
        [
            "train",
            folder / "knee.nrrd",
            folder / "truth.nrrd",
            "-o",
            tmp_path / "tiny.keras",
            "--base-filters",
            "4",
            "--depth",
            "2",
            "--patch-size",
            "16",
            "--stride",
            "8",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--batch-size",
            "2",
            "--validation-patches",
            "2",
            "--normalization",
            '{"method": "minmax"}',
        ],
        capsys,
    )
    assert code == 0, err
    card = json.loads((tmp_path / "tiny.json").read_text())
    assert card["patch_size"] == 16 and card["training"]["steps"] == 2 and (tmp_path / "tiny.keras").is_file()


def test_asking_for_a_gpu_where_there_is_none_is_a_one_line_error(scan_and_model, tmp_path, capsys):
    from KneeBoneSegLib.network.devices import GPU_PROVIDERS, onnxruntime_providers

    if set(GPU_PROVIDERS) & set(onnxruntime_providers()):
        pytest.skip("ONNX Runtime has a GPU provider on this machine")
    code, _, err = run(
        [
            "segment",
            scan_and_model / "knee.nrrd",
            "-o",
            tmp_path / "out",
            "--model",
            scan_and_model / "threshold.onnx",
            "--device",
            "gpu",
            "--progress",
            "none",
        ],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no GPU" in err and not (tmp_path / "out").exists()
