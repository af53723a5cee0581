"""What the Slicer module's panel shows and offers: its fields, its state at a moment, its folders.

The module builds its parameter node from :func:`panel_parameters` at every
start of Slicer, so this module imports only the standard library and the
options (no numpy, SimpleITK, SciPy or VTK). What the panel offers at a
moment (:func:`panel_state`): nothing that starts work, nor the choosers of a
run's nodes, while a run or an install is under way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..errors import InputError
from ..options import SegmentOptions, option_fields, options_from_mapping


def export_folder(remembered: str, scene_folder: str, documents_folder: str) -> Path:
    """Where STL files go by default: the last folder used, else the scene's, else the user's documents.

    A folder is taken only when it is an existing absolute path, so an
    unsaved scene's ``"."`` (Slicer's working directory, often the
    application's own folder) is never chosen.
    """
    for candidate in (remembered, scene_folder):
        if candidate and os.path.isabs(candidate) and os.path.isdir(candidate):
            return Path(candidate)
    return Path(documents_folder)


def batch_folders(scans_folder: str, results_folder: str) -> tuple:
    """The panel's batch folders as ``(scans, results)`` paths, checked.

    ctkDirectoryButton shows ``"."`` until a folder is chosen, which the
    batch would take as Slicer's working directory (often the application's
    own folder or the user's home): only absolute paths are taken.

    Raises
    ------
    InputError
        When a folder is not chosen, the scans folder does not exist, or the
        results would go inside the scans folder (a later batch would take
        them for scans).
    """
    if not (scans_folder and results_folder and os.path.isabs(scans_folder) and os.path.isabs(results_folder)):
        raise InputError("choose the folder of scans and the folder for the results first")
    scans, results = Path(scans_folder).resolve(), Path(results_folder).resolve()
    if not scans.is_dir():
        raise InputError(f"the folder of scans {scans} does not exist: choose another one")
    if results == scans or scans in results.parents:
        raise InputError(f"the results folder {results} is inside the folder of scans: choose one outside it")
    return scans, results


@dataclass(frozen=True)
class PanelState:
    """What the module's panel offers at one moment; the widget shows it as it is."""

    choosers_enabled: bool  #: the input volume, output segmentation and model choosers
    segment_enabled: bool
    segment_tooltip: str
    export_enabled: bool
    show_3d_enabled: bool


def panel_state(has_input: bool, has_output: bool, running: bool, installing: bool, can_reuse: bool) -> PanelState:
    """The panel's state from what is chosen and what is under way.

    A run is bound to the nodes it started with, so their choosers are locked
    while it runs; nothing that starts work is offered while a run or a
    package install is under way. ``can_reuse``: the kept network output
    fits the chosen volume and network settings (:meth:`SegmentationRuns.can_reuse`).
    """
    busy = running or installing
    if installing:
        tooltip = "Installing the Python packages KneeBoneSeg needs..."
    elif not has_input:
        tooltip = "Choose an input volume first."
    elif can_reuse:
        tooltip = "Re-apply closing and smoothing to the kept network output (fast)."
    else:
        tooltip = "Run the network and segment femur, tibia and patella."
    return PanelState(
        choosers_enabled=not busy,
        segment_enabled=has_input and not busy,
        segment_tooltip=tooltip,
        export_enabled=has_output and not busy,
        show_3d_enabled=has_output,
    )


def device_description(device: str, last_device: Optional[str]) -> str:
    """The panel's line under the device choice: where the next run will compute."""
    if device == "auto":
        return f"Last run used {last_device}." if last_device else "The GPU if one is found, else the CPU."
    if device == "gpu":
        return "A GPU (the run stops with a message if none is found)."
    return "The CPU."


#: The options the module's panel shows, in its order; the others keep their defaults there.
PANEL_OPTIONS = (
    "model",
    "projections",
    "fusion",
    "closing_radius",
    "closing_units",
    "smoothing_iterations",
    "device",
    "precision",
)


@dataclass(frozen=True)
class PanelParameter:
    """A field of the module's parameter node, derived from the option it shows (:func:`panel_parameters`)."""

    name: str  #: the parameter's name, which the .ui's widgets name in their SlicerParameterName
    kind: type
    default: object
    help: str
    choices: Optional[tuple] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None


def panel_parameters() -> List[PanelParameter]:
    """The parameter node's fields: one per option of :data:`PANEL_OPTIONS`, with its type, default, choices and range.

    ``projections`` shows as a check box, ``three_projections``: checked runs
    3 projections, unchecked the scan's own one. It starts checked, as the
    shipped model's card asks (the option's default, None, means the card's).
    """
    parameters = []
    for option in option_fields():
        if option.name not in PANEL_OPTIONS:
            continue
        meta = option.metadata
        if option.name == "projections":
            parameters.append(PanelParameter("three_projections", bool, True, meta["help"]))
            continue
        parameters.append(
            PanelParameter(
                option.name,
                meta["kind"],
                option.default,
                meta["help"],
                meta["choices"],
                meta["minimum"],
                meta["maximum"],
            )
        )
    return parameters


def panel_options(parameters) -> SegmentOptions:
    """The run's options from the panel's parameter node (or any object with the fields of :func:`panel_parameters`)."""
    values = {parameter.name: getattr(parameters, parameter.name) for parameter in panel_parameters()}
    values["projections"] = 3 if values.pop("three_projections") else 1
    return options_from_mapping(values)
