"""The engines that run a trained network: ONNX Runtime by default, OpenVINO or Keras on request.

Every engine wraps one network file behind the same small interface, so that
tiling (:mod:`.inference`) never knows which one runs:

``predict_on_batch(batch)``
    probabilities (B, p, p, p, 1) for a float32 batch (B, p, p, p, 1);
``input_shape``
    ``(None, p, p, p, 1)``, as Keras reports it;
``describe()``
    a JSON-able record of what ran (engine, device, provider, threads) for
    the log and ``summary.json``;
``device``, ``threads``, ``precision``
    what the network was opened with (``"auto"`` and ``None`` as asked).

The engines are entries of :data:`ENGINE_REGISTRY`, one per engine with the
files it runs, the package it needs and the precisions it offers;
:func:`open_network` picks from it.

Every engine computes in float32 unless asked otherwise (``precision``), so
that a scan gives the same bones on every CPU: OpenVINO's CPU plugin would
otherwise compute in bfloat16 wherever the CPU has bfloat16 units (AVX-512
BF16, AMX), which moves probabilities by up to 0.05. ``precision="bf16"``
asks for bfloat16 on purpose, where OpenVINO and the CPU support it.
:func:`describe` records the precision and the CPU's instruction sets.

Segmenting needs ONNX Runtime alone (about 15-30 MB on every platform and
Python that 3D Slicer ships). OpenVINO (``pip install kneeboneseg[openvino]``)
runs the same ``.onnx`` file two to three times as fast on x86 CPUs
(``bench/bench_engines.py``) and is picked automatically on the CPU where it is
installed. Keras (``[train]``) runs ``.keras`` files. Each engine's package is
imported only when that engine is opened: nothing here imports TensorFlow
unless a ``.keras`` model is run.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError, ModelError
from ..options import ENGINES, PRECISIONS
from ..threads import effective_threads
from .devices import keras_gpus, select_onnxruntime_providers, select_openvino_device

log = logging.getLogger(__name__)

_PRECISION_NAMES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class _OnnxFileNetwork:
    """What both ONNX engines share: the file, where it runs, and how it reports itself."""

    engine = ""

    def __init__(
        self, path: str | os.PathLike, device: str = "auto", threads: int | None = None, precision: str = "f32"
    ):
        self.path = Path(path)
        self.device = device
        self.threads = threads
        self.precision = check_precision(precision)
        self.provider, self.input_shape, self.output_shape = self._open()

    def _open(self) -> tuple[str, tuple, tuple]:
        """Load the file; return the provider that runs it and the input and output shapes."""
        raise NotImplementedError

    def _version(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "engine": self.engine,
            "version": self._version(),
            "device": "cpu" if self.provider in ("CPUExecutionProvider", "CPU") else "gpu",
            "provider": self.provider,
            "threads": effective_threads(self.threads),
            "precision": self._precision_ran(),
            "cpu": cpu_description(),
        }

    def _precision_ran(self) -> str:
        """The precision the compiled network computes in, as the engine reports it."""
        return self.precision


class OnnxRuntimeNetwork(_OnnxFileNetwork):
    """An ``.onnx`` network on ONNX Runtime, on the GPU provider ``device`` selects or the CPU."""

    engine = "onnxruntime"

    def _open(self):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: ONNX Runtime's notes are not for clinicians
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        # Said explicitly: ONNX Runtime may compute float32 networks in bfloat16 on ARM CPUs, and in TF32 on NVIDIA GPUs.
        options.add_session_config_entry("mlas.enable_gemm_fastmath_arm64_bfloat16", "0")
        providers = [
            (provider, {"use_tf32": "0"}) if provider == "CUDAExecutionProvider" else provider
            for provider in select_onnxruntime_providers(self.device)
        ]
        try:
            self._session = onnxruntime.InferenceSession(str(self.path), options, providers=providers)
        except Exception as error:  # ONNX Runtime raises its own exception types for damaged files
            raise ModelError(f"{self.path}: ONNX Runtime could not load the model ({_first_line(error)})") from None
        provider = self._session.get_providers()[0]
        if self.device == "gpu" and provider == "CPUExecutionProvider":
            raise InputError(
                "--device gpu was asked for, but ONNX Runtime could not start its GPU provider; use --device cpu or auto"
            )
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{self.path}: expected one input and one output, found {len(inputs)} and {len(outputs)}")
        self._input_name = inputs[0].name
        return provider, _keras_shape(inputs[0].shape), _keras_shape(outputs[0].shape)

    def _version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def predict_on_batch(self, batch):
        return self._session.run(None, {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class OpenVinoNetwork(_OnnxFileNetwork):
    """An ``.onnx`` network compiled by OpenVINO for its CPU (or, with ``device="gpu"``, its GPU) plugin."""

    engine = "openvino"

    def _open(self):
        import openvino
        from openvino.frontend import FrontEndManager

        core = openvino.Core()
        plugin = select_openvino_device(self.device, core.available_devices)
        # Said explicitly: left alone, the CPU plugin computes in bfloat16 on CPUs with bfloat16 units.
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": self.precision}
        if self.precision == "bf16" and "BF16" not in core.get_property(plugin, "OPTIMIZATION_CAPABILITIES"):
            raise InputError(
                f"--precision bf16 was asked for, but OpenVINO's {plugin} plugin has no bfloat16 arithmetic on this machine; use --precision f32"
            )
        if self.threads and plugin == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        try:
            # The ONNX front end alone: left to guess, OpenVINO also tries its TensorFlow reader,
            # which prints TensorFlow's parse errors at the user for a damaged file.
            onnx_reader = FrontEndManager().load_by_framework("onnx")
            self._compiled = core.compile_model(onnx_reader.convert(onnx_reader.load(str(self.path))), plugin, config)
        except Exception as error:  # OpenVINO raises its own exception types for unreadable files
            raise ModelError(f"{self.path}: OpenVINO could not load the model ({_first_line(error)})") from None
        if len(self._compiled.inputs) != 1 or len(self._compiled.outputs) != 1:
            raise ModelError(f"{self.path}: expected one input and one output")
        shapes = [
            port.get_partial_shape().to_string().strip("[]").split(",")
            for port in (self._compiled.inputs[0], self._compiled.outputs[0])
        ]
        return plugin, _keras_shape(shapes[0]), _keras_shape(shapes[1])

    def _version(self) -> str:
        import openvino

        return openvino.get_version()

    def _precision_ran(self) -> str:
        """What the compiled convolutions compute in (OpenVINO's runtime graph), not merely what was asked."""
        ran = set()
        for layer in self._compiled.get_runtime_model().get_ordered_ops():
            info = layer.get_rt_info()
            if "layerType" in info and info["layerType"].astype(str) in ("Convolution", "Deconvolution"):
                ran.add(info["runtimePrecision"].astype(str))
        return "+".join(sorted(ran)) or self.precision

    def predict_on_batch(self, batch):
        return self._compiled(np.ascontiguousarray(batch, dtype=np.float32))[0]


class KerasNetwork:
    """A Keras model (from a ``.keras`` file or built in memory), placed on a Keras device.

    Needs the ``[train]`` extra. The backend is whatever Keras is configured
    with; the Slicer worker and ``bench/`` pin ``KERAS_BACKEND`` so that a
    user's ``~/.keras/keras.json`` cannot change it.
    """

    engine = "keras"

    threads = None  # Keras sets its own thread pools
    precision = "f32"

    def __init__(self, network, device: str = "auto", path: str | os.PathLike | None = None):
        self.network = network
        self.device = device
        self.path = Path(path) if path else None
        self.keras_device = _keras_device(device)
        self.input_shape = tuple(network.input_shape)
        self.output_shape = tuple(network.output_shape)

    def with_free_sides(self) -> "KerasNetwork":
        """The same network and weights taking inputs of any size (a fully convolutional U-Net runs on a whole volume)."""
        import keras

        config = self.network.get_config()
        config["layers"][0]["config"]["batch_shape"] = (None,) * (len(self.input_shape) - 1) + (self.input_shape[-1],)
        free = keras.Model.from_config(config)
        free.set_weights(self.network.get_weights())
        return type(self)(free, self.device, self.path)

    def predict_on_batch(self, batch):
        import keras

        with keras.device(self.keras_device):
            return keras.ops.convert_to_numpy(self.network.predict_on_batch(batch))

    def describe(self) -> dict:
        import keras

        return {
            "engine": self.engine,
            "version": keras.__version__,
            "backend": keras.config.backend(),
            "device": self.keras_device.split(":")[0],
            "provider": self.keras_device,
            "threads": None,
            "precision": _PRECISION_NAMES.get(
                self.network.dtype_policy.compute_dtype, self.network.dtype_policy.compute_dtype
            ),
            "cpu": cpu_description(),
        }


@dataclass(frozen=True)
class Engine:
    """An engine that runs network files: which files, with which package, in which precisions."""

    name: str
    title: str  #: as its makers write it, for messages
    suffixes: tuple  #: the network files it runs
    package: str  #: the module it needs
    install: str  #: what to install where that module is missing
    precisions: tuple
    open: Callable  #: ``open(path, device, threads, precision)``, an engine network
    chosen_by_auto: Callable = lambda device: True  #: whether ``engine="auto"`` takes it for ``device``


def _open_keras(path: Path, device: str, threads, precision: str) -> "KerasNetwork":
    return KerasNetwork(_load_keras(path), device, path)


#: The engines, in the order ``engine="auto"`` tries them: OpenVINO first where it runs (the faster one on a CPU).
ENGINE_REGISTRY = {
    engine.name: engine
    for engine in (
        Engine(
            name="openvino",
            title="OpenVINO",
            suffixes=(".onnx",),
            package="openvino",
            install="pip install kneeboneseg[openvino]",
            precisions=("f32", "bf16"),
            open=OpenVinoNetwork,
            chosen_by_auto=lambda device: _runs_on_cpu(device),
        ),
        Engine(
            name="onnxruntime",
            title="ONNX Runtime",
            suffixes=(".onnx",),
            package="onnxruntime",
            install="pip install onnxruntime (or reinstall kneeboneseg)",
            precisions=("f32",),
            open=OnnxRuntimeNetwork,
        ),
        Engine(
            name="keras",
            title="Keras",
            suffixes=(".keras",),
            package="keras",
            install="pip install kneeboneseg[train]",
            precisions=("f32",),
            open=_open_keras,
        ),
    )
}


def open_network(
    path: str | os.PathLike,
    engine: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    precision: str = "f32",
):
    """Open the network file ``path`` on the engine that runs it (an entry of :data:`ENGINE_REGISTRY`).

    ``engine="auto"`` takes the first installed engine of the registry that
    runs the file's type in ``precision`` and is chosen for ``device``:
    OpenVINO on the CPU where it is installed, else ONNX Runtime, for
    ``.onnx`` files; Keras for ``.keras`` files.

    Raises
    ------
    InputError
        An unknown engine, an engine that does not run this file or precision,
        or one that is not installed.
    ModelError
        A file the engine cannot load.
    """
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    check_precision(precision)
    path = Path(path)
    runs_file = [entry for entry in ENGINE_REGISTRY.values() if path.suffix in entry.suffixes]
    if engine == "auto":
        offered = [entry for entry in runs_file if precision in entry.precisions] or runs_file
        installed = [entry for entry in offered if _available(entry.package)] or offered
        chosen = next((entry for entry in installed if entry.chosen_by_auto(device)), installed[-1])
    else:
        chosen = ENGINE_REGISTRY[engine]
        if path.suffix not in chosen.suffixes:
            runners = ", ".join(entry.name for entry in runs_file)
            raise InputError(
                f"{path}: engine {engine} runs {' and '.join(chosen.suffixes)} files, not {path.suffix}; use --engine auto or {runners}"
            )
    if precision not in chosen.precisions:
        other = next((entry for entry in ENGINE_REGISTRY.values() if precision in entry.precisions), None)
        needs = f"{other.title} ({other.install}, --engine {other.name}, a .onnx model)" if other else "another engine"
        raise InputError(f"{chosen.title} runs this network in float32 only; --precision {precision} needs {needs}")
    if not _available(chosen.package):
        raise InputError(
            f"{path.name} needs {chosen.title} (--engine {chosen.name}), which is not installed; {chosen.install}, or use --engine auto"
        )
    return chosen.open(path, device, threads, precision)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; else a one-line :class:`InputError`."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


try:
    from numpy._core._multiarray_umath import __cpu_features__ as _NUMPY_CPU_FEATURES
except ImportError:  # numpy 1.x
    from numpy.core._multiarray_umath import __cpu_features__ as _NUMPY_CPU_FEATURES

#: Instruction sets that decide how fast, and in what arithmetic, an engine runs on a CPU.
_CPU_FEATURES = ("SSE42", "AVX", "AVX2", "FMA3", "AVX512F", "AVX512_CPX", "AVX512_SPR", "ASIMD", "ASIMDHP", "SVE")
#: Linux's names for the bfloat16 and AMX units that numpy does not report.
_LINUX_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


@functools.lru_cache(maxsize=None)
def cpu_description() -> dict:
    """The CPU's name and the instruction sets it offers that matter to the engines, for ``summary.json``."""
    found = [name for name in _CPU_FEATURES if _NUMPY_CPU_FEATURES.get(name)]
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            text = cpuinfo.read()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            found += [flag.upper() for flag in _LINUX_CPU_FLAGS if flag in flags]
            break
    return {"name": name, "machine": platform.machine(), "instruction_sets": found}


def _runs_on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and select_onnxruntime_providers("auto")[0] == "CPUExecutionProvider")


def _load_keras(path: Path):
    try:
        import keras
    except ImportError:
        raise InputError(
            f"{path}: running a .keras model needs Keras: pip install kneeboneseg[train], or use the model's .onnx file"
        ) from None
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many kinds for a damaged file
        raise ModelError(f"{path}: the model could not be loaded ({_first_line(error)})") from None


def _keras_device(device: str) -> str:
    gpus = keras_gpus() if device != "cpu" else ()
    if device == "gpu" and not gpus:
        raise InputError("--device gpu was asked for, but no GPU is visible to Keras; use --device cpu or auto")
    return "gpu:0" if gpus else "cpu:0"


def _first_line(error: Exception) -> str:
    """The first line of an engine's error (they run to many), for a one-line message."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text[:200]}"


def _keras_shape(dims) -> tuple:
    """``(None, p, p, p, 1)`` from an engine's dimensions, a symbolic or dynamic one as ``None``."""
    shape = []
    for dim in dims:
        text = str(dim).strip()
        shape.append(int(text) if text.isdigit() else None)
    return tuple(shape)
