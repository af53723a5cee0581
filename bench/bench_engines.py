"""Every engine and precision that runs the shipped network, side by side in one run.

    python bench/bench_engines.py [--rounds 5] [--parts 1,2,3,4] [--venv-sizes]

The choices are Keras + TensorFlow (the engine before ONNX), ONNX Runtime
(the default) and OpenVINO, each in float32, and OpenVINO in bfloat16 where
the CPU has bfloat16 units. Every figure is measured against ONNX Runtime in
float32, the reference.

1. Per sub-volume: the shipped model on batches of 32 real 32^3 sub-volumes
   of the sample scan (tissue, not air), in interleaved rounds so that each
   choice sees the same machine load; the median of the rounds, and the
   largest probability difference from the reference on those batches.
   ONNX Runtime is also timed as it could be set up otherwise: on a
   channels-first graph (input and output without the layout reshapes),
   without spinning threads, with basic graph optimisation only.
2. The whole network stage on the 512 x 512 x 286 sample scan (three
   projections, default tiling) with each choice, and the largest difference
   of its probability maps from the reference's.
3. A whole ``kneeboneseg segment`` of the sample scan in a fresh process with
   each choice: wall time, network time and peak memory.
4. What each choice's first use in 3D Slicer downloads, per Slicer Python and
   platform (:mod:`bench_slicer_first_use`): ONNX Runtime alone, or with
   OpenVINO beside it. ``--venv-sizes`` adds the size of a fresh virtual
   environment with ``kneeboneseg`` and with ``kneeboneseg[train]``.
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
from bench_slicer_first_use import PLATFORMS, first_use_download, slicer_pythons

from KneeBoneSegLib.errors import KneeBoneSegError
from KneeBoneSegLib.io.images import read_volume
from KneeBoneSegLib.network.engines import cpu_description
from KneeBoneSegLib.network.models import SHIPPED_MODEL, load_model
from KneeBoneSegLib.preprocess.normalization import air_level

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "Resources" / "Models"
KERAS_MODEL = Path(SHIPPED_MODEL).with_suffix(".keras").name
CHOICES = {  # name: (model file, --engine, --precision)
    "keras f32 (TensorFlow)": (KERAS_MODEL, "auto", "f32"),
    "onnxruntime f32": (SHIPPED_MODEL, "onnxruntime", "f32"),
    "openvino f32": (SHIPPED_MODEL, "openvino", "f32"),
    "openvino bf16": (SHIPPED_MODEL, "openvino", "bf16"),
}
REFERENCE = "onnxruntime f32"
#: What each choice's first use in Slicer installs beyond the library's own requirements.
FIRST_USE_EXTRA = {"onnxruntime (default)": (), "onnxruntime + openvino": ("openvino",)}


class OnnxRuntimeVariant:
    """The shipped ONNX network on ONNX Runtime set up another way, for part 1's comparison.

    ``channels_first`` drops the graph's two layout reshapes (its input and
    output are then ``(B, 1, p, p, p)``); ``config`` are session config
    entries; ``basic_optimisation`` stops graph optimisation at the basic level.
    """

    def __init__(
        self, path: Path, channels_first: bool = False, config: dict | None = None, basic_optimisation: bool = False
    ):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
        options.log_severity_level = 3
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        if basic_optimisation:
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        graph = channels_first_graph(path) if channels_first else path.read_bytes()
        self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.channels_first = channels_first

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        feed = batch.reshape(len(batch), 1, *batch.shape[1:4]) if self.channels_first else batch
        return self.session.run(None, {self.session.get_inputs()[0].name: feed})[0].reshape(batch.shape)


def channels_first_graph(path: Path) -> bytes:
    """The ONNX graph at ``path`` without its input and output reshapes between channels-last and channels-first.

    With one channel, the export turns channels-last into channels-first by a
    reshape (no transpose); every convolution already runs channels-first.
    """
    import onnx

    model = onnx.load(path)
    graph = model.graph
    first, last = graph.node[0], graph.node[-1]
    assert (first.op_type, last.op_type) == ("Reshape", "Reshape") and not any(
        node.op_type == "Transpose" for node in graph.node
    )
    size = graph.input[0].type.tensor_type.shape.dim[1].dim_value
    for node in graph.node:
        node.input[:] = [graph.input[0].name if name == first.output[0] else name for name in node.input]
    graph.output[0].name = last.input[0]
    graph.node.remove(first)
    graph.node.remove(last)
    for port in (graph.input[0], graph.output[0]):
        dims = port.type.tensor_type.shape.dim
        del dims[1:]
        for extent in (1, size, size, size):
            dims.add().dim_value = extent
    onnx.checker.check_model(model)
    return model.SerializeToString()


def open_choices() -> dict:
    """The choices this machine runs, loaded; a choice it cannot run is printed with its reason."""
    models = {}
    for name, (file, engine, precision) in CHOICES.items():
        try:
            models[name] = load_model(MODELS / file, engine=engine, device="cpu", precision=precision)
        except KneeBoneSegError as error:
            print(f"  {name:34} not run here: {error}")
    return models


def tissue_batches(scan, model, count: int, size: int = 32) -> list[np.ndarray]:
    """``count`` batches of ``size`` sub-volumes of the scan on the model's grid, each holding tissue."""
    image = model.model_input(scan).image
    level, p = air_level(image), model.card.patch_size
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
        subprocess.run(
            [f"{folder}/bin/python", "-m", "pip", "install", "--quiet", "--no-cache-dir", requirement],
            check=True,
            cwd=ROOT,
        )
        return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the per-sub-volume timing")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run")
    parser.add_argument(
        "--venv-sizes",
        action="store_true",
        help="part 4 also measures fresh virtual environments (downloads TensorFlow)",
    )
    args = parser.parse_args()
    parts = {int(part) for part in args.parts.split(",")}
    cpu = cpu_description()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {cpu['name']} ({cpu['machine']}), {cpus} CPU cores, {platform.python_implementation()} {platform.python_version()}, no GPU used"
    )
    print(f"instruction sets: {' '.join(cpu['instruction_sets'])}")
    if 4 in parts:
        print_first_use_downloads(args.venv_sizes)
    if 3 in parts:
        # Before this process loads anything big: a child's peak memory counts what it was forked from.
        print_whole_runs(sample_dir() / "knee_mri.nrrd")
    if parts & {1, 2}:
        print_speeds(parts, args.rounds)


def print_speeds(parts: set, rounds: int) -> None:
    """Parts 1 and 2: each choice's speed on the sample scan, and how far it is from the reference."""
    scan_path = sample_dir() / "knee_mri.nrrd"
    scan = read_volume(scan_path)
    print("\nchoices, as each reports itself once opened:")
    models = open_choices()
    card = models[REFERENCE].card
    print(
        f"model: {card.name} ({card.patch_size}^3 sub-volumes at {card.spacing_mm[0]} mm); scan: {scan_path.name} {' x '.join(map(str, scan.array.shape[::-1]))}"
    )
    for name, model in models.items():
        ran = model.describe()
        print(
            f"  {name:34} {ran['engine']} {ran['version']} ({ran['provider']}, threads {ran['threads']}, precision read back: {ran['precision']})"
        )

    if 1 in parts:
        path = MODELS / SHIPPED_MODEL
        networks = {name: model.network for name, model in models.items()}
        networks.update(
            {
                "onnxruntime f32, channels-first graph": OnnxRuntimeVariant(path, channels_first=True),
                "onnxruntime f32, no spinning threads": OnnxRuntimeVariant(
                    path, config={"session.intra_op.allow_spinning": "0"}
                ),
                "onnxruntime f32, basic graph optimisation": OnnxRuntimeVariant(path, basic_optimisation=True),
            }
        )
        batches = tissue_batches(scan, models[REFERENCE], 4)
        print(
            f"\n1. milliseconds per sub-volume, batches of 32 tissue sub-volumes, median of {rounds} interleaved rounds"
        )
        print(f"  {'':44} {'ms':>7}  largest difference from {REFERENCE}")
        per_tile = per_subvolume_ms(networks, batches, rounds)
        reference = [networks[REFERENCE].predict_on_batch(batch) for batch in batches]
        for name, ms in per_tile.items():
            difference = max(
                float(np.abs(networks[name].predict_on_batch(batch) - expected).max())
                for batch, expected in zip(batches, reference)
            )
            print(f"  {name:44} {ms:7.1f}  {difference:.1e}")
    if 2 in parts:
        print_network_stage(scan, models)


def print_network_stage(scan, models: dict) -> None:
    """Part 2: the network stage of each choice on the whole scan, and how far its probabilities are from the reference."""
    print("\n2. the network stage on the whole scan (3 projections, default tiling, air sub-volumes left out)")
    print(f"  {'':34} {'s':>7}  largest difference from {REFERENCE}")
    maps, seconds = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        maps[name] = list(model.projection_maps(model.model_input(scan)))
        seconds[name] = time.perf_counter() - start
    for name in models:
        difference = max(float(np.abs(a - b).max()) for a, b in zip(maps[name], maps[REFERENCE]))
        print(f"  {name:34} {seconds[name]:7.1f}  {difference:.1e}")


def print_whole_runs(scan_path: Path) -> None:
    """Part 3: a whole segmentation with each choice in a fresh process."""
    print("\n3. whole `kneeboneseg segment` of the scan in a fresh process")
    print(f"  {'':34} {'wall s':>8} {'network s':>10} {'peak GiB':>9}  precision")
    for name, (file, engine, precision) in CHOICES.items():
        try:
            load_model(
                MODELS / file, engine=engine, device="cpu", precision=precision
            )  # a choice this CPU lacks is skipped
        except KneeBoneSegError as error:
            print(f"  {name:34} not run here: {error}")
            continue
        seconds, peak_gib, summary, _ = run_segment(
            scan_path, ["--engine", engine, "--precision", precision], str(MODELS / file)
        )
        print(
            f"  {name:34} {seconds:8.1f} {summary['timings_s']['network']:10.1f} {peak_gib:9.2f}  {summary['engine']['precision']}"
        )


def print_first_use_downloads(venv_sizes: bool) -> None:
    """Part 4: what each choice's first use in Slicer downloads (MB = 10^6 bytes), per Slicer Python and platform."""
    print("\n4. first use in 3D Slicer: download of the wheels Slicer does not ship, MB (budget: 60)")
    print(f"  {'':34}" + "".join(f"{choice:>26}" for choice in FIRST_USE_EXTRA) + "   openvino wheel")
    for python, (_, shipped) in slicer_pythons().items():
        for platform_name, tags in PLATFORMS.items():
            totals, openvino = [], ""
            for extra in FIRST_USE_EXTRA.values():
                wheels = dict(first_use_download(python, shipped, tags, extra))
                totals.append(sum(wheels.values()) / 1e6)
                if "openvino" in wheels:
                    openvino = f"{wheels['openvino'] / 1e6:.1f}"
            print(
                f"  Python {python} {platform_name:<23}"
                + "".join(f"{total:26.1f}" for total in totals)
                + f"   {openvino:>14}"
            )
    if venv_sizes:
        for requirement in (".", ".[train]"):
            print(f"  fresh venv + pip install {requirement:9} {venv_size_mib(requirement):8.0f} MiB")


if __name__ == "__main__":
    main()
