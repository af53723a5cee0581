"""The engines that run the networks: ONNX Runtime by default, OpenVINO and Keras on request, the same bones from each."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import knee_phantom, write_threshold_onnx

from KneeBoneSegLib.errors import InputError
from KneeBoneSegLib.io.images import write_volume
from KneeBoneSegLib.metrics import dice
from KneeBoneSegLib.network.devices import select_onnxruntime_providers, select_openvino_device
from KneeBoneSegLib.network.engines import ENGINE_REGISTRY, open_network
from KneeBoneSegLib.network.models import (
    MODEL_SUFFIXES,
    SHIPPED_MODEL,
    ModelCard,
    file_sha256,
    load_model,
    network_dimensions,
    read_card,
)
from KneeBoneSegLib.options import ENGINES
from KneeBoneSegLib.pipeline import SegmentOptions, segment
from KneeBoneSegLib.volume import Volume

MODELS = Path(__file__).resolve().parents[2] / "Resources" / "Models"
SHIPPED = tuple(
    f"kneeboneseg-{family}{fold}" for family in ("compact", "slices") for fold in ("", "-fold-right", "-fold-left")
)
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
ONNX_ENGINES = [
    "onnxruntime",
    pytest.param(
        "openvino", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO ([openvino] extra) is not installed")
    ),
]


def random_input(card: ModelCard, rng) -> np.ndarray:
    """Two random inputs of the shape a model takes: cubic sub-volumes, or oblong slices for a 2D network of free sides."""
    shape = (card.patch_size,) * 3 if network_dimensions(card) == 3 else (48, 80)
    return rng.normal(0.3, 0.3, (2, *shape, 1)).astype(np.float32)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_ships_as_onnx_and_its_card_records_that_export(name):
    card = read_card(MODELS / f"{name}.onnx")
    export = card.export["onnx"]
    assert (export["file"], export["input"], export["output"]) == (f"{name}.onnx", "image", "bone_probability")
    # The digests tie the ONNX file to the Keras file it was exported from: a retrained .keras
    # without a fresh export fails here.
    assert export["onnx_sha256"] == file_sha256(MODELS / f"{name}.onnx")
    assert export["keras_sha256"] == file_sha256(MODELS / f"{name}.keras")
    assert export["opset"] == 17 and export["max_abs_difference"] <= 1e-4


@pytest.mark.parametrize("engine", ONNX_ENGINES)
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_onnx_model_gives_the_keras_probabilities_on_random_input(name, engine, rng):
    keras = pytest.importorskip("keras", reason="the Keras reference needs the [train] extra")
    reference = keras.saving.load_model(MODELS / f"{name}.keras", compile=False)
    network = open_network(MODELS / f"{name}.onnx", engine=engine, device="cpu")
    # float32 unless asked: OpenVINO would compute in bfloat16 on CPUs with bfloat16 units (1.4e-3 off here).
    assert (network.describe()["engine"], network.describe()["precision"]) == (engine, "f32")
    batch = random_input(read_card(MODELS / f"{name}.onnx"), rng)
    expected = keras.ops.convert_to_numpy(reference.predict_on_batch(batch))
    assert np.abs(network.predict_on_batch(batch) - expected).max() <= 1e-4


@pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO ([openvino] extra) is not installed")
def test_bfloat16_is_a_choice_where_the_cpu_has_it_and_a_clear_refusal_where_not(rng):
    import openvino

    path = MODELS / SHIPPED_MODEL
    batch = random_input(read_card(path), rng)
    exact = open_network(path, engine="openvino", device="cpu").predict_on_batch(batch)
    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(InputError, match="no bfloat16 arithmetic on this machine; use --precision f32"):
            open_network(path, engine="openvino", device="cpu", precision="bf16")
        return
    fast = open_network(path, engine="openvino", device="cpu", precision="bf16")
    assert fast.describe()["precision"] == "bf16"
    difference = np.abs(fast.predict_on_batch(batch) - exact).max()
    assert 1e-5 < difference < 0.1  # bfloat16 keeps 8 bits of mantissa: visibly not float32, and still the same network


def test_other_precisions_are_refused_with_the_choices(tmp_path):
    path = write_threshold_onnx(tmp_path / "threshold.onnx")
    with pytest.raises(
        InputError, match="ONNX Runtime runs this network in float32 only; --precision bf16 needs OpenVINO"
    ):
        open_network(path, engine="onnxruntime", precision="bf16")
    with pytest.raises(InputError, match="precision must be one of f32, bf16, not 'fp16'"):
        open_network(path, precision="fp16")
    with pytest.raises(InputError, match="Keras runs this network in float32 only; --precision bf16 needs OpenVINO"):
        open_network(MODELS / Path(SHIPPED_MODEL).with_suffix(".keras"), precision="bf16")


@pytest.fixture(scope="module")
def sample_crop(sample_dir):
    """A 42 x 63 x 42 mm block of the sample scan around the joint that holds part of each bone."""
    from KneeBoneSegLib.io.images import read_volume

    image = read_volume(sample_dir / "knee_mri.nrrd")
    corner = (60, 120, 150)  # k, j, i
    box = tuple(slice(c, c + n) for c, n in zip(corner, (120, 180, 120)))
    return Volume(image.array[box], image.geometry.cropped(corner))


@pytest.fixture(scope="module")
def onnxruntime_on_the_crop(sample_crop):
    """The reference every other engine is held to: ONNX Runtime in float32 on the sample crop."""
    return segment(
        sample_crop,
        load_model(MODELS / SHIPPED_MODEL, engine="onnxruntime"),
        SegmentOptions(surfaces=False, device="cpu"),
    )


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(
            "keras",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("keras") is None, reason="the Keras engine needs the [train] extra"
            ),
        ),
        pytest.param(
            "openvino",
            marks=pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO ([openvino] extra) is not installed"),
        ),
    ],
)
@pytest.mark.slow
def test_every_installed_engine_gives_onnxruntimes_bones_on_the_sample_scan(
    sample_crop, onnxruntime_on_the_crop, engine
):
    """By default every engine computes in float32, so on any CPU (AVX2, AVX-512, AMX) the bones are the same."""
    model_file = Path(SHIPPED_MODEL).with_suffix(".keras") if engine == "keras" else SHIPPED_MODEL
    result = segment(
        sample_crop,
        load_model(MODELS / model_file, engine="auto" if engine == "keras" else engine),
        SegmentOptions(surfaces=False, device="cpu"),
    )
    reference = onnxruntime_on_the_crop
    assert (result.report["engine"]["engine"], result.report["engine"]["precision"]) == (engine, "f32")
    assert reference.report["engine"]["precision"] == "f32"
    assert np.abs(result.probability - reference.probability).max() <= 1e-4
    assert set(np.unique(reference.labels)) == {0, 1, 2, 3}  # the crop holds every bone, so each is compared
    for label in (1, 2, 3):
        assert dice(result.labels == label, reference.labels == label) == 1.0


@pytest.mark.parametrize("engine", ONNX_ENGINES)
def test_the_summary_says_which_engine_device_threads_and_precision_ran(tmp_path, engine):
    path = write_threshold_onnx(
        tmp_path / "threshold.onnx", ModelCard(patch_size=16, stride=8, normalization={"method": "minmax"})
    )
    image, _, geometry = knee_phantom()
    model = load_model(path, engine=engine, threads=1)
    result = segment(
        Volume(image, geometry), model, SegmentOptions(projections=1, surfaces=False, threads=1, device="cpu")
    )
    ran = result.report["engine"]
    assert (ran["engine"], ran["device"], ran["threads"], ran["precision"]) == (engine, "cpu", 1, "f32")
    assert ran["cpu"]["name"] and ran["cpu"]["instruction_sets"]  # which CPU ran it, and what arithmetic it offers
    assert result.report["device"] == "cpu" and set(np.unique(result.labels)) == {0, 1, 2, 3}


def test_gpu_provider_choice():
    cpu_only = ("CPUExecutionProvider",)
    assert select_onnxruntime_providers("auto", cpu_only) == ["CPUExecutionProvider"]
    assert select_onnxruntime_providers("cpu", ("CUDAExecutionProvider", *cpu_only)) == ["CPUExecutionProvider"]
    assert select_onnxruntime_providers("gpu", ("CoreMLExecutionProvider", "CUDAExecutionProvider", *cpu_only)) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert select_onnxruntime_providers("auto", ("DmlExecutionProvider", *cpu_only))[0] == "DmlExecutionProvider"
    with pytest.raises(InputError, match="no GPU provider.*onnxruntime-gpu"):
        select_onnxruntime_providers("gpu", cpu_only)
    with pytest.raises(InputError, match="device must be one of"):
        select_onnxruntime_providers("tpu", cpu_only)
    assert (
        select_openvino_device("auto", ["CPU", "GPU.0"]) == "GPU"
        and select_openvino_device("cpu", ["CPU", "GPU.0"]) == "CPU"
    )
    with pytest.raises(InputError, match="OpenVINO sees no GPU"):
        select_openvino_device("gpu", ["CPU"])


def test_asking_for_a_gpu_on_a_machine_without_one_is_a_one_line_error(tmp_path):
    import onnxruntime

    from KneeBoneSegLib.network.devices import GPU_PROVIDERS

    if set(GPU_PROVIDERS) & set(onnxruntime.get_available_providers()):
        pytest.skip("this machine's ONNX Runtime has a GPU provider")
    card = ModelCard(patch_size=16, stride=8, normalization={"method": "minmax"})
    path = write_threshold_onnx(tmp_path / "threshold.onnx", card)
    image, _, geometry = knee_phantom()
    write_volume(Volume(image, geometry), tmp_path / "knee.nrrd")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "KneeBoneSegLib",
            "segment",
            str(tmp_path / "knee.nrrd"),
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(path),
            "--device",
            "gpu",
            "--engine",
            "onnxruntime",
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2 and completed.stderr.count("\n") == 1, completed.stderr
    assert "--device gpu" in completed.stderr and "Traceback" not in completed.stderr
    assert not (tmp_path / "out").exists()


def test_segmenting_imports_neither_keras_nor_tensorflow_and_prints_only_its_own_lines(tmp_path):
    card = ModelCard(patch_size=16, stride=8, normalization={"method": "minmax"})
    path = write_threshold_onnx(tmp_path / "threshold.onnx", card)
    image, _, geometry = knee_phantom()
    write_volume(Volume(image, geometry), tmp_path / "knee.nrrd")
    script = (
        "import sys, json\n"
        "from KneeBoneSegLib.cli import main\n"
        f"code = main(['segment', {str(tmp_path / 'knee.nrrd')!r}, '-o', {str(tmp_path / 'out')!r}, '--model', {str(path)!r},"
        " '--closing-radius', '2', '--progress', 'none'])\n"
        "print(json.dumps({'code': code, 'loaded': sorted(m for m in ('keras', 'tensorflow', 'torch', 'jax') if m in sys.modules)}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    assert outcome == {"code": 0, "loaded": []}, completed.stderr
    # Nothing on stderr at all: no TensorFlow, absl or ONNX Runtime start-up lines.
    assert completed.stderr == ""
    assert completed.stdout.strip().splitlines()[0].startswith("OK: femur ok")  # the verdict line


def test_model_files_other_than_onnx_and_keras_are_refused_with_what_to_pass(tmp_path):
    from KneeBoneSegLib.errors import ModelError

    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ModelError, match="ends in .onnx"):
        load_model(tmp_path / "model.pt")
    assert MODEL_SUFFIXES == (".onnx", ".keras")


def test_an_unknown_engine_and_a_missing_openvino_are_clear_errors(tmp_path):
    path = write_threshold_onnx(tmp_path / "threshold.onnx")
    with pytest.raises(InputError, match="engine must be one of"):
        open_network(path, engine="tensorrt")
    with pytest.raises(
        InputError, match="engine keras runs .keras files, not .onnx; use --engine auto or openvino, onnxruntime"
    ):
        open_network(path, engine="keras")
    assert set(ENGINES) == {"auto", *ENGINE_REGISTRY}, "the options offer every engine of the registry"
    if not HAS_OPENVINO:
        with pytest.raises(
            InputError,
            match=r"needs OpenVINO \(--engine openvino\), which is not installed; pip install kneeboneseg\[openvino\]",
        ):
            open_network(path, engine="openvino")


@pytest.mark.slow
def test_a_wheel_install_carries_the_shipped_model_and_segments_without_the_checkout(tmp_path):
    """``pip install`` of a built wheel (not ``-e``): the default model must come with it."""
    import sysconfig

    root = Path(__file__).resolve().parents[2]
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(root),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"this environment cannot build wheels without isolation: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    # A bare environment that sees this one's dependencies, but not the checkout, gets the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    env_python = tmp_path / "env" / "bin" / "python"
    env_site = subprocess.run(
        [str(env_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(env_site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env_python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        timeout=300,
    )
    image, _, geometry = knee_phantom()
    write_volume(Volume(image, geometry), tmp_path / "knee.nrrd")
    script = (
        "import json\n"
        "from KneeBoneSegLib.network import models\n"
        "from KneeBoneSegLib.io.images import read_volume\n"
        "from KneeBoneSegLib.pipeline import SegmentOptions, segment\n"
        "model = models.load_model(models.default_model_path())\n"
        f"result = segment(read_volume({str(tmp_path / 'knee.nrrd')!r}), model, SegmentOptions(projections=1, surfaces=False))\n"
        "print(json.dumps({'module': models.__file__, 'model': str(model.path), 'engine': result.report['engine']['engine']}))\n"
    )
    outside_checkout = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    completed = subprocess.run(
        [str(env_python), "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=outside_checkout
    )
    assert completed.returncode == 0, completed.stderr
    ran = json.loads(completed.stdout.strip().splitlines()[-1])
    assert (
        str(root) not in ran["module"] and str(root) not in ran["model"]
    )  # neither the code nor the model came from the checkout
    assert ran["model"].endswith(f"share/kneeboneseg/Models/{SHIPPED_MODEL}")
