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
import logging
import os
import sys
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from ..atomic import atomic_file
from ..errors import InputError, ModelError
from ..options import SLICES_PER_CALL, SUBVOLUMES_PER_CALL, SegmentOptions
from ..preprocess.normalization import DEFAULT_NORMALIZATION, air_level, normalize_intensities
from ..preprocess.resampling import ModelGrid, obliquity_degrees
from ..threads import effective_threads
from ..volume import Volume
from .engines import open_network
from .inference import predict_slices, predict_volume
from .projections import fuse_probabilities, iter_projections

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class ModelInput:
    """A scan as a model sees it: the normalised image on the model's grid, and that grid (the way back)."""

    image: np.ndarray
    grid: ModelGrid


@dataclass(frozen=True)
class Model:
    """An opened model: its network, on the engine, device, threads and precision it was opened with, and its card.

    It is the one source of truth for how the network runs (:meth:`describe`);
    a run's options may not say otherwise (:meth:`check_options`). Open one
    with :func:`load_model`. ``network`` is an engine network (:mod:`.engines`).
    """

    network: object
    card: ModelCard
    path: Path | None = None

    def describe(self) -> dict:
        """What runs the network: engine, version, device, provider, threads, precision and CPU."""
        return self.network.describe()

    def opened_with(self) -> dict:
        """The engine, device, precision and threads the network runs with, as a run's options name them."""
        ran = self.describe()
        return {
            "engine": ran["engine"],
            "device": ran["device"],
            "precision": self.network.precision,
            "threads": effective_threads(self.network.threads),
        }

    def check_options(self, options: SegmentOptions) -> SegmentOptions:
        """``options`` with the engine, device, precision and threads this model runs with, or a one-line refusal.

        Options that name another engine, device or precision than the one the
        model was opened with, or other threads than it was opened for, are
        refused (``auto`` and ``None`` name none), as are those that do not fit
        the model: a stride for a network of slices, a stride past its
        sub-volumes, an uncertainty map from one projection.
        """
        opened = self.opened_with()
        for name, ran in opened.items():
            value = getattr(options, name)
            if value not in (None, "auto", ran):
                raise InputError(
                    f"the options ask for {name} {value}, but the model was opened for {ran}; "
                    f"open it with load_model(..., {name}={value!r}) or leave {name} out of the options"
                )
        slices = network_dimensions(self.card) == 2
        if slices and options.stride is not None:
            raise InputError(
                "this model predicts whole slices, not sub-volumes, so a stride means nothing to it; leave --stride out"
            )
        stride = options.stride or self.card.stride
        if not slices and stride > self.card.patch_size:
            raise InputError(
                f"stride {stride} is larger than the model's {self.card.patch_size}-voxel sub-volumes and would leave voxels unseen; use at most {self.card.patch_size}"
            )
        if options.keep_uncertainty and (options.projections or self.card.projections) < 3:
            raise InputError(
                "the uncertainty map is where the three projections disagree, and this run predicts one; ask for three projections (--projections 3)"
            )
        return replace(options, **opened)

    def fusion_rule(self, fusion: str) -> str:
        """The fusion a run applies: ``fusion`` itself, or for ``"model"`` the card's rule (OR where it names none)."""
        return (self.card.fusion or "or") if fusion == "model" else fusion

    def grid_for(self, volume: Volume) -> ModelGrid:
        """The grid this model sees ``volume`` on, and the way there and back."""
        return ModelGrid(volume.geometry, volume.array.shape, self.card.spacing_mm)

    def model_input(self, volume: Volume, run=None) -> ModelInput:
        """``volume`` normalised as the card says, on the model's grid (:class:`ModelGrid`: the card's spacing,
        reoriented upright where the scan is oblique). ``run(stage, function, *args)`` times the two stages."""
        run = run or (lambda stage, function, *args: function(*args))
        image = run("normalise", normalize_intensities, volume.array, self.card.normalization)
        grid = self.grid_for(volume)
        if grid.reoriented:
            log.info(
                "The scan's axes are %.0f degrees off the patient's: the network sees it on a grid aligned with the patient",
                obliquity_degrees(volume.geometry.direction),
            )
        if grid.resamples:
            image = run("resample", grid.from_scan, image)
        return ModelInput(image, grid)

    def projection_maps(
        self, model_input: ModelInput, options: SegmentOptions | None = None, progress=None
    ) -> Iterator[np.ndarray]:
        """The network's bone probability on each projection of ``model_input``, on the model's grid, one at a time.

        ``options``' network stage says how (projections, stride, aggregation,
        batch, air tiles); ``progress(stage, fraction)`` follows the batches.
        """
        options = self.check_options((options or SegmentOptions()).validate())
        card, image, grid = self.card, model_input.image, model_input.grid
        skip_below = air_level(image, within=grid.scanned()) if options.skip_air_tiles else None

        def predict_view(view: np.ndarray, name: str) -> np.ndarray:
            def batches_done(done: int, total: int) -> None:
                if progress is not None:
                    progress(f"network: {name}", done / max(total, 1))

            if (
                network_dimensions(card) == 2
            ):  # each projection's first axis is its plane's: the axial view's slices are axial
                return predict_slices(
                    view,
                    self.network,
                    2 ** card.architecture["depth"],
                    options.batch_size or SLICES_PER_CALL,
                    batches_done,
                    skip_below,
                )
            return predict_volume(
                view,
                self.network,
                patch_size=card.patch_size,
                stride=options.stride or card.stride,
                batch_size=options.batch_size or SUBVOLUMES_PER_CALL,
                aggregate=options.aggregate,
                progress=batches_done,
                skip_below=skip_below,
            )

        return iter_projections(
            image, predict_view, projections=options.projections or card.projections, direction=grid.direction
        )

    def predict(self, volume: Volume, options: SegmentOptions | None = None, progress=None) -> np.ndarray:
        """The fused bone probability of ``volume`` on its own grid (float32): :meth:`model_input`,
        :meth:`projection_maps`, fused by ``options.fusion``, brought back to the scan's grid."""
        options = (options or SegmentOptions()).validate()
        model_input = self.model_input(volume)
        probability = fuse_probabilities(
            self.projection_maps(model_input, options, progress), self.fusion_rule(options.fusion)
        )
        return model_input.grid.to_scan(probability)


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


def save_model(network, card: ModelCard, path: str | os.PathLike) -> Path:
    """Write the Keras ``network`` to ``path`` (``.keras``) and ``card`` beside it."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ModelError(f"{path}: model files must end in .keras")
    with atomic_file(path) as partial:
        network.save(partial)
    write_card(card, path)
    return path


def load_model(
    path: str | os.PathLike,
    card: ModelCard | None = None,
    engine: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    precision: str = "f32",
) -> Model:
    """Open a ``.onnx`` (or ``.keras``) model and its card, and check it fits the pipeline.

    ``card`` overrides the card file (or stands in for a missing one).
    ``engine``, ``device``, ``threads`` and ``precision`` say where and how
    the network runs (:func:`.engines.open_network`); the :class:`Model`
    keeps them for every run. Raises :class:`ModelError` with a
    one-line reason for a missing, corrupt or wrongly shaped model.
    """
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
        options.model or default_model_path(),
        engine=options.engine,
        device=options.device,
        threads=options.threads,
        precision=options.precision,
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
