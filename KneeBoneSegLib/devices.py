"""Which compute device the network runs on, whatever Keras backend is installed.

Keras 3 runs on TensorFlow, JAX or PyTorch; each finds GPUs its own way.
:func:`select_device` turns the user's choice (``auto``, ``cpu``, ``gpu``)
into a Keras device name that :func:`keras.device` accepts, so the pipeline
places the network with one call on every backend.
"""

from __future__ import annotations

import functools
import logging

from .errors import InputError

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "gpu")


@functools.cache
def list_gpus() -> tuple[str, ...]:
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


def select_device(requested: str = "auto") -> str:
    """Keras device name for ``requested`` (``"auto"``: the first GPU if there is one, else the CPU).

    Raises
    ------
    InputError
        If ``requested`` is not one of ``auto``, ``cpu``, ``gpu``, or a GPU is
        asked for on a machine where the backend sees none.
    """
    if requested not in DEVICE_CHOICES:
        raise InputError(f"device must be one of {', '.join(DEVICE_CHOICES)}, not {requested!r}")
    gpus = list_gpus() if requested != "cpu" else ()
    if requested == "gpu" and not gpus:
        raise InputError("--device gpu was asked for, but no GPU is visible to Keras; use --device cpu or auto")
    return "gpu:0" if gpus else "cpu:0"


def describe_devices() -> dict:
    """The Keras backend, the GPUs it sees and the device ``auto`` picks, for ``kneeboneseg info`` and logs."""
    import keras

    return {"keras_backend": keras.config.backend(), "gpus": list(list_gpus()), "auto": select_device("auto")}
