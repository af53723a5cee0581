"""The engines that run the shipped network, side by side in one run: speed, whole segmentation, install size.

    python bench/bench_engines.py [--rounds 5] [--parts 1,2,3,4]

1. Per sub-volume: the shipped model on batches of 32 real 32^3 sub-volumes of
   the sample scan (tissue, not air), on Keras + TensorFlow (the engine before
   ONNX), ONNX Runtime and OpenVINO, in interleaved rounds so that each engine
   sees the same machine load; the median of the rounds.
2. The whole network stage on the 512 x 512 x 286 sample scan (three
   projections, default tiling) with each engine, and the largest difference
   between their probability maps.
3. A whole ``kneeboneseg segment`` of the sample scan in a fresh process with
   each engine: wall time and peak memory.
4. What ``pip install`` brings: the size of a fresh virtual environment with
   ``kneeboneseg`` alone and with ``kneeboneseg[train]``, and the download size
   of the ONNX Runtime wheel for each platform and Python that 3D Slicer ships.
Needs the ``[train]`` and ``[openvino]`` extras and KNEEBONESEG_SAMPLE_DIR.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from _sample import sample_dir
from bench_pipeline import run as run_segment

from KneeBoneSegLib.inference import air_level
from KneeBoneSegLib.io import read_volume
from KneeBoneSegLib.models import SHIPPED_MODEL, load_model
from KneeBoneSegLib.normalization import normalize_intensities
from KneeBoneSegLib.pipeline import SegmentOptions, predict_projection_maps
from KneeBoneSegLib.resampling import grid_shape_for_spacing, resample_to_shape

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "Resources" / "Models"
ENGINES = {  # name: (model file, --engine)
    "keras (TensorFlow)": (Path(SHIPPED_MODEL).with_suffix(".keras").name, "auto"),
    "onnxruntime": (SHIPPED_MODEL, "onnxruntime"),
    "openvino": (SHIPPED_MODEL, "openvino"),
}
#: What 3D Slicer runs on: (Python, pip platform tag) for Windows, macOS Intel, macOS Apple and Linux.
SLICER_PLATFORMS = [
    (python, tag)
    for python in ("3.9", "3.12")
    for tag in ("win_amd64", "macosx_13_0_x86_64", "macosx_14_0_arm64", "manylinux_2_28_x86_64")
]


def tissue_batches(scan, card, count: int, size: int = 32) -> list[np.ndarray]:
    """``count`` batches of ``size`` sub-volumes of the scan on the model's grid, each holding tissue."""
    image = normalize_intensities(scan.array, card.normalization)
    image = resample_to_shape(image, grid_shape_for_spacing(image.shape, scan.geometry.spacing, card.spacing_mm), order=1)
    level, p = air_level(image), card.patch_size
    rng = np.random.default_rng(0)
    tiles = []
    while len(tiles) < count * size:
        corner = [rng.integers(0, n - p) for n in image.shape]
        tile = image[tuple(slice(c, c + p) for c in corner)]
        if tile.max() >= level:
            tiles.append(tile)
    return [np.stack(tiles[n * size : (n + 1) * size])[..., None].astype(np.float32) for n in range(count)]


def per_subvolume_ms(networks: dict, batches: list[np.ndarray], rounds: int) -> dict:
    """Median milliseconds per sub-volume of each network, over interleaved rounds of all batches."""
    for network in networks.values():
        network.predict_on_batch(batches[0])  # warm-up: graph compilation, thread pools
    times = {name: [] for name in networks}
    for _ in range(rounds):
        for name, network in networks.items():
            start = time.perf_counter()
            for batch in batches:
                network.predict_on_batch(batch)
            times[name].append((time.perf_counter() - start) * 1000 / sum(len(b) for b in batches))
    return {name: statistics.median(values) for name, values in times.items()}


def venv_size_mib(requirement: str) -> float:
    """MiB of a fresh virtual environment after ``pip install requirement`` (pip's own files included)."""
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "venv", folder], check=True)
        subprocess.run([f"{folder}/bin/python", "-m", "pip", "install", "--quiet", "--no-cache-dir", requirement], check=True, cwd=ROOT)
        return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def wheel_mib(package: str, python: str, tag: str) -> tuple[str, float]:
    """The wheel pip picks for ``package`` on a platform and Python, and its download size in MiB."""
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
             "--python-version", python, "--platform", tag, "-d", folder, package],
            check=True, capture_output=True,
        )  # fmt: skip
        (wheel,) = Path(folder).glob("*.whl")
        return wheel.name, wheel.stat().st_size / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the per-sub-volume timing")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run (4 downloads TensorFlow; its sizes do not depend on load)")
    args = parser.parse_args()
    parts = {int(part) for part in args.parts.split(",")}
    if 4 in parts:
        print_install_sizes()
    if 3 in parts:
        # First, while this process is small: a child's peak memory counts what it was forked from.
        print_whole_runs(sample_dir() / "knee_mri.nrrd")
    if parts & {1, 2}:
        print_speeds(parts, args.rounds)


def print_speeds(parts: set, rounds: int) -> None:
    """Parts 1 and 2: the engines' speed on the sample scan."""
    scan_path = sample_dir() / "knee_mri.nrrd"
    scan = read_volume(scan_path)
    models = {name: load_model(MODELS / file, engine=engine, device="cpu") for name, (file, engine) in ENGINES.items()}
    card = models["onnxruntime"].card
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {platform.machine()}, {cpus} CPU cores, {platform.python_implementation()} {platform.python_version()}, no GPU used")
    print(f"model: {card.name} ({card.patch_size}^3 sub-volumes at {card.spacing_mm[0]} mm); scan: {scan_path.name} 512 x 512 x 286")
    for name, model in models.items():
        described = model.network.describe()
        print(f"  {name:20} {described['engine']} {described['version']} ({described['provider']}, threads {described['threads']})")

    if 1 in parts:
        print(f"\n1. milliseconds per sub-volume, batches of 32 tissue sub-volumes, median of {rounds} interleaved rounds")
        per_tile = per_subvolume_ms({name: model.network for name, model in models.items()}, tissue_batches(scan, card, 4), rounds)
        for name, ms in per_tile.items():
            print(f"  {name:20} {ms:8.1f} ms")
    if 2 in parts:
        print_network_stage(scan, models)


def print_network_stage(scan, models: dict) -> None:
    """Part 2: the network stage of each engine on the whole scan, and how far their probabilities differ."""
    print("\n2. the network stage on the whole scan (3 projections, default tiling, air sub-volumes left out)")
    maps = {}
    for name, model in models.items():
        start = time.perf_counter()
        maps[name] = predict_projection_maps(scan, model, SegmentOptions(device="cpu"))
        print(f"  {name:20} {time.perf_counter() - start:8.1f} s")
    reference = maps["keras (TensorFlow)"]
    for name in ("onnxruntime", "openvino"):
        difference = max(float(np.abs(a - b).max()) for a, b in zip(maps[name], reference))
        print(f"  largest probability difference {name} vs Keras: {difference:.1e}")


def print_whole_runs(scan_path: Path) -> None:
    """Part 3: a whole segmentation with each engine in a fresh process."""
    print("\n3. whole `kneeboneseg segment` of the scan in a fresh process")
    print(f"  {'engine':20} {'wall s':>8} {'network s':>10} {'peak GiB':>9}")
    for name, (file, engine) in ENGINES.items():
        seconds, peak_gib, summary, _ = run_segment(scan_path, ["--engine", engine], str(MODELS / file))
        print(f"  {name:20} {seconds:8.1f} {summary['timings_s']['network']:10.1f} {peak_gib:9.2f}")


def print_install_sizes() -> None:
    """Part 4: what pip installs, and the ONNX Runtime download for each platform Slicer runs on."""
    print("\n4. install size")
    for requirement in (".", ".[train]"):
        print(f"  fresh venv + pip install {requirement:9} {venv_size_mib(requirement):8.0f} MiB")
    print("  download of the ONNX Runtime wheel that Slicer's Python gets:")
    for python, tag in SLICER_PLATFORMS:
        wheel, mib = wheel_mib("onnxruntime", python, tag)
        print(f"    Python {python} {tag:24} {mib:6.1f} MiB  {wheel}")


if __name__ == "__main__":
    main()
