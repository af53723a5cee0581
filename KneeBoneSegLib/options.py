"""The settings of a run, defined once: default, help, choices and the stage each one changes.

Every front end derives its settings from :class:`SegmentOptions`:

- the command line's flags (:func:`add_arguments`, :func:`options_from_arguments`);
- the request file the Slicer module hands its background process
  (``--options FILE``: :meth:`SegmentOptions.to_request`, :func:`options_from_mapping`);
- the Slicer module's parameter node and console API (``slicer.panel.panel_parameters``);
- the key under which the Slicer module keeps a network output for re-use
  (:meth:`SegmentOptions.network_key`).

What a run writes is part of its options too, so that every front end writes
the same files for the same options: ``segmentation.seg.nrrd`` and
``summary.json`` always, the STL files unless ``surfaces`` is off, and on
request ``labels.nii.gz`` (``nifti``), ``probability.nrrd``
(``keep_probability``) and ``uncertainty.nrrd`` (``keep_uncertainty``).

Each option belongs to one stage. A ``network`` option changes what the
network outputs, so changing it runs the network again; a ``postprocess``
option changes only what comes after the network; a ``run`` option changes
neither (where and how fast the run goes, what extra it keeps). The module
imports only the standard library: the Slicer module reads it before any
package is installed.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import InputError

FUSIONS = ("or", "vote", "mean")
#: ``fusion="model"`` takes the rule the model's card names (OR, the paper's, where it names none).
FUSION_CHOICES = ("model",) + FUSIONS
AGGREGATIONS = ("or", "mean")
DEVICE_CHOICES = ("auto", "cpu", "gpu")
#: ``auto`` and the names of :data:`~KneeBoneSegLib.network.engines.ENGINE_REGISTRY`.
ENGINES = ("auto", "onnxruntime", "openvino", "keras")
#: Arithmetic the network may run in: float32 (the default, the same everywhere) or bfloat16.
PRECISIONS = ("f32", "bf16")
CLOSING_UNITS = ("mm", "voxels")
PAPER_CLOSING_RADIUS_VOXELS = 9.0
#: The paper's 9 voxels of its 0.352 mm scan, as the same physical sphere on any grid.
CLOSING_RADIUS_MM = 3.2
#: Network calls' default batch: 32 sub-volumes of 32^3 (about a million voxels), or 4 whole slices (a 256^2 slice
#: is 65,536 voxels): 8 slices a call took the 2D model's whole run to 2.0 GiB and 32 to 2.7, 4 to 1.8 in the same time.
SUBVOLUMES_PER_CALL, SLICES_PER_CALL = 32, 4
STAGES = ("network", "postprocess", "run")
_KIND_NAMES = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}


def _is_kind(value, kind: type) -> bool:
    """``value`` is of ``kind``; a whole number is a number too, but true and false are neither."""
    accepted = (int, float) if kind is float else kind
    return isinstance(value, accepted) and (kind is bool or not isinstance(value, bool))


def closing_radius_default(units: str) -> float:
    """The default closing radius in ``units``: 3.2 mm, or the paper's 9 voxels."""
    return PAPER_CLOSING_RADIUS_VOXELS if units == "voxels" else CLOSING_RADIUS_MM


def _option(
    default,
    stage: str,
    help: str,
    *,
    kind: type = None,
    choices: Tuple = None,
    flag: str = None,
    minimum=None,
    maximum=None,
    commands=("segment",),
):
    """A field of :class:`SegmentOptions` with what every front end needs to offer it.

    ``kind``: the value's type where the default (None) does not tell it.
    ``flag``: the command line's flag (default ``--name-with-dashes``); a
    boolean option's flag sets the opposite of its default.
    ``commands``: the ``kneeboneseg`` sub-commands that offer it.
    """
    metadata = {
        "stage": stage,
        "help": help,
        "kind": kind or type(default),
        "choices": choices,
        "flag": flag,
        "minimum": minimum,
        "maximum": maximum,
        "commands": commands,
    }
    return field(default=default, metadata=metadata)


BOTH = ("segment", "postprocess")


@dataclass(frozen=True)
class SegmentOptions:
    """Settings of one run; the defaults are the recommended ones.

    Each field's help says what it does (``kneeboneseg segment --help`` shows
    the same text); :func:`option_fields` lists them with their stage.
    """

    model: str = _option(
        "",
        "network",
        "trained .onnx (or, with the [train] extra, .keras) model with its .json card (default: the shipped model)",
    )
    projections: Optional[int] = _option(
        None,
        "network",
        "predict on 1 projection (the scan's own axes) or 3 (default: the model card's; 3 for the shipped model)",
        kind=int,
        choices=(1, 3),
    )
    fusion: str = _option(
        "model",
        "network",
        "how projections are fused (or: the paper's; default: model, the model card's rule: or for the compact model, vote for the 2D one)",
        choices=FUSION_CHOICES,
    )
    aggregate: str = _option(
        "mean",
        "network",
        "how overlapping sub-volumes are merged (or: the paper's; default: mean, Gaussian-weighted)",
        choices=AGGREGATIONS,
    )
    stride: Optional[int] = _option(
        None,
        "network",
        "step between sub-volumes in the model's voxels (default: the model card's; half the sub-volume is more accurate and slower)",
        kind=int,
        minimum=1,
    )
    skip_air_tiles: bool = _option(
        True,
        "network",
        "run the network on sub-volumes of pure air too (left out by default; they come out as background either way)",
        flag="--all-tiles",
    )
    precision: str = _option(
        "f32",
        "network",
        "arithmetic of the network (default: f32, the same bones on every CPU; bf16: faster on CPUs with bfloat16 units, OpenVINO only)",
        choices=PRECISIONS,
    )
    threshold: float = _option(
        0.5, "postprocess", "probability above which a voxel is bone (default: 0.5; between 0 and 1)", commands=BOTH
    )
    closing_radius: float = _option(
        CLOSING_RADIUS_MM,
        "postprocess",
        f"sphere radius of the closing, 0 to skip (default: {CLOSING_RADIUS_MM:g} mm, the paper's 9 voxels of its 0.352 mm scan; "
        f"with --closing-units voxels, {PAPER_CLOSING_RADIUS_VOXELS:g}, the paper's exact rule)",
        minimum=0.0,
        maximum=30.0,
        commands=BOTH,
    )
    closing_units: str = _option(
        "mm", "postprocess", "units of --closing-radius (default: mm)", choices=CLOSING_UNITS, commands=BOTH
    )
    fill_holes: bool = _option(
        True,
        "postprocess",
        "keep holes enclosed in 3D or in a slice (filled by default)",
        flag="--no-fill-holes",
        commands=BOTH,
    )
    smoothing_iterations: int = _option(
        20,
        "postprocess",
        "Laplacian smoothing iterations of the surfaces (default: 20)",
        minimum=0,
        maximum=200,
        commands=BOTH,
    )
    surfaces: bool = _option(
        True, "postprocess", "skip the surfaces and STL files", flag="--no-surfaces", commands=BOTH
    )
    device: str = _option(
        "auto", "run", "where the network runs (default: auto: a GPU when the engine has one)", choices=DEVICE_CHOICES
    )
    engine: str = _option(
        "auto",
        "run",
        "what runs the model (default: auto: for a .onnx model OpenVINO on the CPU where it is installed, else ONNX Runtime; Keras for .keras)",
        choices=ENGINES,
    )
    threads: Optional[int] = _option(
        None,
        "run",
        "CPU threads every stage (the network too) may use (default: all cores this process may run on)",
        kind=int,
        minimum=1,
        commands=BOTH,
    )
    batch_size: Optional[int] = _option(
        None,
        "run",
        f"sub-volumes (or slices, for a 2D model) per network call (default: {SUBVOLUMES_PER_CALL} sub-volumes or {SLICES_PER_CALL} slices)",
        kind=int,
        minimum=1,
    )
    keep_uncertainty: bool = _option(
        False,
        "run",
        "also write where the three projections disagree (uncertainty.nrrd, 0 agree to 1 opposite), to see where to look; needs --projections 3",
        flag="--save-uncertainty",
    )
    keep_probability: bool = _option(
        False,
        "run",
        "also write the fused bone probability (probability.nrrd), from which postprocess runs again without the network",
        flag="--save-probability",
    )
    nifti: bool = _option(False, "run", "also write the label map as labels.nii.gz", flag="--nifti", commands=BOTH)

    def validate(self) -> "SegmentOptions":
        """These options, or a one-line :class:`InputError` naming the first that is wrong."""
        for option in fields(self):
            value, meta = getattr(self, option.name), option.metadata
            if value is None and option.default is None:
                continue
            label = option.name.replace("_", " ")
            if not _is_kind(value, meta["kind"]):
                raise InputError(f"{label} must be {_KIND_NAMES[meta['kind']]}, not {value!r}")
            if meta["choices"] and value not in meta["choices"]:
                raise InputError(f"{label} must be one of {', '.join(map(str, meta['choices']))}, not {value!r}")
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise InputError(f"{label} must be at least {meta['minimum']:g}, not {value}")
            if meta["maximum"] is not None and value > meta["maximum"]:
                raise InputError(f"{label} must be at most {meta['maximum']:g}, not {value}")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"threshold must lie between 0 and 1, not {self.threshold}")
        return self

    def stage(self, stage: str) -> Dict[str, Any]:
        """The options of one stage (``network``, ``postprocess`` or ``run``) and their values."""
        return {option.name: getattr(self, option.name) for option in option_fields(stage)}

    def network_key(self) -> Tuple:
        """What a network output depends on: equal keys, equal network outputs (for the same volume)."""
        return tuple(sorted(self.stage("network").items()))

    def to_request(self) -> Dict[str, Any]:
        """Every option as plain JSON values (:func:`options_from_mapping` reads it back)."""
        return asdict(self)

    def with_values(self, **values) -> "SegmentOptions":
        """A copy with ``values`` changed, validated."""
        return options_from_mapping(values, self)


def option_fields(stage: Optional[str] = None):
    """The fields of :class:`SegmentOptions` (of one stage), in order, each with its ``metadata``."""
    return [option for option in fields(SegmentOptions) if stage is None or option.metadata["stage"] == stage]


def options_from_mapping(values: Mapping[str, Any], base: Optional[SegmentOptions] = None) -> SegmentOptions:
    """``base`` (default: the defaults) with ``values`` set by name, validated.

    A closing unit given without a radius takes that unit's default radius
    (3.2 mm, or the paper's 9 voxels). An unknown name is refused in one line.
    """
    names = {option.name for option in fields(SegmentOptions)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"unknown option {', '.join(unknown)}; the options are {', '.join(sorted(names))}")
    values = dict(values)
    if "closing_units" in values and "closing_radius" not in values:
        values["closing_radius"] = closing_radius_default(values["closing_units"])
    return replace(base or SegmentOptions(), **values).validate()


def add_arguments(parser, command: str) -> None:
    """Add the options ``command`` offers to an ``argparse`` parser, grouped by stage.

    Their defaults are left out of the parsed arguments (``argparse.SUPPRESS``),
    so :func:`options_from_arguments` sees only what was given.
    """
    titles = {"network": "network", "postprocess": "post-processing", "run": "how the run goes"}
    for stage in STAGES:
        offered = [option for option in option_fields(stage) if command in option.metadata["commands"]]
        if not offered:
            continue
        group = parser.add_argument_group(titles[stage])
        for option in offered:
            meta = option.metadata
            flag = meta["flag"] or "--" + option.name.replace("_", "-")
            if meta["kind"] is bool:
                group.add_argument(
                    flag,
                    dest=option.name,
                    action="store_const",
                    const=not option.default,
                    default=argparse.SUPPRESS,
                    help=meta["help"],
                )
            else:
                group.add_argument(
                    flag,
                    dest=option.name,
                    type=meta["kind"],
                    choices=meta["choices"],
                    default=argparse.SUPPRESS,
                    help=meta["help"],
                )


def options_from_arguments(arguments, base: Optional[SegmentOptions] = None) -> SegmentOptions:
    """The options given on a command line (parsed by a parser :func:`add_arguments` filled), over ``base``."""
    given = {
        option.name: getattr(arguments, option.name)
        for option in fields(SegmentOptions)
        if hasattr(arguments, option.name)
    }
    return options_from_mapping(given, base)
