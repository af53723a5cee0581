"""What the module's panel offers at each moment: the library decides (``panel_state``), the widget shows it.

The widget needs the Slicer application, so its decisions live in
``KneeBoneSegLib.slicer.logic`` and are tested here; the first-use install's
steps are tested in ``test_slicer_environment.py``, the runs themselves in
``test_slicer_logic.py`` and ``test_worker.py``.
"""

from __future__ import annotations

import itertools

from KneeBoneSegLib.slicer.logic import device_description, panel_state

MOMENTS = [
    dict(zip(("has_input", "has_output", "running", "installing", "can_reuse"), values))
    for values in itertools.product((False, True), repeat=5)
]


def test_nothing_starts_work_and_no_chooser_moves_while_a_run_or_an_install_is_under_way():
    for moment in MOMENTS:
        state = panel_state(**moment)
        busy = moment["running"] or moment["installing"]
        assert state.choosers_enabled == (not busy), moment  # a run's results go to the nodes it started with
        assert state.segment_enabled == (moment["has_input"] and not busy), moment
        assert state.export_enabled == (moment["has_output"] and not busy), moment
        assert state.show_3d_enabled == moment["has_output"], moment
        assert not (busy and state.reapply_on_change), moment


def test_changing_closing_or_smoothing_reapplies_only_to_a_kept_output_of_the_chosen_volume():
    idle = dict(has_input=True, has_output=True, running=False, installing=False)
    assert panel_state(**idle, can_reuse=True).reapply_on_change
    assert not panel_state(**idle, can_reuse=False).reapply_on_change
    assert not panel_state(**dict(idle, has_output=False), can_reuse=True).reapply_on_change


def test_the_segment_button_says_what_it_will_do():
    idle = dict(has_output=False, running=False, installing=False)
    assert "input volume" in panel_state(has_input=False, can_reuse=False, **idle).segment_tooltip
    assert "Run the network" in panel_state(has_input=True, can_reuse=False, **idle).segment_tooltip
    assert "Re-apply closing and smoothing" in panel_state(has_input=True, can_reuse=True, **idle).segment_tooltip
    assert "Installing" in panel_state(has_input=True, has_output=False, running=False, installing=True, can_reuse=True).segment_tooltip


def test_the_device_line_says_where_the_next_run_computes():
    assert device_description("auto", None) == "The GPU if one is found, else the CPU."
    assert device_description("auto", "gpu (CUDA)") == "Last run used gpu (CUDA)."
    assert "stops with a message" in device_description("gpu", "cpu")
    assert device_description("cpu", "gpu") == "The CPU."
