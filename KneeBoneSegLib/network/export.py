"""Export a trained Keras network to ONNX, so that segmenting needs neither Keras nor TensorFlow.

Keras writes the graph (``Model.export(format="onnx")``, through tf2onnx on
the TensorFlow backend); this module fixes what the pipeline relies on (one
input ``image`` and one output ``bone_probability``, a free batch size, an
opset and IR version that the ONNX Runtime of Python 3.9 reads), checks that
ONNX Runtime reproduces the Keras probabilities, and records the export in the
model's card. Needs the ``[train]`` extra. A network trained on another
backend (Keras's torch backend trains twice as fast on the CPU) is exported
by a TensorFlow-backend process: the ``.keras`` file is the same on every backend.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from ..errors import ModelError
from .models import card_path, default_card, file_sha256, read_card, write_card

log = logging.getLogger(__name__)

#: Opset 17 and IR version 8 load on every ONNX Runtime from 1.14 on (Python 3.9's last is 1.19).
OPSET = 17
IR_VERSION = 8
INPUT_NAME = "image"
OUTPUT_NAME = "bone_probability"
#: Largest difference from Keras an export may show on random sub-volumes.
TOLERANCE = 1e-4


def export_onnx(
    keras_path: str | os.PathLike, onnx_path: str | os.PathLike | None = None, check_batch: int = 4
) -> dict:
    """Write ``keras_path`` as ONNX (default: beside it, ``.onnx``) and record the export in its card.

    The exported network is run on ``check_batch`` random sub-volumes (or slices) by
    ONNX Runtime and by Keras; an export that differs by more than
    :data:`TOLERANCE` is refused. The ONNX file is written whole or not at all.

    Returns the card's ``export["onnx"]`` record: file, opset, IR version,
    tensor names, SHA-256 of both files and the difference measured.
    """
    import keras

    keras_path = Path(keras_path)
    onnx_path = Path(onnx_path) if onnx_path else keras_path.with_suffix(".onnx")
    if keras.config.backend() != "tensorflow":
        return _export_with_tensorflow(keras_path, onnx_path)

    import onnx
    import onnxruntime

    try:
        network = keras.saving.load_model(keras_path, compile=False)
    except Exception as error:  # Keras raises many kinds for a damaged file
        raise ModelError(f"{keras_path}: the model could not be loaded ({type(error).__name__}: {error})") from None
    # A network of free sides (a 2D U-Net predicts whole slices) is checked on an oblong input, so that
    # an export that fixed its sides to one shape is refused.
    sides = [int(side) if side else 64 + 16 * axis for axis, side in enumerate(network.input_shape[1:-1])]
    batch = np.random.default_rng(0).random((check_batch, *sides, 1), dtype=np.float32)
    expected = keras.ops.convert_to_numpy(network.predict_on_batch(batch))  # also builds the graph export needs

    with tempfile.TemporaryDirectory(dir=onnx_path.parent) as scratch, atomic_file(onnx_path) as partial:
        raw = Path(scratch) / "raw.onnx"
        network.export(str(raw), format="onnx", opset_version=OPSET, verbose=False)
        onnx.save(_standardise(onnx.load(str(raw))), str(partial))
        session = onnxruntime.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
        difference = float(np.abs(session.run(None, {INPUT_NAME: batch})[0] - expected).max())
        if difference > TOLERANCE:
            raise ModelError(
                f"{keras_path}: the ONNX export differs from Keras by {difference:.2e} (> {TOLERANCE:g}); not written"
            )

    record = {
        "file": onnx_path.name,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "keras_file": keras_path.name,
        "keras_sha256": file_sha256(keras_path),
        "onnx_sha256": file_sha256(onnx_path),
        "max_abs_difference": difference,
        "exported_with": {"keras": keras.__version__, "backend": keras.config.backend(), "onnx": onnx.__version__},
    }
    card = read_card(keras_path) or default_card(network)
    card.export = {**(card.export or {}), "onnx": record}
    write_card(card, keras_path)
    if card_path(onnx_path) != card_path(keras_path):
        write_card(card, onnx_path)
    log.info("Exported %s to %s (largest difference from Keras %.1e)", keras_path, onnx_path, difference)
    return record


def _export_with_tensorflow(keras_path: Path, onnx_path: Path) -> dict:
    """Run ``kneeboneseg export`` in a TensorFlow-backend process; its card's record."""
    command = [sys.executable, "-m", "KneeBoneSegLib", "export", str(keras_path), "-o", str(onnx_path)]
    done = subprocess.run(command, env={**os.environ, "KERAS_BACKEND": "tensorflow"}, capture_output=True, text=True)
    if done.returncode:
        message = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ModelError(f"{keras_path}: the ONNX export failed: {message}")
    return read_card(keras_path).export["onnx"]


def _standardise(graph):
    """Name the graph's tensors as the pipeline expects, free its batch size and pin the IR version."""
    (graph_input,) = graph.graph.input
    (graph_output,) = graph.graph.output
    renames = {graph_input.name: INPUT_NAME, graph_output.name: OUTPUT_NAME}
    for node in graph.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    graph_input.name, graph_output.name = INPUT_NAME, OUTPUT_NAME
    for value in (graph_input, graph_output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    graph.ir_version = IR_VERSION
    # tf2onnx declares the ai.onnx.ml domain without using it; older runtimes reject unused newer domains.
    used = {node.domain for node in graph.graph.node}
    kept = [opset for opset in graph.opset_import if opset.domain in used or opset.domain in ("", "ai.onnx")]
    del graph.opset_import[:]
    graph.opset_import.extend(kept)
    return graph
