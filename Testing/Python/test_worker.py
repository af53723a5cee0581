"""The worker runner the Slicer module uses, with real child processes (no Slicer needed).

Each worker here is a small Python script that speaks the ``--progress json``
protocol of ``kneeboneseg``; the last test runs the real command line.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from KneeBoneSegLib.slicer.worker import WorkerProcess, worker_environment

LIBRARY_FOLDER = str(Path(__file__).resolve().parents[2])


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(path)]


def _work_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting to be reaped has ended)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _poll_until(worker: WorkerProcess, condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out; worker output: {worker.output!r}"
        worker.poll()
        time.sleep(0.02)


def test_progress_arrives_while_the_worker_runs(tmp_path):
    release = tmp_path / "release"
    command = _script(
        tmp_path,
        f"""
        import json, os, time
        print(json.dumps({{"stage": "Predicting", "fraction": 0.25}}), flush=True)
        while not os.path.exists({str(release)!r}):
            time.sleep(0.02)
        print(json.dumps({{"done": True, "outputs": ["a.stl"]}}), flush=True)
        """,
    )
    seen = []
    worker = WorkerProcess(
        command, _work_folder(tmp_path), on_progress=lambda stage, fraction: seen.append((stage, fraction))
    )
    _poll_until(worker, lambda: seen)
    assert seen == [("Predicting", 0.25)]
    assert worker.poll(), "the worker is still waiting, so poll must say it runs"
    release.touch()
    worker.wait(poll_interval=0.02)
    assert worker.outputs == ["a.stl"] and worker.error is None and not worker.cancelled
    assert worker.work_folder.is_dir(), "a finished run keeps its folder for the caller to load"


def test_cancel_ends_the_worker_and_its_children_within_a_second(tmp_path):
    command = _script(
        tmp_path,
        """
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("grandchild", grandchild.pid, flush=True)
        time.sleep(120)
        """,
    )
    work_folder = _work_folder(tmp_path)
    (work_folder / "input.nrrd").write_bytes(b"partial")
    worker = WorkerProcess(command, work_folder)
    _poll_until(worker, lambda: "grandchild" in worker.output)
    grandchild = int(worker.output.split()[1])
    assert _alive(worker.pid) and _alive(grandchild)

    started = time.monotonic()
    worker.cancel()
    while (_alive(worker.pid) or _alive(grandchild)) and time.monotonic() - started < 1.0:
        time.sleep(0.01)
    assert not _alive(worker.pid), "the worker still runs a second after Cancel"
    assert not _alive(grandchild), "the worker's child still runs a second after Cancel"
    assert not work_folder.exists(), "Cancel left the run's temporary folder"
    assert worker.cancelled and worker.error is None and worker.outputs is None
    assert not worker.poll()


def test_a_crashing_worker_surfaces_its_last_error_line(tmp_path):
    command = _script(
        tmp_path,
        """
        import json
        print(json.dumps({"stage": "Loading", "fraction": 0.0}), flush=True)
        print("reading the model", flush=True)
        raise MemoryError("unable to allocate 3.2 GiB for the probability map")
        """,
    )
    work_folder = _work_folder(tmp_path)
    worker = WorkerProcess(command, work_folder).wait(poll_interval=0.02)
    assert worker.error.endswith("MemoryError: unable to allocate 3.2 GiB for the probability map"), worker.error
    assert "exit code 1" in worker.error
    assert not work_folder.exists(), "a failed run must not leave its temporary folder"


def test_a_worker_message_is_its_error(tmp_path):
    command = _script(tmp_path, 'import json; print(json.dumps({"error": "the volume is 2D; choose a 3D MRI"}))')
    worker = WorkerProcess(command, _work_folder(tmp_path)).wait(poll_interval=0.02)
    assert worker.error == "the volume is 2D; choose a 3D MRI"


def test_invalid_utf8_output_neither_hangs_nor_loses_the_result(tmp_path):
    # 1 MiB of undecodable bytes: far more than a pipe holds, so a reader that
    # died on a UnicodeDecodeError would leave the child blocked for ever.
    command = _script(
        tmp_path,
        """
        import json, sys
        for _ in range(16384):
            sys.stdout.buffer.write(b"\\xff\\xfe r\\xc3\\x28sum\\xe9 " * 4 + b"\\n")
        sys.stdout.buffer.write(b"no newline at the end \\xff")
        sys.stdout.buffer.write(b"\\n" + json.dumps({"done": True, "outputs": []}).encode() + b"\\n")
        sys.stdout.buffer.write(b"trailing \\xe9")
        """,
    )
    started = time.monotonic()
    worker = WorkerProcess(command, _work_folder(tmp_path)).wait(poll_interval=0.02)
    assert time.monotonic() - started < 30
    assert worker.outputs == [] and worker.error is None
    assert "\ufffd" in worker.output
    assert worker.output.rstrip().endswith("trailing \ufffd"), "the last line without a newline was lost"


def test_worker_environment_puts_the_library_first_and_ignores_user_settings(tmp_path):
    home = tmp_path / "home"
    (home / ".keras").mkdir(parents=True)
    (home / ".keras" / "keras.json").write_text(json.dumps({"backend": "jax"}))
    base = {
        **os.environ,
        "HOME": str(home),
        "USERPROFILE": str(home),
        "PYTHONPATH": os.pathsep.join(["/elsewhere", LIBRARY_FOLDER]),
    }
    base.pop("KERAS_BACKEND", None)
    environment = worker_environment(base, LIBRARY_FOLDER)
    assert environment["PYTHONPATH"].split(os.pathsep) == [LIBRARY_FOLDER, "/elsewhere"]

    command = _script(
        tmp_path,
        """
        import json, os, site, KneeBoneSegLib
        print(json.dumps({"done": True, "outputs": [
            KneeBoneSegLib.__file__, str(site.ENABLE_USER_SITE), os.environ["KERAS_BACKEND"]]}))
        """,
    )
    worker = WorkerProcess(command, _work_folder(tmp_path), environment).wait(poll_interval=0.02)
    assert worker.error is None, worker.error
    library_file, user_site, backend = worker.outputs
    assert Path(library_file).resolve().parent == Path(LIBRARY_FOLDER, "KneeBoneSegLib")
    assert user_site == "False", "the user's site-packages could shadow the checked packages"
    assert backend == "tensorflow", "~/.keras/keras.json must not choose the Keras backend"


def test_the_real_command_line_reports_a_user_error_through_the_runner(tmp_path):
    missing = tmp_path / "no-such-scan.nrrd"
    command = [
        sys.executable,
        "-m",
        "KneeBoneSegLib",
        "postprocess",
        str(missing),
        "-o",
        str(tmp_path / "out"),
        "--progress",
        "json",
    ]
    worker = WorkerProcess(command, _work_folder(tmp_path), worker_environment(os.environ, LIBRARY_FOLDER)).wait(
        poll_interval=0.05
    )
    assert worker.outputs is None
    assert str(missing.name) in worker.error and "Traceback" not in worker.error


#: A block of the sample scan across the joint line (k, j, i): parts of all three bones, 5 % of the voxels.
SAMPLE_CROP = (slice(64, 176), slice(112, 304), slice(136, 296))


@pytest.mark.sample
@pytest.mark.slow
def test_the_worker_segments_a_crop_of_the_sample_scan(sample_dir, sample_labels, tmp_path):
    """What the Slicer module runs, end to end: the real command line in a worker, on real data."""
    from KneeBoneSegLib.anatomy import BONES
    from KneeBoneSegLib.io.images import read_volume, write_volume
    from KneeBoneSegLib.metrics import dice
    from KneeBoneSegLib.volume import Volume

    scan = read_volume(sample_dir / "knee_mri.nrrd")
    corner = [crop.start for crop in SAMPLE_CROP][::-1]  # i, j, k
    geometry = type(scan.geometry)(
        scan.geometry.spacing, tuple(scan.geometry.index_to_lps(np.array(corner, float))), scan.geometry.direction
    )
    crop_path = tmp_path / "crop.nrrd"
    write_volume(Volume(scan.array[SAMPLE_CROP], geometry), crop_path)

    work_folder = _work_folder(tmp_path)
    command = [
        sys.executable,
        "-m",
        "KneeBoneSegLib",
        "segment",
        str(crop_path),
        "-o",
        str(work_folder / "output"),
        "--projections",
        "1",
        "--device",
        "cpu",
        "--save-probability",
        "--progress",
        "json",
    ]
    stages = []
    worker = WorkerProcess(
        command,
        work_folder,
        worker_environment(os.environ, LIBRARY_FOLDER),
        lambda stage, fraction: stages.append(fraction),
    )
    worker.wait(poll_interval=0.05)
    assert worker.error is None, worker.error
    assert stages, "no progress arrived while the worker ran"
    written = {Path(path).name for path in worker.outputs}
    assert {
        "segmentation.seg.nrrd",
        "probability.nrrd",
        "summary.json",
        "femur.stl",
        "tibia.stl",
        "patella.stl",
    } <= written

    labels = read_volume(work_folder / "output" / "segmentation.seg.nrrd")
    np.testing.assert_allclose(labels.geometry.origin, geometry.origin, atol=1e-6)
    # Each bone where the ground truth has it. Not a quality figure (one projection,
    # bones cut by the crop's faces; held-out quality is measured in bench/).
    truth = sample_labels.array[SAMPLE_CROP]
    scores = {bone.name: dice(labels.array == bone.label, truth == bone.label) for bone in BONES}
    assert min(scores.values()) > 0.6, scores


def test_the_sample_command_reports_through_the_runner(tmp_path):
    """Sample Data's download in Slicer runs ``kneeboneseg sample --progress json`` in a worker."""
    absent = (tmp_path / "absent.zip").as_uri()
    command = [
        sys.executable,
        "-m",
        "KneeBoneSegLib",
        "sample",
        "-o",
        str(tmp_path / "sample"),
        "--url",
        absent,
        "--progress",
        "json",
    ]
    worker = WorkerProcess(command, _work_folder(tmp_path), worker_environment(os.environ, LIBRARY_FOLDER)).wait(
        poll_interval=0.05
    )
    assert worker.outputs is None and worker.error.startswith("could not download the sample scan from"), worker.error
    assert not (tmp_path / "sample").exists()


def test_the_sample_is_assembled_by_a_worker_whose_error_comes_back_in_one_line(tmp_path):
    """What Sample Data's button runs: ``kneeboneseg sample`` in the background; here into a folder that is not empty."""
    from KneeBoneSegLib.slicer.logic import SegmentationRuns

    (tmp_path / "temp").mkdir()
    taken = tmp_path / "KneeBones3Dify"
    taken.mkdir()
    (taken / "notes.txt").write_text("the user's")
    idle = []
    error = SegmentationRuns(
        [sys.executable], str(Path(__file__).resolve().parents[2]), str(tmp_path / "temp")
    ).assemble_sample(taken, on_idle=lambda: idle.append(1))
    assert error and "\n" not in error and str(taken) in error
    assert (taken / "notes.txt").read_text() == "the user's" and not list((tmp_path / "temp").iterdir())
