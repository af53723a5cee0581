"""A run's options, defined once (KneeBoneSegLib.options), and every front end derived from them."""

from __future__ import annotations

import json

import pytest

from KneeBoneSegLib.cli import build_parser
from KneeBoneSegLib.errors import InputError
from KneeBoneSegLib.options import STAGES, SegmentOptions, option_fields, options_from_arguments, options_from_mapping
from KneeBoneSegLib.slicer.panel import panel_options, panel_parameters


def test_every_option_has_one_stage_help_and_a_command_that_offers_it():
    for option in option_fields():
        meta = option.metadata
        assert meta["stage"] in STAGES and meta["help"] and meta["commands"], option.name
    assert {option.name for option in option_fields("postprocess")} == {
        "threshold",
        "closing_radius",
        "closing_units",
        "fill_holes",
        "smoothing_iterations",
        "surfaces",
    }


def test_the_command_line_offers_each_option_and_reads_back_what_was_given():
    parser = build_parser()
    arguments = parser.parse_args(
        [
            "segment",
            "in.nrrd",
            "-o",
            "out",
            "--projections",
            "1",
            "--all-tiles",
            "--no-fill-holes",
            "--closing-units",
            "voxels",
        ]
    )
    options = options_from_arguments(arguments)
    # Only what was given changes; a unit given without a radius takes that unit's default radius (the paper's 9 voxels).
    assert options == SegmentOptions(
        projections=1, skip_air_tiles=False, fill_holes=False, closing_units="voxels", closing_radius=9.0
    )
    segment_help = parser._subparsers._group_actions[0].choices["segment"].format_help()
    for option in option_fields():
        flag = option.metadata["flag"] or "--" + option.name.replace("_", "-")
        assert flag in segment_help, option.name
    post = options_from_arguments(parser.parse_args(["postprocess", "mask.nrrd", "-o", "out", "--threshold", "0.3"]))
    assert post == SegmentOptions(threshold=0.3)
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["postprocess", "mask.nrrd", "-o", "out", "--projections", "1"]
        )  # a network option means nothing there


def test_wrong_values_and_unknown_names_are_refused_in_one_line():
    for values, message in (
        ({"projections": 2}, "projections must be one of 1, 3"),
        ({"fusion": "max"}, "fusion must be one of model, or, vote, mean"),
        ({"closing_radius": -1.0}, "closing radius must be at least 0"),
        ({"threshold": 1.0}, "threshold must lie between 0 and 1"),
        ({"stride": 0}, "stride must be at least 1"),
        ({"smoothing_iterations": "many"}, "smoothing iterations must be a whole number"),
        ({"closing_raduis": 3.0}, "unknown option closing_raduis"),
    ):
        with pytest.raises(InputError, match=message) as raised:
            options_from_mapping(values)
        assert "\n" not in str(raised.value)


def test_a_request_round_trips_through_json_and_the_network_key_holds_only_network_options():
    options = SegmentOptions(
        projections=3, fusion="vote", closing_radius=2.0, device="cpu", precision="bf16", model="m.onnx"
    )
    assert options_from_mapping(json.loads(json.dumps(options.to_request()))) == options
    network = dict(options.network_key())
    assert set(network) == {option.name for option in option_fields("network")}
    assert options.with_values(closing_radius=5.0, threads=1, device="gpu").network_key() == options.network_key()
    assert options.with_values(stride=8).network_key() != options.network_key()


class _ParameterNode:
    """The panel's parameter node as the module builds it: one attribute per panel parameter, at its default."""

    def __init__(self, **changes):
        for parameter in panel_parameters():
            setattr(self, parameter.name, changes.get(parameter.name, parameter.default))


def test_the_panels_parameters_are_derived_from_the_options():
    options = {option.name: option for option in option_fields()}
    for parameter in panel_parameters():
        if parameter.name == "three_projections":
            continue
        option = options[parameter.name]
        assert (parameter.kind, parameter.default, parameter.choices) == (
            option.metadata["kind"],
            option.default,
            option.metadata["choices"],
        )
    assert panel_options(_ParameterNode()) == SegmentOptions(projections=3)
    assert panel_options(
        _ParameterNode(three_projections=False, closing_units="voxels", closing_radius=9.0)
    ) == SegmentOptions(projections=1, closing_units="voxels", closing_radius=9.0)
