"""``kneeboneseg batch`` and ``segment_many``: a cohort into one folder and one table, resumable, faults contained."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import knee_phantom, write_threshold_onnx

from KneeBoneSegLib.batch import COLUMNS, TABLE_FILE, Case, failures, find_cases, segment_many
from KneeBoneSegLib.errors import InputError
from KneeBoneSegLib.io.images import read_volume, write_volume
from KneeBoneSegLib.network.models import ModelCard
from KneeBoneSegLib.options import SegmentOptions
from KneeBoneSegLib.volume import Volume

LIBRARY_FOLDER = str(Path(__file__).resolve().parents[2])


def _table(folder: Path) -> list[dict]:
    with open(folder / TABLE_FILE, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Two phantom knees, a corrupt file and a small real ONNX model that segments the phantoms."""
    folder = tmp_path_factory.mktemp("phantoms")
    image, _, geometry = knee_phantom()
    write_volume(Volume(image, geometry), folder / "left.nrrd")
    write_volume(Volume(image[:, :, ::-1].copy(), geometry), folder / "right.nii.gz")
    (folder / "broken.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\n")
    card = ModelCard(name="threshold", patch_size=16, stride=8, normalization={"method": "minmax"})
    write_threshold_onnx(folder / "threshold.onnx", card)
    return folder


def _command_line_options(phantoms) -> list:
    """:func:`_options`' model and settings as ``kneeboneseg`` flags, without a progress bar."""
    model = str(phantoms / "threshold.onnx")
    return [
        "--model",
        model,
        "--closing-radius",
        "2",
        "--smoothing-iterations",
        "2",
        "--device",
        "cpu",
        "--progress",
        "none",
    ]


def _options(phantoms, **changes) -> SegmentOptions:
    settings = dict(model=str(phantoms / "threshold.onnx"), closing_radius=2.0, smoothing_iterations=2, device="cpu")
    return SegmentOptions(**{**settings, **changes})


def test_cases_come_from_files_csv_rows_and_dicom_series(phantoms, tmp_path):
    cases = find_cases([phantoms / "left.nrrd", phantoms / "right.nii.gz", phantoms / "left.nrrd"])
    assert [case.id for case in cases] == ["left", "right", "left-2"]
    table = tmp_path / "cohort.csv"
    table.write_text(
        f"id,path\nknee 1,{os.path.relpath(phantoms / 'left.nrrd', tmp_path)}\nknee 2,{phantoms / 'right.nii.gz'}\n"
    )
    assert find_cases([table]) == [
        Case("knee_1", (phantoms / "left.nrrd").resolve()),
        Case("knee_2", phantoms / "right.nii.gz"),
    ]
    with pytest.raises(InputError, match="does not exist"):
        find_cases([tmp_path / "absent.nrrd"])
    (tmp_path / "bad.csv").write_text("name,file\nx,y\n")
    with pytest.raises(InputError, match="no id and path columns"):
        find_cases([tmp_path / "bad.csv"])


def test_a_folder_is_a_case_per_image_file_in_its_tree_without_a_library_warning(phantoms, tmp_path, capfd):
    scans = tmp_path / "scans"
    (scans / "site b").mkdir(parents=True)
    volume = read_volume(phantoms / "left.nrrd")
    for name in ("knee01.nrrd", "knee02.mha", "site b/knee03.nii.gz", "site b/knee04.nii"):
        write_volume(volume, scans / name)
    (scans / "knee02.mha").rename(scans / "knee02.MHA")  # suffixes in any case
    (scans / "notes.txt").write_text("not a scan")
    (scans / "knee01.seg.nrrd").write_bytes((phantoms / "left.nrrd").read_bytes())  # a segmentation, not a scan
    cases = find_cases([scans])
    assert [(case.id, case.input.relative_to(scans).as_posix()) for case in cases] == [
        ("knee01", "knee01.nrrd"),
        ("knee02", "knee02.MHA"),
        ("knee03", "site b/knee03.nii.gz"),
        ("knee04", "site b/knee04.nii"),
    ]
    assert "GDCM" not in capfd.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no cases found"):
        find_cases([tmp_path / "empty"])


def test_each_dicom_series_is_a_case_named_from_its_tags(sample_dicom, phantoms, tmp_path):
    (case,) = find_cases([sample_dicom.parent / sample_dicom.name])
    assert case.input.parent == sample_dicom and "_" in case.id
    assert read_volume(case.input).array.shape[0] == 16  # the case's first file reads its whole series
    tree = tmp_path / "tree"
    shutil.copytree(sample_dicom, tree / "dicom")
    shutil.copy(phantoms / "left.nrrd", tree / "left.nrrd")
    assert [(found.id, found.input.parent.name) for found in find_cases([tree])] == [
        ("left", "tree"),
        (case.id, "dicom"),
    ]


def test_a_cohort_runs_once_resumes_and_contains_its_faults(phantoms, tmp_path):
    cases = find_cases([phantoms / "left.nrrd", phantoms / "broken.nrrd", phantoms / "right.nii.gz"])
    seen = []
    rows = segment_many(
        cases, tmp_path / "cohort", _options(phantoms), progress=lambda done, total, row: seen.append((done, total))
    )
    assert [row["status"] for row in rows] == ["ok", "error", "ok"] and seen[-1] == (3, 3)
    assert "broken.nrrd" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert failures(rows) == 1
    table = _table(tmp_path / "cohort")
    assert list(table[0]) == COLUMNS and [row["id"] for row in table] == ["left", "broken", "right"]
    assert (
        float(table[0]["femur_volume_mm3"]) > 0
        and table[0]["femur_verdict"] == "ok"
        and len(table[0]["model_sha256"]) == 64
    )
    assert (tmp_path / "cohort" / "left" / "femur.stl").is_file() and (
        tmp_path / "cohort" / "logs" / "left.log"
    ).read_text()

    summary = tmp_path / "cohort" / "left" / "summary.json"
    written = summary.stat().st_mtime_ns
    again = segment_many(cases, tmp_path / "cohort", _options(phantoms))
    assert again == rows or [row["status"] for row in again] == ["ok", "error", "ok"]
    assert summary.stat().st_mtime_ns == written, "a case done for the same input, model and options is not run again"

    # An option that changes the bones runs the cases again; one that does not (threads) does not.
    segment_many(cases, tmp_path / "cohort", _options(phantoms, threads=1))
    assert summary.stat().st_mtime_ns == written
    segment_many(cases, tmp_path / "cohort", _options(phantoms, closing_radius=1.0))
    assert summary.stat().st_mtime_ns != written

    # The failed case is run again only when asked, and still fails alone.
    error_file = tmp_path / "cohort" / "broken" / "error.json"
    before = error_file.stat().st_mtime_ns
    segment_many(cases, tmp_path / "cohort", _options(phantoms, closing_radius=1.0))
    assert error_file.stat().st_mtime_ns == before
    retried = segment_many(cases, tmp_path / "cohort", _options(phantoms, closing_radius=1.0), retry_failed=True)
    assert error_file.stat().st_mtime_ns != before and retried[1]["status"] == "error"


@pytest.mark.slow
def test_two_worker_processes_give_the_same_table(phantoms, tmp_path):
    cases = find_cases([phantoms / "left.nrrd", phantoms / "broken.nrrd", phantoms / "right.nii.gz"])
    alone = segment_many(cases, tmp_path / "one", _options(phantoms))
    shared = segment_many(cases, tmp_path / "two", _options(phantoms), workers=2)
    columns = ["id", "status", "femur_volume_mm3", "tibia_volume_mm3", "patella_volume_mm3", "model_sha256"]
    assert [[row[c] for c in columns] for row in shared] == [[row[c] for c in columns] for row in alone]
    assert [row["id"] for row in _table(tmp_path / "two")] == ["left", "broken", "right"]


def test_the_command_line_counts_failures_in_its_exit_status(phantoms, tmp_path):
    from KneeBoneSegLib.cli import main

    argv = ["batch", str(phantoms / "left.nrrd"), str(phantoms / "broken.nrrd"), "-o", str(tmp_path / "cohort")]
    argv += _command_line_options(phantoms)
    assert main(argv) == 1
    assert [row["status"] for row in _table(tmp_path / "cohort")] == ["ok", "error"]
    assert main(["batch", str(tmp_path / "absent.nrrd"), "-o", str(tmp_path / "other"), "--progress", "none"]) == 2


def test_batch_writes_for_each_case_what_segment_writes_for_the_same_options(phantoms, tmp_path):
    from KneeBoneSegLib.cli import main

    flags = [*_command_line_options(phantoms), "--nifti", "--save-probability", "--save-uncertainty"]
    assert main(["segment", str(phantoms / "left.nrrd"), "-o", str(tmp_path / "alone"), *flags]) == 0
    assert main(["batch", str(phantoms / "left.nrrd"), "-o", str(tmp_path / "cohort"), *flags]) == 0
    written = sorted(path.name for path in (tmp_path / "alone").iterdir())
    assert {"labels.nii.gz", "probability.nrrd", "uncertainty.nrrd"} <= set(written)
    assert sorted(path.name for path in (tmp_path / "cohort" / "left").iterdir()) == written
    assert (
        read_volume(tmp_path / "cohort" / "left" / "labels.nii.gz").array.tolist()
        == read_volume(tmp_path / "alone" / "labels.nii.gz").array.tolist()
    )


@pytest.fixture(scope="module")
def sample_cohort(sample_dir, tmp_path_factory):
    """Two crops of the sample scan and the whole scan, a corrupt file and a volume with no knee in it."""
    folder = tmp_path_factory.mktemp("sample_cohort")
    scan = read_volume(sample_dir / "knee_mri.nrrd")
    paths = []
    # crop-b is the whole knee, so that it takes several seconds: the signal arrives while it runs.
    for name, start, size in (
        ("crop-a", (64, 112, 136), (112, 192, 160)),
        ("crop-b", (0, 0, 0), scan.array.shape),
        ("crop-c", (56, 104, 132), (112, 192, 160)),
    ):
        box = tuple(slice(s, s + n) for s, n in zip(start, size))
        write_volume(Volume(scan.array[box], scan.geometry.cropped(start)), folder / f"{name}.nrrd")
        paths.append(folder / f"{name}.nrrd")
    (folder / "corrupt.nrrd").write_bytes((folder / "crop-a.nrrd").read_bytes()[:2000])
    paths.append(folder / "corrupt.nrrd")
    smooth = np.random.default_rng(3).random((60, 60, 60)).astype(np.float32)
    write_volume(Volume(smooth * 100, scan.geometry), folder / "no-knee.nrrd")
    paths.append(folder / "no-knee.nrrd")
    return paths


@pytest.mark.slow
def test_a_batch_interrupted_by_a_signal_goes_on_where_it_stopped(sample_cohort, tmp_path):
    out = tmp_path / "cohort"
    command = [
        sys.executable,
        "-m",
        "KneeBoneSegLib",
        "batch",
        *map(str, sample_cohort),
        "-o",
        str(out),
        "--projections",
        "1",
        "--device",
        "cpu",
        "--progress",
        "none",
    ]
    environment = dict(os.environ, PYTHONPATH=LIBRARY_FOLDER)
    # A shell starts background jobs with SIGINT ignored, and children inherit that: restore Ctrl-C's default.
    first = subprocess.Popen(
        command,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while (
        not ((out / TABLE_FILE).is_file() and len(_table(out)) >= 1)
        and time.monotonic() < deadline
        and first.poll() is None
    ):
        time.sleep(0.02)
    first.send_signal(signal.SIGINT)  # a real Ctrl-C, after the first case has ended
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert "run the same command to go on" in err
    done_first = out / "crop-a" / "summary.json"
    written = done_first.stat().st_mtime_ns

    second = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    table = _table(out)
    assert [row["id"] for row in table] == ["crop-a", "crop-b", "crop-c", "corrupt", "no-knee"]
    assert done_first.stat().st_mtime_ns == written, "the case finished before the interruption is not run again"
    statuses = {row["id"]: row["status"] for row in table}
    assert all(statuses[name] in ("ok", "review") for name in ("crop-a", "crop-b", "crop-c")), statuses
    assert statuses["corrupt"] == "error" and table[3]["error"] and "\n" not in table[3]["error"]
    assert statuses["no-knee"] in ("failed", "error"), statuses
    assert second.returncode == 2 == failures(table), second.stderr


@pytest.mark.slow
def test_a_cohort_on_a_local_dask_cluster_survives_a_lost_worker(sample_cohort, tmp_path):
    """A real LocalCluster of 2 worker processes; the one running crop-b is killed in the middle of it."""
    import threading

    distributed = pytest.importorskip(
        "distributed", reason='the cluster path needs Dask: pip install "kneeboneseg[cluster]"'
    )
    cases = find_cases(sample_cohort[:3])
    out = tmp_path / "cohort"
    killed = {}

    def kill_the_worker_of_crop_b(client):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (out / "logs" / "crop-b.log").is_file():  # the case has started
            time.sleep(0.05)
        time.sleep(0.5)
        for address, keys in client.processing().items():
            if any("crop-b" in str(key) for key in keys):
                pid = client.run(os.getpid, workers=[address])[address]
                os.kill(pid, signal.SIGKILL)
                killed[address] = pid
                return

    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        watcher = threading.Thread(target=kill_the_worker_of_crop_b, args=(client,))
        watcher.start()
        rows = segment_many(cases, out, SegmentOptions(projections=1, device="cpu"), client=client)
        watcher.join()
    assert killed, "the worker running crop-b was not found to kill"
    assert [row["id"] for row in _table(out)] == ["crop-a", "crop-b", "crop-c"]
    assert all(row["status"] in ("ok", "review") for row in rows), rows
    assert not list(out.glob(".*")), "a killed worker's half-written output remains"
    assert {"segmentation.seg.nrrd", "summary.json", "femur.stl"} <= {path.name for path in (out / "crop-b").iterdir()}
