"""Trained models: a network file (``.onnx`` to segment, ``.keras`` to train) and the JSON card beside it.

Training writes ``model.keras`` and exports ``model.onnx`` beside it
(:mod:`.export`); both share one card (``model.json``), which says what the
network needs and what it was trained on, so that the pipeline never guesses::

    {
      "name": "compact-unet",
      "architecture": {"base_filters": 16, "depth": 3},
      "patch_size": 64,
      "stride": 32,
      "projections": 3,                # projections predicted by default (1 or 3)
      "fusion": "vote",                # optional: their fusion by default (or, the paper's, where absent)
      "normalization": {"method": "percentile", "low": 0.5, "high": 99.5},
      "spacing_mm": null,              # resample to this spacing first; null = native grid
      "training": {...},               # data, augmentation, steps, time, machine
      "quality": {...},                # measured figures, with the data they were measured on
      "heldout": {"axis": "i", "from": 0, "to": 200},  # optional: voxels never trained on
      "trained_on": {...},             # optional: field strength, sequence, voxel size, histogram (inputcheck)
      "confidence": {...},             # optional: review thresholds, calibrated held out (verdicts)
      "export": {"onnx": {...}}        # opset, tensor names, SHA-256 of both files
    }

Segmenting loads the ``.onnx`` file on ONNX Runtime (:mod:`.engines`) and
needs neither Keras nor TensorFlow; a ``.keras`` file still runs, through
Keras, where the ``[train]`` extra is installed. A network file without a card (for example one saved by the paper's
notebook) loads with :func:`default_card`, which the caller may adjust (the
paper's notebook wants ``{"method": "divide", "to_uint8": true}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ModelError
from ..atomic import atomic_file
from ..preprocess.normalization import DEFAULT_NORMALIZATION

SHIPPED_MODEL = "kneeboneseg-compact.onnx"
MODEL_SUFFIXES = (".onnx", ".keras")
MODEL_ENV = "KNEEBONESEG_MODEL"


@dataclass
class ModelCard:
    """What a trained network expects and where it came from."""

    name: str = "unet3d"
    architecture: dict = field(default_factory=dict)
    patch_size: int = 64
    stride: int = 32
    projections: int = 3  # projections to predict unless a run asks otherwise (1: the scan's own axes)
    fusion: str | None = None  # how they are fused unless a run asks otherwise (None: or, the paper's rule)
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    spacing_mm: list | None = None
    training: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    heldout: dict | None = None
    trained_on: dict | None = None  # acquisition and histogram of the training data (inputcheck)
    confidence: dict | None = None  # thresholds for a "review" verdict, calibrated held out (verdicts)
    export: dict | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Model:
    """A loaded network with its card.

    ``network`` is an engine network (:mod:`.engines`) or a bare Keras model;
    either maps a batch (B, p, p, p, 1) to probabilities with ``predict_on_batch``.
    """

    network: object
    card: ModelCard
    path: Path | None = None


def card_path(model_path: str | os.PathLike) -> Path:
    """The card's path for a model file: ``model.onnx`` or ``model.keras`` -> ``model.json``."""
    return Path(model_path).with_suffix(".json")


def default_model_path() -> Path:
    """The model used when none is given: ``$KNEEBONESEG_MODEL``, else the shipped one.

    The shipped model lives in the repository's ``Resources/Models`` folder,
    beside this package in a checkout, an editable install and the Slicer
    extension alike; a wheel installs it under ``<prefix>/share/kneeboneseg/Models``.
    """
    override = os.environ.get(MODEL_ENV)
    if override:
        return Path(override)
    beside_package = Path(__file__).resolve().parents[2] / "Resources" / "Models" / SHIPPED_MODEL
    installed = Path(sys.prefix) / "share" / "kneeboneseg" / "Models" / SHIPPED_MODEL
    return installed if installed.is_file() and not beside_package.is_file() else beside_package


def default_card(network=None) -> ModelCard:
    """A card for a network file without one: patch size from its input, stride half of it (a 2D network's sides are free)."""
    card = ModelCard()
    if network is not None and len(network.input_shape) == 4:
        card.architecture = {"dimensions": 2}
    elif network is not None:
        card.patch_size = int(network.input_shape[1])
        card.stride = card.patch_size // 2
    return card


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks: cards name exactly which files they describe."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(model: Model, path: str | os.PathLike) -> Path:
    """Write ``path`` (``.keras``) and its JSON card beside it."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ModelError(f"{path}: model files must end in .keras")
    with atomic_file(path) as partial:
        model.network.save(partial)
    write_card(model.card, path)
    return path


def load_model(
    path: str | os.PathLike,
    card: ModelCard | None = None,
    engine: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    precision: str = "f32",
) -> Model:
    """Load a ``.onnx`` (or ``.keras``) model and its card, and check it fits the pipeline.

    ``card`` overrides the card file (or stands in for a missing one).
    ``engine``, ``device``, ``threads`` and ``precision`` say where and how
    the network runs (:func:`.engines.open_network`). Raises :class:`ModelError` with a
    one-line reason for a missing, corrupt or wrongly shaped model.
    """
    from .engines import open_network

    path = Path(path)
    if path.suffix not in MODEL_SUFFIXES:
        raise ModelError(f"{path}: a model file ends in .onnx (to segment) or .keras (to train); pass --model with one")
    if not path.is_file():
        raise ModelError(f"{path}: model file not found; pass --model with a .onnx or .keras file")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a Keras .keras file (it is not a zip archive); re-download or re-train it")
    network = open_network(path, engine=engine, device=device, threads=threads, precision=precision)
    _check_shape(network, path)
    if card is None:
        card = read_card(path) or default_card(network)
    if len(network.input_shape) == 5 and int(network.input_shape[1]) != int(card.patch_size):
        raise ModelError(
            f"{path}: the network takes {network.input_shape[1]}^3 sub-volumes but its card says {card.patch_size}"
        )
    return Model(network=network, card=card, path=path)


def load_model_for(options) -> Model:
    """The model a run's :class:`~KneeBoneSegLib.options.SegmentOptions` name (the shipped one where they name none),
    opened on their engine, device, threads and precision."""
    return load_model(
        options.model or default_model_path(), engine=options.engine, device=options.device, threads=options.threads, precision=options.precision
    )


def read_card(model_path: str | os.PathLike) -> ModelCard | None:
    """The card beside ``model_path``, or None where there is none."""
    card_file = card_path(model_path)
    if not card_file.is_file():
        return None
    try:
        return ModelCard.from_dict(json.loads(card_file.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise ModelError(f"{card_file}: the model card is not valid JSON ({error})") from None


def write_card(card: ModelCard, model_path: str | os.PathLike) -> Path:
    """Write ``card`` beside ``model_path`` (as ``.json``), whole or not at all."""
    card_file = card_path(model_path)
    with atomic_file(card_file) as partial:
        partial.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    return card_file


def _check_shape(network, path: Path) -> None:
    shape_in, shape_out = tuple(network.input_shape), tuple(network.output_shape)
    cubic = len(shape_in) == 5 and shape_in[1] is not None and shape_in[1] == shape_in[2] == shape_in[3]
    # A 2D network predicts whole slices: its sides are free.
    slices = len(shape_in) == 4 and shape_in[1] is None and shape_in[2] is None
    if not ((cubic or slices) and shape_in[-1] == 1 and shape_out[1:] == shape_in[1:-1] + (1,)):
        raise ModelError(
            f"{path}: expected a 3D network from one-channel cubic sub-volumes (or a 2D one from slices of any size) "
            f"to one probability channel, got input {shape_in} and output {shape_out}"
        )


def network_dimensions(card: ModelCard) -> int:
    """3 for a network of sub-volumes, 2 for one of slices (cards without the entry predate 2D networks)."""
    return int(card.architecture.get("dimensions", 3))
