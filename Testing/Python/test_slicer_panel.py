"""What the module's panel offers at each moment: the library decides (``panel_state``), the widget shows it.

The widget needs the Slicer application, so its decisions live in
``KneeBoneSegLib.slicer.logic`` and are tested here; the first-use install's
steps are tested in ``test_slicer_environment.py``, the runs themselves in
``test_slicer_logic.py`` and ``test_worker.py``.
"""

from __future__ import annotations

import itertools

import pytest

from KneeBoneSegLib.errors import InputError
from KneeBoneSegLib.slicer.panel import batch_folders, device_description, panel_state

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


def test_the_segment_button_says_what_it_will_do():
    idle = dict(has_output=False, running=False, installing=False)
    assert "input volume" in panel_state(has_input=False, can_reuse=False, **idle).segment_tooltip
    assert "Run the network" in panel_state(has_input=True, can_reuse=False, **idle).segment_tooltip
    assert "Re-apply closing and smoothing" in panel_state(has_input=True, can_reuse=True, **idle).segment_tooltip
    assert (
        "Installing"
        in panel_state(has_input=True, has_output=False, running=False, installing=True, can_reuse=True).segment_tooltip
    )


def test_the_device_line_says_where_the_next_run_computes():
    assert device_description("auto", None) == "The GPU if one is found, else the CPU."
    assert device_description("auto", "gpu (CUDA)") == "Last run used gpu (CUDA)."
    assert "stops with a message" in device_description("gpu", "cpu")
    assert device_description("cpu", "gpu") == "The CPU."


def test_a_batch_without_chosen_folders_is_refused_in_one_line(tmp_path, monkeypatch):
    """ctkDirectoryButton shows "." until a folder is chosen: the batch must not take Slicer's working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scans").mkdir()
    for scans, results in (
        (".", "."),
        ("", str(tmp_path / "out")),
        (str(tmp_path / "scans"), "."),
        ("scans", str(tmp_path / "out")),
    ):
        with pytest.raises(InputError, match="^choose the folder of scans and the folder for the results first$"):
            batch_folders(scans, results)
    with pytest.raises(InputError, match="does not exist"):
        batch_folders(str(tmp_path / "gone"), str(tmp_path / "out"))
    for inside in (tmp_path / "scans", tmp_path / "scans" / "results"):
        with pytest.raises(InputError, match="inside the folder of scans"):
            batch_folders(str(tmp_path / "scans"), str(inside))
    assert batch_folders(str(tmp_path / "scans"), str(tmp_path / "out")) == (tmp_path / "scans", tmp_path / "out")
    assert list(tmp_path.iterdir()) == [tmp_path / "scans"], "checking the folders writes nothing"
