"""Shared fixtures. The annotated sample scan is found through KNEEBONESEG_SAMPLE_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SAMPLE_ENV = "KNEEBONESEG_SAMPLE_DIR"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The folder holding knee_mri.nrrd, knee_bones_labels.nrrd and dicom_subset/."""
    value = os.environ.get(SAMPLE_ENV)
    if not value:
        pytest.skip(f"{SAMPLE_ENV} is not set: the annotated sample scan is not available on this machine")
    path = Path(value)
    if not (path / "knee_mri.nrrd").is_file():
        pytest.skip(f"{SAMPLE_ENV}={path} does not hold knee_mri.nrrd")
    return path


@pytest.fixture(scope="session")
def sample_labels(sample_dir):
    """The ground-truth label map of the sample scan as a Volume (1 femur, 2 tibia, 3 patella)."""
    from KneeBoneSegLib.io import read_volume

    return read_volume(sample_dir / "knee_bones_labels.nrrd")


@pytest.fixture
def rng():
    return np.random.default_rng(20251124)


def knee_phantom(shape=(72, 64, 64), spacing=(2.5, 2.5, 2.5)):
    """A bright three-bone 'knee' on a dark background, in an identity-direction LPS frame.

    Returns ``(image, labels, geometry)``: femur (1) large and superior (high k,
    LPS +z), tibia (2) below it, patella (3) small and anterior (low j, LPS -y).
    """
    from KneeBoneSegLib.volume import Geometry

    k, j, i = np.indices(shape, dtype=float)
    centre_i = shape[2] / 2

    def ellipsoid(ck, cj, ci, rk, rj, ri):
        return ((k - ck) / rk) ** 2 + ((j - cj) / rj) ** 2 + ((i - ci) / ri) ** 2 <= 1

    labels = np.zeros(shape, np.uint8)
    labels[ellipsoid(shape[0] * 0.72, shape[1] * 0.55, centre_i, 16, 14, 18)] = 1
    labels[ellipsoid(shape[0] * 0.22, shape[1] * 0.55, centre_i, 12, 12, 16)] = 2
    labels[ellipsoid(shape[0] * 0.55, shape[1] * 0.14, centre_i, 6, 4, 7)] = 3
    image = np.where(labels > 0, 900.0, 100.0) + np.random.default_rng(7).normal(0, 20, shape)
    return image.astype(np.float32), labels, Geometry(spacing, (-10.0, 20.0, -30.0))


def threshold_network(patch_size: int = 16):
    """A real Keras 3D model that calls a voxel bone when its normalised intensity is above 0.5.

    It stands in for a trained U-Net where a test needs known, correct
    predictions: same input and output contract, computed by Keras.
    """
    import keras

    inputs = keras.Input((patch_size, patch_size, patch_size, 1))
    layer = keras.layers.Conv3D(1, 1, activation="sigmoid")
    outputs = layer(inputs)
    network = keras.Model(inputs, outputs)
    layer.set_weights([np.full((1, 1, 1, 1, 1), 40.0, np.float32), np.array([-20.0], np.float32)])
    return network


def write_threshold_onnx(path, card=None, patch_size: int = 16):
    """Write the same threshold network as :func:`threshold_network`, as an ONNX file (with ``card`` beside it).

    Built with the ``onnx`` package alone, so tests of the segmenting path run
    it on ONNX Runtime exactly as the shipped models run, without Keras.
    """
    import onnx
    from onnx import TensorProto, helper

    from KneeBoneSegLib.models import write_card

    shape = ["batch", patch_size, patch_size, patch_size, 1]
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["image", "gain"], ["scaled"]),
            helper.make_node("Add", ["scaled", "offset"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["bone_probability"]),
        ],
        "threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("bone_probability", TensorProto.FLOAT, shape)],
        initializer=[helper.make_tensor("gain", TensorProto.FLOAT, [], [40.0]), helper.make_tensor("offset", TensorProto.FLOAT, [], [-20.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    if card is not None:
        write_card(card, path)
    return path
