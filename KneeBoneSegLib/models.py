"""Trained models: a Keras ``.keras`` file and the JSON card beside it.

The card (``model.json`` next to ``model.keras``) says what the network needs
and what it was trained on, so that the pipeline never guesses::

    {
      "name": "compact-unet",
      "architecture": {"base_filters": 16, "depth": 3},
      "patch_size": 64,
      "stride": 32,
      "normalization": {"method": "percentile", "low": 0.5, "high": 99.5},
      "spacing_mm": null,              # resample to this spacing first; null = native grid
      "training": {...},               # data, augmentation, steps, time, machine
      "quality": {...},                # measured figures, with the data they were measured on
      "heldout": {"axis": "i", "from": 0, "to": 200},  # optional: voxels never trained on
      "trained_on": {...},             # optional: field strength, sequence, voxel size, histogram (inputcheck)
      "confidence": {...}              # optional: review thresholds, calibrated held out (verdicts)
    }

A ``.keras`` file without a card (for example one saved by the paper's
notebook) loads with :func:`default_card`, which the caller may adjust (the
paper's notebook wants ``{"method": "divide", "to_uint8": true}``).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelError
from .normalization import DEFAULT_NORMALIZATION

SHIPPED_MODEL = "kneeboneseg-compact.keras"
MODEL_ENV = "KNEEBONESEG_MODEL"


@dataclass
class ModelCard:
    """What a trained network expects and where it came from."""

    name: str = "unet3d"
    architecture: dict = field(default_factory=dict)
    patch_size: int = 64
    stride: int = 32
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    spacing_mm: list | None = None
    training: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    heldout: dict | None = None
    trained_on: dict | None = None  # acquisition and histogram of the training data (inputcheck)
    confidence: dict | None = None  # thresholds for a "review" verdict, calibrated held out (verdicts)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Model:
    """A loaded Keras network with its card."""

    network: object  # keras.Model; typed loosely so importing this module stays cheap
    card: ModelCard
    path: Path | None = None


def card_path(model_path: str | os.PathLike) -> Path:
    """The card's path for a model file: ``model.keras`` -> ``model.json``."""
    return Path(model_path).with_suffix(".json")


def default_model_path() -> Path:
    """The model used when none is given: ``$KNEEBONESEG_MODEL``, else the shipped one.

    The shipped model lives in the repository's ``Resources/Models`` folder,
    beside this package in a checkout, an editable install and the Slicer
    extension alike.
    """
    override = os.environ.get(MODEL_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "Resources" / "Models" / SHIPPED_MODEL


def default_card(network=None) -> ModelCard:
    """A card for a bare ``.keras`` file: patch size from its input, stride half of it."""
    card = ModelCard()
    if network is not None:
        card.patch_size = int(network.input_shape[1])
        card.stride = card.patch_size // 2
    return card


def save_model(model: Model, path: str | os.PathLike) -> Path:
    """Write ``path`` (``.keras``) and its JSON card beside it."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ModelError(f"{path}: model files must end in .keras")
    model.network.save(path)
    card_path(path).write_text(json.dumps(model.card.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def load_model(path: str | os.PathLike, card: ModelCard | None = None) -> Model:
    """Load a ``.keras`` model and its card, and check it fits the pipeline.

    ``card`` overrides the card file (or stands in for a missing one).
    Raises :class:`ModelError` with a one-line reason for a missing, corrupt
    or wrongly shaped model.
    """
    import keras

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found; pass --model with a .keras file")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a Keras .keras file (it is not a zip archive); re-download or re-train it")
    try:
        network = keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many kinds for a damaged file
        raise ModelError(f"{path}: the model could not be loaded ({type(error).__name__}: {error})") from None
    _check_shape(network, path)
    if card is None:
        card_file = card_path(path)
        if card_file.is_file():
            try:
                card = ModelCard.from_dict(json.loads(card_file.read_text(encoding="utf-8")))
            except (ValueError, TypeError) as error:
                raise ModelError(f"{card_file}: the model card is not valid JSON ({error})") from None
        else:
            card = default_card(network)
    if int(network.input_shape[1]) != int(card.patch_size):
        raise ModelError(
            f"{path}: the network takes {network.input_shape[1]}^3 sub-volumes but its card says {card.patch_size}"
        )
    return Model(network=network, card=card, path=path)


def _check_shape(network, path: Path) -> None:
    shape_in, shape_out = tuple(network.input_shape), tuple(network.output_shape)
    cubic = len(shape_in) == 5 and shape_in[1] is not None and shape_in[1] == shape_in[2] == shape_in[3]
    if not (cubic and shape_in[4] == 1 and shape_out[1:] == shape_in[1:4] + (1,)):
        raise ModelError(
            f"{path}: expected a 3D network from one-channel cubic sub-volumes to one probability channel, "
            f"got input {shape_in} and output {shape_out}"
        )
