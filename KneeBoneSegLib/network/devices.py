"""Which compute device the network runs on: the user's ``auto``, ``cpu`` or ``gpu``, per engine.

ONNX Runtime reaches GPUs through execution providers that come with other
wheels: CUDA (``onnxruntime-gpu``, NVIDIA), DirectML (``onnxruntime-directml``,
any GPU on Windows) and CoreML (in the standard macOS wheel). OpenVINO names
its plugins ``CPU`` and ``GPU``; Keras asks its backend.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

from ..errors import InputError
from ..options import DEVICE_CHOICES

log = logging.getLogger(__name__)


#: ONNX Runtime's GPU execution providers, the preferred first.
GPU_PROVIDERS = ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")


def check_device(requested: str) -> str:
    """``requested`` if it is one of ``auto``, ``cpu``, ``gpu``; else a one-line :class:`InputError`."""
    if requested not in DEVICE_CHOICES:
        raise InputError(f"device must be one of {', '.join(DEVICE_CHOICES)}, not {requested!r}")
    return requested


def select_onnxruntime_providers(requested: str = "auto", available: tuple[str, ...] | None = None) -> list[str]:
    """ONNX Runtime providers for ``requested``, in the order the session should try them.

    ``auto`` takes the first installed GPU provider and falls back to the CPU;
    ``gpu`` insists on one (a one-line :class:`InputError` names the wheels
    that bring one when none is installed). ``available`` defaults to what
    the installed ONNX Runtime offers.
    """
    check_device(requested)
    if available is None:
        available = onnxruntime_providers()
    gpu = [p for p in GPU_PROVIDERS if p in available] if requested != "cpu" else []
    if requested == "gpu" and not gpu:
        raise InputError(
            "--device gpu was asked for, but ONNX Runtime has no GPU provider here (install onnxruntime-gpu for NVIDIA "
            "or onnxruntime-directml on Windows); use --device cpu or auto"
        )
    return gpu[:1] + ["CPUExecutionProvider"]


def select_openvino_device(requested: str, available: list[str]) -> str:
    """OpenVINO's plugin name for ``requested``: ``GPU`` when asked for (and ``auto`` finds one), else ``CPU``."""
    check_device(requested)
    has_gpu = any(name.startswith("GPU") for name in available)
    if requested == "gpu" and not has_gpu:
        raise InputError("--device gpu was asked for, but OpenVINO sees no GPU; use --device cpu or auto")
    return "GPU" if has_gpu and requested != "cpu" else "CPU"


@functools.lru_cache(maxsize=None)
def onnxruntime_providers() -> tuple[str, ...]:
    """The execution providers the installed ONNX Runtime offers (empty when it is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return ()
    return tuple(onnxruntime.get_available_providers())


@functools.lru_cache(maxsize=None)
def keras_gpus() -> tuple[str, ...]:
    """Names of the GPUs the active Keras backend can use (empty on a CPU-only machine)."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tuple(device.name for device in tf.config.list_physical_devices("GPU"))
    if backend == "torch":
        import torch

        return tuple(torch.cuda.get_device_name(n) for n in range(torch.cuda.device_count()))
    if backend == "jax":
        import jax

        return tuple(str(device) for device in jax.devices() if device.platform == "gpu")
    return ()


def describe_devices() -> dict:
    """The engines installed and the devices they offer, for ``kneeboneseg info`` and logs."""
    info = {"onnxruntime_providers": list(onnxruntime_providers())}
    if importlib.util.find_spec("openvino") is not None:
        import openvino

        info["openvino_devices"] = list(openvino.Core().available_devices)
    providers = select_onnxruntime_providers("auto") if info["onnxruntime_providers"] else []
    info["auto"] = "gpu" if providers and providers[0] != "CPUExecutionProvider" else "cpu"
    return info
