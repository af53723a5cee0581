"""What defines a training run (:class:`TrainingConfig`, filled from an architecture's presets) and what it produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..network.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE, NORMALIZATIONS, PRESET_SETTINGS
from ..network.models import ModelCard
from ..preprocess.normalization import DEFAULT_NORMALIZATION
from .augmentation import Augmentation
from .synthesis import Synthesis


@dataclass
class TrainingConfig:
    """Everything that defines a training run; ``kneeboneseg train`` fills it from its arguments.

    ``output`` is the ``.keras`` model to write. ``train_range_i`` restricts
    training to input voxels ``from <= i < to`` along the first image axis;
    the range left out must be one slab at either end (it becomes the card's
    ``heldout``). ``None`` for ``base_filters``, ``depth``, ``patch_size``,
    ``stride``, ``batch_size`` or ``epochs`` takes the architecture's
    (:data:`~KneeBoneSegLib.network.architectures.ARCHITECTURES`). With
    ``initial_model`` (fine-tuning) the architecture, patch size,
    normalisation and spacing come from that model's card.

    ``synthetic_maps`` are label maps of other knees, each with the values
    that are bone (None: every non-zero value; the others are other
    structures); a share ``synthetic_fraction`` of the crops gets images
    synthesised from them (:mod:`.synthesis`), and with
    ``synthesize_training_labels`` from the training pairs' label maps too
    (their training range only). At a fraction of 1 no real image is seen,
    and no pair is needed.
    """

    images: list[Path]
    labels: list[Path]
    output: Path
    architecture: str = DEFAULT_ARCHITECTURE
    base_filters: int | None = None
    depth: int | None = None
    patch_size: int | None = None
    stride: int | None = None  # the inference stride the card asks for
    spacing_mm: float | None = 0.7  # None: train on the scans' own grid
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    train_range_i: tuple[int, int] | None = None
    epochs: int | None = None
    steps_per_epoch: int = 100
    batch_size: int | None = None
    norm_layer: str | None = None  # normalisation after each convolution: batch or instance
    soft_labels: bool | None = None  # targets: the share of bone per voxel of the model's grid (else bone from a half)
    # Sub-volumes may reach half their edge past train_range_i: they see the image there, never its labels.
    crops_past_range: bool = False
    max_minutes: float | None = None  # wall-time budget: the run ends at the first epoch end past it
    learning_rate: float = 1e-3
    dice_weight: float = 1.0
    boundary_fraction: float = 0.5
    validation_patches: int = 16
    augmentation: Augmentation = field(default_factory=Augmentation)
    synthetic_maps: list = field(default_factory=list)  # (label map, bone values or None)
    synthetic_fraction: float = 0.0
    synthesize_training_labels: bool = False
    synthesis: Synthesis = field(default_factory=Synthesis)
    seed: int = 0
    initial_model: Path | None = None
    name: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress_bar: bool = True

    def validate(self) -> "TrainingConfig":
        self.images = [Path(p) for p in self.images]
        self.labels = [Path(p) for p in self.labels]
        self.output = Path(self.output)
        self.synthetic_maps = [
            (Path(path), None if bones is None else tuple(int(v) for v in bones)) for path, bones in self.synthetic_maps
        ]
        if len(self.images) != len(self.labels) or not (self.images or self.synthetic_fraction == 1.0):
            raise InputError("give one or more IMAGE LABELS pairs (an image, then its label map)")
        if self.output.suffix != ".keras":
            raise InputError(f"{self.output}: the model file must end in .keras")
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"architecture must be one of {', '.join(ARCHITECTURES)}, not {self.architecture!r}")
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise InputError(f"the synthetic fraction must lie in [0, 1], not {self.synthetic_fraction}")
        synthesizing = bool(self.synthetic_maps) or self.synthesize_training_labels
        if synthesizing != (self.synthetic_fraction > 0):
            raise InputError(
                "give label maps to synthesise from (--synthetic-map or --synthesize-training-labels) and a --synthetic-fraction above 0, both or neither"
            )
        if synthesizing and ARCHITECTURES[self.architecture].dimensions != 2:
            raise InputError("images are synthesised for the 2D networks: use --architecture slices")
        fill_from_architecture(self)
        positive = {
            "epochs": self.epochs,
            "steps per epoch": self.steps_per_epoch,
            "batch size": self.batch_size,
            "validation patches": self.validation_patches,
            "learning rate": self.learning_rate,
        }
        for what, value in positive.items():
            if not value > 0:
                raise InputError(f"{what} must be positive, not {value}")
        if not 0.0 <= self.boundary_fraction <= 1.0 or self.dice_weight < 0:
            raise InputError("boundary fraction must lie in [0, 1] and the Dice weight must be >= 0")
        if not 0 < self.stride <= self.patch_size:
            raise InputError(f"stride must lie in 1..patch size ({self.patch_size}), not {self.stride}")
        if self.norm_layer not in NORMALIZATIONS:
            raise InputError(f"normalisation layer must be one of {', '.join(NORMALIZATIONS)}, not {self.norm_layer!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InputError(f"the time budget must be a positive number of minutes, not {self.max_minutes}")
        if self.spacing_mm is not None and not self.spacing_mm > 0:
            raise InputError(f"spacing must be positive (or none for the scan's grid), not {self.spacing_mm}")
        if self.train_range_i is not None:
            start, stop = (int(v) for v in self.train_range_i)
            if not 0 <= start < stop:
                raise InputError(f"training range along i must satisfy 0 <= from < to, not {start} {stop}")
            self.train_range_i = (start, stop)
        return self

    @property
    def checkpoint_path(self) -> Path:
        return self.output.with_suffix(".checkpoint.npz")

    @property
    def curves_path(self) -> Path:
        return self.output.with_suffix(".loss.png")


def fill_from_architecture(config: TrainingConfig) -> TrainingConfig:
    """Give the settings ``config`` leaves at ``None`` its architecture's values."""
    preset = ARCHITECTURES[config.architecture]
    for name in PRESET_SETTINGS:
        if getattr(config, name) is None:
            setattr(config, name, getattr(preset, name))
    return config


@dataclass
class TrainingResult:
    """What a finished run produced: the model file (best validation loss) and the run's record."""

    model_path: Path
    card: ModelCard
    history: list[dict]
    network: object  # the keras.Model in its last state (not the best one, which is in model_path)
    steps: int
    seconds: float
