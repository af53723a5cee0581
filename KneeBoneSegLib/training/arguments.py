"""``kneeboneseg train``'s options: every :class:`~.config.TrainingConfig` field F is the option --F, and back."""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict, fields, replace
from pathlib import Path

from ..errors import InputError
from ..network.architectures import ARCHITECTURES, NORMALIZATIONS
from .augmentation import Augmentation
from .config import TrainingConfig, fill_from_architecture
from .synthesis import Synthesis

_NOT_OPTIONS = ("images", "labels", "output", "resume", "overwrite", "progress_bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``kneeboneseg train``'s arguments to ``parser`` (read them back with :func:`config_from_args`)."""
    default = TrainingConfig(images=[], labels=[], output=Path("model.keras"))
    parser.add_argument(
        "pairs",
        nargs="*",
        type=Path,
        metavar="IMAGE LABELS",
        help="training scans, each followed by its label map (labels > 0 are bone); none when every crop is synthetic",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="model file to write (.keras); its card, loss curves and checkpoint go beside it",
    )
    parser.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default=default.architecture,
        help="the network and its sub-volumes, stride, batch and epochs (see KneeBoneSegLib.network.architectures; default: %(default)s)",
    )
    parser.add_argument(
        "--base-filters", type=int, default=None, help="filters of the first level (default: the architecture's)"
    )
    parser.add_argument("--depth", type=int, default=None, help="pooling steps (default: the architecture's)")
    parser.add_argument(
        "--patch-size", type=int, default=None, help="sub-volume edge in voxels (default: the architecture's)"
    )
    parser.add_argument(
        "--stride", type=int, default=None, help="inference stride recorded in the card (default: the architecture's)"
    )
    parser.add_argument(
        "--spacing-mm",
        type=_spacing,
        default=default.spacing_mm,
        help="isotropic voxel size the model works at, or 'none' for the scan's own grid (default: %(default)s)",
    )
    parser.add_argument(
        "--normalization",
        type=_json_object,
        default=default.normalization,
        help="intensity normalisation as JSON (default: %(default)s)",
    )
    parser.add_argument(
        "--train-range-i",
        type=int,
        nargs=2,
        metavar=("FROM", "TO"),
        default=None,
        help="train only on input voxels FROM <= i < TO along the first image axis; the rest is recorded as held out",
    )
    parser.add_argument("--epochs", type=int, default=None, help="(default: the architecture's)")
    parser.add_argument(
        "--steps-per-epoch", type=int, default=default.steps_per_epoch, help="batches per epoch (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="sub-volumes per batch (default: the architecture's)"
    )
    parser.add_argument(
        "--norm-layer",
        choices=NORMALIZATIONS,
        default=None,
        help="normalisation after each convolution (default: the architecture's)",
    )
    parser.add_argument(
        "--soft-labels",
        type=_boolean,
        default=None,
        metavar="true|false",
        help="train on the share of bone per voxel of the model's grid (default: the architecture's)",
    )
    parser.add_argument(
        "--crops-past-range",
        type=_boolean,
        default=default.crops_past_range,
        metavar="true|false",
        help="let sub-volumes reach half their edge past --train-range-i, seeing the image there but not its labels (default: %(default)s)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="wall-time budget: stop at the first epoch end past it (a later --resume goes on)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=default.learning_rate,
        help="Adam's learning rate (default: %(default)s; the paper used 1e-4)",
    )
    parser.add_argument(
        "--dice-weight",
        type=float,
        default=default.dice_weight,
        help="weight of a soft Dice term added to the cross-entropy (default: %(default)s)",
    )
    parser.add_argument(
        "--boundary-fraction",
        type=float,
        default=default.boundary_fraction,
        help="share of sub-volumes centred near a bone boundary (default: %(default)s)",
    )
    parser.add_argument(
        "--validation-patches",
        type=int,
        default=default.validation_patches,
        help="fixed validation sub-volumes (default: %(default)s)",
    )
    parser.add_argument(
        "--augmentation",
        type=_augmentation,
        default=default.augmentation,
        help=f"'none', or JSON overriding some of {json.dumps(asdict(default.augmentation))}",
    )
    parser.add_argument(
        "--synthetic-map",
        dest="synthetic_maps",
        nargs=2,
        action="append",
        default=[],
        metavar=("LABELS", "BONES"),
        help="a label map of another knee to synthesise training images from, and its bone values ('5,6,7', or 'all' "
        "for every non-zero one); the other values are other structures. Repeat for more maps",
    )
    parser.add_argument(
        "--synthetic-fraction",
        type=float,
        default=default.synthetic_fraction,
        help="share of the crops synthesised from label maps; 1: no real image at all (default: %(default)s)",
    )
    parser.add_argument(
        "--synthesize-training-labels",
        type=_boolean,
        default=default.synthesize_training_labels,
        metavar="true|false",
        help="synthesise images from the training pairs' label maps too, on their training range (default: %(default)s)",
    )
    parser.add_argument(
        "--synthesis",
        type=_synthesis,
        default=default.synthesis,
        help=f"how images are synthesised: JSON overriding some of {json.dumps(asdict(default.synthesis))}",
    )
    parser.add_argument("--seed", type=int, default=default.seed, help="(default: %(default)s)")
    parser.add_argument(
        "--initial-model",
        type=Path,
        default=None,
        help="fine-tune this .keras model (its card sets patch size, normalisation and spacing)",
    )
    parser.add_argument("--name", default=None, help="model name in its card (default: the output's file name)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the training whose checkpoint is beside OUTPUT, exactly where it stopped",
    )
    parser.add_argument("--overwrite", action="store_true", help="start again even if OUTPUT or its checkpoint exists")
    parser.add_argument(
        "--no-progress-bar",
        dest="progress_bar",
        action="store_false",
        help="no progress bar (epoch lines are still logged)",
    )


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The :class:`TrainingConfig` of parsed :func:`add_arguments` arguments."""
    if len(args.pairs) % 2:
        raise InputError(f"give IMAGE LABELS pairs; {len(args.pairs)} paths is an odd number")
    values = {f.name: getattr(args, f.name) for f in fields(TrainingConfig) if hasattr(args, f.name)}
    values.update(images=args.pairs[0::2], labels=args.pairs[1::2])
    values["synthetic_maps"] = [(Path(path), _bone_values(bones)) for path, bones in args.synthetic_maps]
    return TrainingConfig(**values).validate()


def command_line(config: TrainingConfig) -> str:
    """The ``kneeboneseg train`` command that reproduces ``config`` (data folders left out of absolute paths)."""
    default = TrainingConfig(images=[], labels=[], output=config.output)
    architecture_default = fill_from_architecture(replace(default, architecture=config.architecture))
    words = ["kneeboneseg", "train"]
    for image, labels in zip(config.images, config.labels):
        words += [_portable(image), _portable(labels)]
    words += ["-o", _portable(config.output)]
    for f in fields(TrainingConfig):
        value = getattr(config, f.name)
        unchanged = getattr(default if f.name == "architecture" else architecture_default, f.name)
        if f.name in _NOT_OPTIONS or value == unchanged:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "synthetic_maps":
            for path, bones in value:
                words += ["--synthetic-map", _portable(path), "all" if bones is None else ",".join(map(str, bones))]
        elif isinstance(value, Augmentation):
            words += [
                flag,
                "none" if value == Augmentation.none() else json.dumps(_changes(value, default.augmentation)),
            ]
        elif isinstance(value, Synthesis):
            words += [flag, json.dumps(_changes(value, default.synthesis))]
        elif isinstance(value, dict):
            words += [flag, json.dumps(value)]
        elif isinstance(value, tuple):
            words += [flag, *map(str, value)]
        else:
            words += [flag, "none" if value is None else _portable(value) if isinstance(value, Path) else str(value)]
    return shlex.join(words)


def _portable(path: Path) -> str:
    """A path as a card may record it: relative paths as given, absolute ones by name only."""
    path = Path(path)
    return path.name if path.is_absolute() else str(path)


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() == "true"


def _bone_values(text: str) -> tuple | None:
    """``'5,6,7'`` as (5, 6, 7); ``'all'`` as None (every non-zero value is bone)."""
    if text.lower() == "all":
        return None
    try:
        return tuple(int(value) for value in text.split(","))
    except ValueError:
        raise InputError(f"bone values must be integers separated by commas, or 'all', not {text!r}") from None


def _spacing(text: str) -> float | None:
    return None if text.lower() in ("none", "native", "0") else float(text)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('give a JSON object, e.g. \'{"method": "percentile"}\'')
    return value


def _changes(value, default) -> dict:
    """The fields of the dataclass ``value`` that differ from ``default``'s, as the JSON options take them."""
    defaults = asdict(default)
    return {k: v for k, v in asdict(value).items() if v != defaults[k]}


def _overridden(base, changes: dict, what: str):
    """The dataclass ``base`` with the fields in ``changes`` (JSON lists as tuples); an unknown field is refused."""
    unknown = set(changes) - {f.name for f in fields(base)}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(sorted(unknown))}")
    return replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})


def _synthesis(text: str) -> Synthesis:
    changes = _json_object(text)
    if isinstance(changes.get("augmentation"), dict):
        changes["augmentation"] = _overridden(Synthesis().augmentation, changes["augmentation"], "augmentation")
    return _overridden(Synthesis(), changes, "synthesis setting")


def _augmentation(text: str) -> Augmentation:
    if text.lower() == "none":
        return Augmentation.none()
    return _overridden(Augmentation(), _json_object(text), "augmentation")
