"""Every stage after the network before and after the speed-ups, side by side in one run; then whole segmentations.

    python bench/bench_pipeline.py [--threads N] [--stages-only | --segmentations-only] [--configuration NAME ...] [--also-model M.onnx] [--json OUT.json]
    python bench/bench_pipeline.py --cube512 [--baseline CHECKOUT] [--model M.onnx]

1. Stages, in this process, on the 512 x 512 x 286 sample scan: intensity
   normalisation and resampling to the model's grid (0.7 mm); a probability
   map brought back from the model's grid; components, closing (ball of
   radius 9 voxels), hole filling and the smoothed, checked surfaces of the
   three bones. "before" is the library at the baseline commit
   (``bench/_baseline.py``: scipy distance transforms and hole filling,
   scikit-image marching cubes, ``ndimage.zoom``), "after" this checkout, on
   the same inputs; the last column says how far their results agree. So
   that no network is needed, the probability map is the ground truth's bone
   mask taken to the model's grid (what the network's would be at best), and
   the later stages work on what it gives back. Then the alternatives the
   speed-ups were chosen against, timed on the same data: SimpleITK's
   resampling, ``scipy.ndimage.label`` (against ``cc3d``), VTK's surface nets.
2. Whole segmentations, each ``kneeboneseg segment`` in a fresh process (so
   its peak memory is its own) with the default settings or the named
   configurations: "before" runs the baseline commit's code and its Keras
   model (TensorFlow), "after" this checkout and its shipped model, and
   with ``--also-model`` this checkout with another model; stage times from
   each summary.json, wall time, peak memory, and each label map's Dice with
   the ground truth (a training figure for models trained on that scan);
   ``--json`` writes these figures too (``bench/readme_tables.py`` reads them).

``--cube512`` instead measures the default configuration on a 512 x 512 x 512
scan (see :func:`cube512`) against its memory target, beside the same run of
another checkout of the library (``--baseline``) when one is given, and of a
model on the scan's own grid (``--native-grid``, :func:`native_grid_model`).
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
from _baseline import BASELINE_COMMIT, baseline_module, baseline_tree
from _sample import sample_dir
from scipy.spatial import cKDTree

from KneeBoneSegLib.anatomy import BONES
from KneeBoneSegLib.io.images import read_mask, read_volume
from KneeBoneSegLib.io.outputs import SEGMENTATION_FILE
from KneeBoneSegLib.metrics import dice
from KneeBoneSegLib.threads import thread_count, using_threads

ROOT = Path(__file__).resolve().parents[1]
MODEL_SPACING_MM = 0.7  # the shipped model's grid
CLOSING_RADIUS = 9
ALTERNATIVE_ROUNDS = 5  # the alternatives are timed this many times each, the least kept
STAGE_ROUNDS = 3  # each stage is timed this many times, the median kept: one call varies by up to half a second
CONFIGURATIONS = {
    "default": [],
    "every tile": ["--all-tiles"],
    "stride 16": ["--stride", "16"],
    "paper (OR tiles, OR)": ["--all-tiles", "--aggregate", "or", "--fusion", "or"],
}
STAGES = ("normalise", "resample", "network", "fuse", "components", "closing", "fill holes", "surfaces")


def timed(function, *args, **kwargs):
    """((wall seconds, CPU seconds of all this process's threads), value) of one call.

    On a machine shared with other work the wall time grows with the load;
    the CPU time does not, and bounds the wall time the call would take on
    an idle machine with at least one core.
    """
    start, start_cpu = time.perf_counter(), time.process_time()
    value = function(*args, **kwargs)
    return (time.perf_counter() - start, time.process_time() - start_cpu), value


def best_of(rounds: int, function, *args, **kwargs):
    """:func:`timed`, the least wall and the least CPU seconds of ``rounds`` calls: short calls vary most with the load."""
    times, values = zip(*(timed(function, *args, **kwargs) for _ in range(rounds)))
    return tuple(np.min(times, axis=0)), values[0]


def median_of(rounds: int, call):
    """``call()`` returns ``((wall, CPU), value)``: the median wall and CPU seconds of ``rounds`` calls, and the first value."""
    times, values = zip(*(call() for _ in range(rounds)))
    return tuple(np.median(times, axis=0)), values[0]


def largest_difference(before: np.ndarray, after: np.ndarray) -> str:
    if np.array_equal(before, after):
        return "identical"
    if before.dtype.kind == "f":
        return f"max |difference| {np.abs(before.astype(np.float64) - after).max():.1e}"
    return f"{np.count_nonzero(before != after)} voxels differ"


def mesh_distance_mm(before, after) -> float:
    """Largest distance from a vertex of one mesh to the nearest vertex of the other (mm)."""
    return max(
        cKDTree(after.vertices).query(before.vertices)[0].max(), cKDTree(before.vertices).query(after.vertices)[0].max()
    )


def stage_rows(scan, truth) -> tuple[list, dict]:
    """Before/after seconds and agreement of each post-network stage; the inputs the alternatives use."""
    from KneeBoneSegLib.postprocess.components import label_bones
    from KneeBoneSegLib.postprocess.morphology import close_bones, fill_bone_holes
    from KneeBoneSegLib.postprocess.surfaces import bone_surfaces
    from KneeBoneSegLib.preprocess.normalization import normalize_intensities
    from KneeBoneSegLib.preprocess.resampling import grid_shape_for_spacing, resample_to_shape

    old = {
        name: baseline_module(name) for name in ("normalization", "resampling", "components", "morphology", "surfaces")
    }
    geometry = scan.geometry
    rows = []

    def compare(stage, before_call, after_call, agreement=largest_difference):
        before_s, before = median_of(STAGE_ROUNDS, before_call)
        after_s, after = median_of(STAGE_ROUNDS, after_call)
        rows.append((stage, before_s, after_s, agreement(before, after)))
        return after

    image = compare(
        "normalise",
        lambda: timed(old["normalization"].normalize_intensities, scan.array),
        lambda: timed(normalize_intensities, scan.array),
    )
    model_shape = grid_shape_for_spacing(image.shape, geometry.spacing, MODEL_SPACING_MM)
    compare(
        "resample to the model grid",
        lambda: timed(old["resampling"].resample_to_shape, image, model_shape),
        lambda: timed(resample_to_shape, image, model_shape),
    )
    coarse = resample_to_shape((truth.array > 0).astype(np.float32), model_shape)
    probability = compare(
        "resample back",
        lambda: timed(old["resampling"].resample_to_shape, coarse, image.shape),
        lambda: timed(resample_to_shape, coarse, image.shape),
    )
    bone = probability >= 0.5
    labels = compare(
        "components",
        lambda: timed(lambda: old["components"].label_bones(bone, geometry)[0]),
        lambda: timed(lambda: label_bones(bone, geometry)[0]),
    )
    closed = compare(
        f"closing (radius {CLOSING_RADIUS} voxels)",
        lambda: timed(old["morphology"].close_bones, labels, CLOSING_RADIUS, spacing=geometry.spacing, units="voxels"),
        lambda: timed(close_bones, labels, CLOSING_RADIUS, spacing=geometry.spacing, units="voxels"),
    )
    filled = compare(
        "fill holes", lambda: timed(old["morphology"].fill_bone_holes, closed), lambda: timed(fill_bone_holes, closed)
    )

    def agreement(before: list, after: dict) -> str:
        return "; ".join(
            f"{bone_info.key}: closed {old_one[1]['watertight']} / {new_one[1]['watertight']}, volume {old_one[1]['volume_mm3']:.0f} / {new_one[1]['volume_mm3']:.0f} mm3, "
            f"vertices within {mesh_distance_mm(old_one[0], new_one[0]):.2f} mm"
            for bone_info, old_one, new_one in zip(BONES, before, (after[b.label] for b in BONES))
        )

    compare(
        "surfaces, three bones",
        lambda: timed(
            lambda: [old["surfaces"].bone_surface(filled == bone_info.label, geometry) for bone_info in BONES]
        ),
        lambda: timed(bone_surfaces, filled, geometry),
        agreement,
    )
    return rows, {
        "image": image,
        "coarse": coarse,
        "probability": probability,
        "bone": bone,
        "femur": filled == 1,
        "geometry": geometry,
    }


def alternative_rows(data: dict) -> list:
    """Seconds of the alternatives not adopted, beside what the library does now, on the same inputs."""
    import cc3d
    from scipy import ndimage

    from KneeBoneSegLib.postprocess.surfaces import extract_surface
    from KneeBoneSegLib.preprocess.resampling import resample_to_shape

    rows = []
    library_s, ours = best_of(ALTERNATIVE_ROUNDS, resample_to_shape, data["coarse"], data["image"].shape)
    sitk_s, theirs = best_of(ALTERNATIVE_ROUNDS, sitk_resample, data["coarse"], data["image"].shape)
    rows.append(
        ("resample back: SimpleITK ResampleImageFilter (linear)", sitk_s, library_s, largest_difference(theirs, ours))
    )
    scipy_s, (_, found) = best_of(ALTERNATIVE_ROUNDS, ndimage.label, data["bone"])
    library_s, (_, found_cc3d) = best_of(
        ALTERNATIVE_ROUNDS, cc3d.connected_components, data["bone"], connectivity=6, return_N=True
    )
    rows.append(
        (
            "components: scipy.ndimage.label (cc3d in the library)",
            scipy_s,
            library_s,
            f"{found} / {found_cc3d} components",
        )
    )
    library_s, ours = best_of(ALTERNATIVE_ROUNDS, extract_surface, data["femur"], data["geometry"])
    nets_s, (vertices, faces) = best_of(ALTERNATIVE_ROUNDS, surface_nets, data["femur"])
    rows.append(
        (
            "femur isosurface: vtkSurfaceNets3D",
            nets_s,
            library_s,
            f"{len(vertices)} / {len(ours.vertices)} vertices, {len(faces)} / {len(ours.faces)} triangles",
        )
    )
    return rows


def sitk_resample(array: np.ndarray, shape) -> np.ndarray:
    """Linear resampling with SimpleITK on the run's threads, voxel edges aligned as ``resample_to_shape``."""
    import SimpleITK as sitk

    step = np.asarray(array.shape, float)[::-1] / np.asarray(shape, float)[::-1]
    resample = sitk.ResampleImageFilter()
    resample.SetSize([int(n) for n in shape[::-1]])
    resample.SetOutputSpacing(step.tolist())
    resample.SetOutputOrigin((0.5 * step - 0.5).tolist())
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetNumberOfThreads(thread_count())
    return sitk.GetArrayFromImage(resample.Execute(sitk.GetImageFromArray(array)))


def surface_nets(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangles of VTK's surface nets (smoothing off) on a mask padded with background."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkFiltersCore import vtkSurfaceNets3D

    from KneeBoneSegLib.postprocess.morphology import bounding_box
    from KneeBoneSegLib.postprocess.surfaces import to_vtk_image

    nets = vtkSurfaceNets3D()
    nets.SetInputData(to_vtk_image(np.pad(mask[bounding_box(mask)], 1).astype(np.uint8)))
    nets.SetLabel(0, 1)
    nets.SmoothingOff()
    nets.SetOutputMeshTypeToTriangles()
    nets.Update()
    output = nets.GetOutput()
    return vtk_to_numpy(output.GetPoints().GetData()), vtk_to_numpy(output.GetPolys().GetConnectivityArray()).reshape(
        -1, 3
    )


def run(
    scan: Path, extra: list[str], model: str | None, library: Path | None = None
) -> tuple[float, float, dict, np.ndarray]:
    """Wall seconds, peak memory (GiB), summary and label map of one segmentation in a child process.

    ``library``: a folder holding another ``KneeBoneSegLib`` to run instead of this one.
    """
    environment = dict(os.environ, **({"PYTHONPATH": str(library)} if library else {}))
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            "-m",
            "KneeBoneSegLib",
            "segment",
            str(scan),
            "-o",
            f"{folder}/out",
            "--progress",
            "none",
            *extra,
        ]
        if model:
            command += ["--model", model]
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, cwd=library, env=environment)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource use, peak memory included
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        if child.returncode != 0:
            sys.exit(f"{' '.join(command)} failed")
        peak_kib = usage.ru_maxrss
        summary = json.loads(Path(folder, "out", "summary.json").read_text())
        labels = read_mask(Path(folder, "out", SEGMENTATION_FILE)).array
    return seconds, peak_kib / 2**20, summary, labels


def segmentation_record(seconds: float, peak_gib: float, summary: dict, labels: np.ndarray, truth: np.ndarray) -> dict:
    """What one whole segmentation measured, as ``--json`` writes it."""
    return {
        "model": summary.get("model", {}).get("name"),
        "engine": summary.get("engine", {}),
        "timings_s": summary["timings_s"],
        "wall_s": seconds,
        "peak_memory_gib": peak_gib,
        "training_dice": {bone.key: dice(labels == bone.label, truth == bone.label) for bone in BONES},
    }


def print_table(title: str, header: tuple[str, str], rows: list) -> None:
    """Rows of (stage, (wall, CPU) before, (wall, CPU) after, agreement): seconds side by side."""
    print(title)
    columns = [f"{name} {kind}" for kind in ("wall", "CPU") for name in header]
    print(f"  {'':54}" + "".join(f"{column:>13}" for column in columns) + f"{'CPU ratio':>11}  agreement")
    for stage, before, after, agreement in rows:
        print(
            f"  {stage:54}{before[0]:13.2f}{after[0]:13.2f}{before[1]:13.2f}{after[1]:13.2f}{before[1] / after[1]:10.1f}x  {agreement}"
        )


# --- the 512^3 case (issue 12): peak memory of the default run on a 512 x 512 x 512 scan ---------------

#: Peak resident memory a 512^3 scan may take with the shipped model (its own 0.7 mm grid).
CUBE512_TARGET_GIB = 3.0
#: ... and with a model on the scan's own grid (the paper's: 64^3 tiles at stride 32, three projections).
CUBE512_NATIVE_TARGET_GIB = 6.0


def native_grid_model(folder: Path) -> Path:
    """A stand-in for the paper's model: the tests' threshold network, as ONNX, on the scan's own grid.

    Its card asks for what the paper's network does (64^3 sub-volumes at
    stride 32, no resampling, three projections, OR fusion); its arithmetic
    is one sigmoid per voxel, so a run on the CPU measures the pipeline's
    memory on the native grid in minutes instead of the paper network's hours.
    """
    sys.path.insert(0, str(ROOT / "Testing" / "Python"))
    from conftest import write_threshold_onnx

    from KneeBoneSegLib.network.models import ModelCard

    card = ModelCard(
        name="native-grid stand-in (threshold network)", patch_size=64, stride=32, projections=3, spacing_mm=None
    )
    return write_threshold_onnx(folder / "native_grid.onnx", card, patch_size=64)


def cube512_scan(folder: Path) -> Path:
    """The sample scan grown from 286 to 512 slices (mirrored at its ends), at its own 0.35 mm voxels.

    A 512^3 knee scan at the sample's resolution: the bones and the network's
    work grow with the field of view as they would on a longer acquisition.
    """
    from KneeBoneSegLib.io.images import read_volume, write_volume
    from KneeBoneSegLib.volume import Volume

    scan = read_volume(sample_dir() / "knee_mri.nrrd")
    missing = 512 - scan.array.shape[0]
    array = np.pad(scan.array, ((missing // 2, missing - missing // 2), (0, 0), (0, 0)), mode="symmetric")
    path = folder / "knee_mri_512cubed.nrrd"
    write_volume(Volume(array, scan.geometry.cropped((-(missing // 2), 0, 0))), path)
    return path


def cube512(model: str | None, baseline: Path | None, native_grid: bool = False) -> None:
    """Time and peak memory of the default run on :func:`cube512_scan`, and of ``baseline``'s library.

    ``native_grid``: also the run with :func:`native_grid_model`, against its own target.
    """
    with tempfile.TemporaryDirectory() as folder:
        scan = cube512_scan(Path(folder))
        runs = {"this checkout": (run(scan, [], model), CUBE512_TARGET_GIB)}
        if baseline:
            runs[f"baseline {baseline.name}"] = (run(scan, [], model, library=baseline.resolve()), CUBE512_TARGET_GIB)
        if native_grid:
            runs["native grid (paper's tiling)"] = (
                run(scan, [], str(native_grid_model(Path(folder)))),
                CUBE512_NATIVE_TARGET_GIB,
            )
    print("default segmentation of a 512 x 512 x 512 scan (the sample scan's 286 slices mirrored to 512)")
    for name, ((seconds, peak_gib, summary, _), target) in runs.items():
        verdict = "within" if peak_gib <= target else "OVER"
        print(
            f"  {name:30} {summary['model']['name'][:42]:42} {seconds:7.1f} s   peak memory {peak_gib:5.2f} GiB ({verdict} the {target:g} GiB target)"
        )


# --- end of the 512^3 case -------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="threads for the stages (default: all cores)")
    parser.add_argument("--stages-only", action="store_true", help="skip the whole segmentations")
    parser.add_argument(
        "--configuration",
        action="append",
        choices=CONFIGURATIONS,
        help="whole-segmentation settings to compare (default: default; repeatable)",
    )
    parser.add_argument(
        "--cube512",
        action="store_true",
        help="only the 512 x 512 x 512 case: default run, peak memory against its target",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="with --cube512: also run the library of this checkout (e.g. main's)",
    )
    parser.add_argument("--model", default=None, help="with --cube512: model file (default: the shipped model)")
    parser.add_argument(
        "--also-model",
        type=Path,
        default=None,
        help="whole segmentations: also this checkout with this model, in another column",
    )
    parser.add_argument(
        "--segmentations-only", action="store_true", help="only the whole segmentations, not the stages"
    )
    parser.add_argument(
        "--native-grid",
        action="store_true",
        help="with --cube512: also a model on the scan's own grid (the paper's tiling)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="whole segmentations: also write their figures to this JSON file"
    )
    args = parser.parse_args()
    if args.cube512:
        cube512(args.model, args.baseline, args.native_grid)
        return
    folder = sample_dir()
    # The whole segmentations first: a child's peak memory (ru_maxrss) counts this
    # process's resident memory when it was forked, which the stages below grow.
    if not args.stages_only:
        threads_option = ["--threads", str(args.threads)] if args.threads else []
        recorded = {}
        for name in args.configuration or ["default"]:
            extra = CONFIGURATIONS[name] + threads_option
            scan_path = folder / "knee_mri.nrrd"
            results = {"before": run(scan_path, extra, None, baseline_tree()), "after": run(scan_path, extra, None)}
            if args.also_model:
                results["other model"] = run(scan_path, extra, str(args.also_model))
            print(
                f"whole segmentation, {name} settings, seconds: before = git {BASELINE_COMMIT[:10]} and its model; after = this checkout with "
                f"{results['after'][2]['model']['name']} (engine {results['after'][2].get('engine', {}).get('engine')})"
                + (
                    f"; other model = this checkout with {results['other model'][2]['model']['name']}"
                    if args.also_model
                    else ""
                )
            )
            print(f"  {'':22}" + "".join(f"{column:>16}" for column in results))
            for stage in STAGES:
                print(
                    f"  {stage:22}"
                    + "".join(f"{result[2]['timings_s'].get(stage, 0.0):16.1f}" for result in results.values())
                )
            print(f"  {'wall (with start-up)':22}" + "".join(f"{result[0]:16.1f}" for result in results.values()))
            print(f"  {'peak memory GiB':22}" + "".join(f"{result[1]:16.2f}" for result in results.values()))
            truth = read_mask(folder / "knee_bones_labels.nrrd").array
            for bone in BONES:
                print(
                    f"  {'Dice ' + bone.key:22}"
                    + "".join(
                        f"{dice(result[3] == bone.label, truth == bone.label):16.4f}" for result in results.values()
                    )
                )
            print(
                "  (Dice with the ground truth of the scan the shipped model was trained on: a training figure, not a measure of quality)"
            )
            recorded[name] = {column: segmentation_record(*result, truth) for column, result in results.items()}
        if args.json:
            args.json.write_text(json.dumps(recorded, indent=1) + "\n")
    if args.segmentations_only:
        return
    scan, truth = read_volume(folder / "knee_mri.nrrd"), read_volume(folder / "knee_bones_labels.nrrd")
    with using_threads(args.threads) as threads:
        print(
            f"sample scan {scan.shape_ijk}, {threads} threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; before = git {BASELINE_COMMIT[:10]}, after = this checkout"
        )
        rows, data = stage_rows(scan, truth)
        print_table(
            f"stages after the network, median seconds of {STAGE_ROUNDS} rounds (the probability map: the ground truth's bone mask taken to the model's grid)",
            ("before", "after"),
            rows,
        )
        before, after = [np.sum([row[side] for row in rows], axis=0) for side in (1, 2)]
        print(
            f"  {'all of them':54}{before[0]:13.2f}{after[0]:13.2f}{before[1]:13.2f}{after[1]:13.2f}{before[1] / after[1]:10.1f}x"
        )
        print_table(
            f"alternatives measured on the same data, least seconds of {ALTERNATIVE_ROUNDS} rounds",
            ("them", "library"),
            alternative_rows(data),
        )


if __name__ == "__main__":
    main()
