"""Whole-pipeline time and peak memory on the full sample scan: the default settings and three others, side by side.

    python bench/bench_pipeline.py [--model M.keras]
    python bench/bench_pipeline.py --cube512 [--baseline CHECKOUT] [--model M.keras]

Each configuration runs ``kneeboneseg segment`` in a fresh process (so its
peak resident memory is its own) on the 512 x 512 x 286 scan and reports the
wall time, the time of each stage from its summary.json, the peak memory and
how far its bones agree with the default's (Dice of the label maps).
The default leaves sub-volumes of pure air out of the network, averages
overlapping sub-volumes and ORs the projections; "every tile" is the same
with the network run on all sub-volumes; "stride 16" steps sub-volumes by
half their side instead of the card's 24 voxels (more accurate held out,
slower); the paper's configuration runs all sub-volumes, ORs thresholded
sub-volumes and ORs the projections. All use the same model and
post-processing.

``--cube512`` instead measures the default configuration on a 512 x 512 x 512
scan (see :func:`cube512`) against its memory target, beside the same run of
another checkout of the library (``--baseline``) when one is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _sample import sample_dir

from KneeBoneSegLib.anatomy import BONES
from KneeBoneSegLib.io import read_mask
from KneeBoneSegLib.metrics import dice
from KneeBoneSegLib.outputs import SEGMENTATION_FILE

CONFIGURATIONS = {
    "default": [],
    "every tile": ["--all-tiles"],
    "stride 16": ["--stride", "16"],
    "paper (OR tiles, OR)": ["--all-tiles", "--aggregate", "or", "--fusion", "or"],
}
STAGES = ("normalise", "resample", "network", "fuse", "components", "closing", "fill holes", "surfaces")


def run(scan: Path, extra: list[str], model: str | None, library: Path | None = None) -> tuple[float, float, dict, np.ndarray]:
    """Wall seconds, peak memory (GiB), summary and label map of one segmentation in a child process.

    ``library``: a checkout whose KneeBoneSegLib the child imports instead of this one.
    """
    environment = {**os.environ, "PYTHONPATH": str(library)} if library else None
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "KneeBoneSegLib", "segment", str(scan), "-o", f"{folder}/out", "--progress", "none", *extra]
        if model:
            command += ["--model", model]
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=environment)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource use, peak memory included
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        if child.returncode != 0:
            sys.exit(f"{' '.join(command)} failed")
        peak_kib = usage.ru_maxrss
        summary = json.loads(Path(folder, "out", "summary.json").read_text())
        labels = read_mask(Path(folder, "out", SEGMENTATION_FILE)).array
    return seconds, peak_kib / 2**20, summary, labels


# --- the 512^3 case (issue 12): peak memory of the default run on a 512 x 512 x 512 scan ---------------

#: Peak resident memory a 512^3 scan may take with the shipped model (its own 0.7 mm grid).
CUBE512_TARGET_GIB = 3.0


def cube512_scan(folder: Path) -> Path:
    """The sample scan grown from 286 to 512 slices (mirrored at its ends), at its own 0.35 mm voxels.

    A 512^3 knee scan at the sample's resolution: the bones and the network's
    work grow with the field of view as they would on a longer acquisition.
    """
    from KneeBoneSegLib.io import read_volume, write_volume
    from KneeBoneSegLib.volume import Volume

    scan = read_volume(sample_dir() / "knee_mri.nrrd")
    missing = 512 - scan.array.shape[0]
    array = np.pad(scan.array, ((missing // 2, missing - missing // 2), (0, 0), (0, 0)), mode="symmetric")
    path = folder / "knee_mri_512cubed.nrrd"
    write_volume(Volume(array, scan.geometry.cropped((-(missing // 2), 0, 0))), path)
    return path


def cube512(model: str | None, baseline: Path | None) -> None:
    """Time and peak memory of the default run on :func:`cube512_scan`, and of ``baseline``'s library."""
    with tempfile.TemporaryDirectory() as folder:
        scan = cube512_scan(Path(folder))
        runs = {"this checkout": run(scan, [], model)}
        if baseline:
            runs[f"baseline {baseline.name}"] = run(scan, [], model, library=baseline.resolve())
    print(f"default segmentation of a 512 x 512 x 512 scan (the sample scan's 286 slices mirrored to 512), model {runs['this checkout'][2]['model']['name']}")
    for name, (seconds, peak_gib, _, _) in runs.items():
        verdict = "within" if peak_gib <= CUBE512_TARGET_GIB else "OVER"
        print(f"  {name:28} {seconds:7.1f} s   peak memory {peak_gib:5.2f} GiB ({verdict} the {CUBE512_TARGET_GIB:g} GiB target)")


# --- end of the 512^3 case -------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model file (default: the shipped model)")
    parser.add_argument("--cube512", action="store_true", help="only the 512 x 512 x 512 case: default run, peak memory against its target")
    parser.add_argument("--baseline", type=Path, default=None, help="with --cube512: also run the library of this checkout (e.g. main's)")
    args = parser.parse_args()
    if args.cube512:
        cube512(args.model, args.baseline)
        return
    scan = sample_dir() / "knee_mri.nrrd"
    results = {name: run(scan, extra, args.model) for name, extra in CONFIGURATIONS.items()}
    summary = next(iter(results.values()))[2]
    print(f"whole segmentation of {scan.name} (512 x 512 x 286), model {summary['model']['name']}, device {summary['device']}")
    print(f"{'seconds':22}" + "".join(f"{name:>22}" for name in results))
    for stage in STAGES:
        print(f"  {stage:20}" + "".join(f"{r[2]['timings_s'].get(stage, 0.0):22.1f}" for r in results.values()))
    print(f"{'wall (with start-up)':22}" + "".join(f"{r[0]:22.1f}" for r in results.values()))
    print(f"{'peak memory GiB':22}" + "".join(f"{r[1]:22.2f}" for r in results.values()))
    default_labels = next(iter(results.values()))[3]
    for name, (_, _, run_summary, labels) in results.items():
        bones = ", ".join(f"{k} {v['volume_mm3'] / 1000:.1f} cm3" for k, v in run_summary["bones"].items())
        agreement = ", ".join(f"{bone.key} {dice(labels == bone.label, default_labels == bone.label):.4f}" for bone in BONES)
        print(f"{name}: {bones}; missing: {run_summary['missing'] or 'none'}; Dice with the default: {agreement}")


if __name__ == "__main__":
    main()
