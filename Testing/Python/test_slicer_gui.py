"""The panel's widgets under a real Qt (PyQt5, offscreen): bound once per parameter node, re-applied only by the user.

Slicer's ``parameterNodeWrapper`` needs the Slicer application, so
:class:`SlicerWrapper` below does what its ``connectGui``,
``connectParametersToGui`` and ``disconnectGui`` do in 3D Slicer 5.6.2 and
5.8.1 (``Base/Python/slicer/parameterNodeWrapper/wrapper.py`` and
``guiConnectors.py``): each connection clears and refills a bound combo box and
connects it to the node on ``currentIndexChanged``; ``connectGui`` returns no
tag. The parameters live in a real MRML parameter node (slicer-core).
"""

from __future__ import annotations

import os

import pytest

QtWidgets = pytest.importorskip("PyQt5.QtWidgets", reason="needs PyQt5 (pip install kneeboneseg[test])")
slicer = pytest.importorskip("slicer", reason="needs the PyPI package slicer-core")
if not hasattr(slicer, "vtkMRMLScriptedModuleNode"):
    pytest.skip("the installed 'slicer' package has no MRML classes (install slicer-core)", allow_module_level=True)

from PyQt5.QtCore import Qt  # noqa: E402
from PyQt5.QtTest import QTest  # noqa: E402

from KneeBoneSegLib.slicer.gui import (  # noqa: E402
    PARAMETER_NAME_PROPERTY,
    REAPPLY_SIGNALS,
    ParameterGuiBinding,
    parameter_widgets,
)
from KneeBoneSegLib.slicer.panel import panel_parameters  # noqa: E402

CHOICES = {
    parameter.name: [str(choice) for choice in parameter.choices]
    for parameter in panel_parameters()
    if parameter.choices
}
DEFAULTS = {parameter.name: str(parameter.default) for parameter in panel_parameters() if parameter.choices}


@pytest.fixture(scope="module")
def application():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


class SlicerWrapper:
    """A parameter node wrapper that connects widgets as Slicer 5.6.2 and 5.8.1 do (see the module's docstring)."""

    connections = 0

    def __init__(self, node):
        self.parameterNode = node
        self._guis = {}

    def connectParametersToGui(self, widgets):
        SlicerWrapper.connections += 1
        callbacks = {}
        for name, box in widgets.items():
            box.clear()  # QComboBoxToStringableConnector.__init__
            box.addItems(CHOICES[name])
            box.setCurrentIndex(CHOICES[name].index(self.parameterNode.GetParameter(name) or DEFAULTS[name]))
            callbacks[name] = self._writer(name, box)
            box.currentIndexChanged.connect(callbacks[name])
        tag = len(self._guis)
        self._guis[tag] = (widgets, callbacks)
        return tag

    def connectGui(self, widgets):
        self.connectParametersToGui(widgets)  # returns None before Slicer 5.10

    def disconnectGui(self, tag):
        if tag in self._guis:
            widgets, callbacks = self._guis.pop(tag)
            for name, box in widgets.items():
                box.currentIndexChanged.disconnect(callbacks[name])

    def _writer(self, name, box):
        def write(index):
            # QComboBoxToStringableConnector.read: choices[currentIndex], so -1 (a cleared box) reads the last choice.
            self.parameterNode.SetParameter(name, CHOICES[name][box.currentIndex()])

        return write


def _panel(application):
    """The panel's bound combo boxes, as the .ui names them, inside one parent widget."""
    panel = QtWidgets.QWidget()
    for name in CHOICES:
        box = QtWidgets.QComboBox(panel)
        box.setProperty(PARAMETER_NAME_PROPERTY, name)
    QtWidgets.QSpinBox(panel)  # no parameter: not bound
    return panel


def _stored_scene_values(scene):
    """A parameter node as a saved scene brings it: every choice other than its default."""
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "KneeBoneSeg")
    for name, choices in CHOICES.items():
        node.SetParameter(name, next(choice for choice in choices if choice != DEFAULTS[name]))
    return node, {name: node.GetParameter(name) for name in CHOICES}


def test_the_widgets_are_connected_once_and_keep_the_scenes_choices(application):
    panel = _panel(application)
    widgets = parameter_widgets(panel.findChildren(QtWidgets.QWidget))
    assert sorted(widgets) == sorted(CHOICES)
    scene = slicer.vtkMRMLScene()
    node, stored = _stored_scene_values(scene)

    # What the module did before: connectGui on each enter, disconnectGui(None) on each exit.
    before = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "before")
    for name, value in stored.items():
        before.SetParameter(name, value)
    first = SlicerWrapper(before)
    tag = first.connectGui(widgets)  # setup()
    first.disconnectGui(tag)  # exit(): no tag, nothing disconnected
    SlicerWrapper(before).connectGui(widgets)  # enter()
    assert {name: before.GetParameter(name) for name in CHOICES} != stored, "the stand-in must show the lost choices"

    panel = _panel(application)
    widgets = parameter_widgets(panel.findChildren(QtWidgets.QWidget))
    SlicerWrapper.connections = 0
    binding = ParameterGuiBinding(widgets)
    assert binding.bind(SlicerWrapper(node))  # setup()
    for _ in range(3):  # enter() with a new wrapper of the same node, exit(), enter() again...
        assert not binding.bind(SlicerWrapper(node))
    assert SlicerWrapper.connections == 1
    assert {name: node.GetParameter(name) for name in CHOICES} == stored
    assert {name: widgets[name].currentText() for name in CHOICES} == stored

    # A new scene's parameter node: the old node's connectors go, the new node's come.
    scene.Clear(0)
    fresh = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "KneeBoneSeg")
    assert binding.bind(SlicerWrapper(fresh)) and binding.parameter_node is fresh and SlicerWrapper.connections == 2
    widgets["fusion"].setCurrentIndex(CHOICES["fusion"].index(stored["fusion"]))
    assert fresh.GetParameter("fusion") == stored["fusion"]
    assert node.GetParameter("fusion") == stored["fusion"]  # untouched, whatever the new node got
    binding.unbind()
    widgets["fusion"].setCurrentIndex(CHOICES["fusion"].index(DEFAULTS["fusion"]))
    assert fresh.GetParameter("fusion") == stored["fusion"], "an unbound panel writes nothing"


def test_refilling_a_combo_box_starts_no_reapply_and_the_users_choice_does(application):
    """A re-apply can replace the user's segmentation: only the user's own choice may start one."""
    (signal,) = [signal for name, signal in REAPPLY_SIGNALS.items() if name == "closingUnitsComboBox"]
    box = QtWidgets.QComboBox()
    box.show()
    reapplies, refills = [], []
    getattr(box, signal.split("(")[0]).connect(reapplies.append)
    box.currentIndexChanged.connect(refills.append)
    for _ in range(2):  # as Slicer's connector does on each connection
        box.clear()
        box.addItems(CHOICES["closing_units"])
        box.setCurrentIndex(1)
    assert refills, "the refill moves the box"
    assert reapplies == []
    QTest.keyClick(box, Qt.Key_Up)  # the user picks the other units
    assert reapplies == [0]
