"""How the module's panel binds its widgets, written against no Qt binding (PythonQt in Slicer, PyQt5 in the tests).

Slicer's ``parameterNodeWrapper`` rebuilds a combo box's items each time it
connects it (``QComboBoxToStringableConnector.__init__`` clears and refills the
box, in 3D Slicer 5.6.2, 5.8.1 and 5.10.0), and in 5.6 and 5.8 ``connectGui()``
returns no tag (fixed by Slicer commit b5a65a49a0, first in 5.10.0), so
``disconnectGui()`` cannot undo it. Each extra connection would leave
connectors behind that write their box's choice into the node whenever a later
refill moves it: the panel's choices would fall back to their defaults every
time the module is shown. :class:`ParameterGuiBinding` connects through
``connectParametersToGui()``, whose tag every version returns, and only when
the parameter node itself changes (a scene was closed), never when the module
is shown again.
"""

from __future__ import annotations

from typing import Iterable, Mapping

#: The dynamic property that names, in the .ui, the parameter a widget shows (Slicer's ``SlicerParameterName``).
PARAMETER_NAME_PROPERTY = "SlicerParameterName"

#: The panel's widgets whose change by the user re-applies the post-processing, with the signal that says so.
#: A combo box's ``activated`` comes from the user alone; ``currentIndexChanged`` also fires when its items are
#: refilled. Values written back unchanged re-apply nothing (``SegmentationRuns.reapplies``).
REAPPLY_SIGNALS = {
    "closingRadiusSliderWidget": "valueChanged(double)",
    "closingUnitsComboBox": "activated(int)",
    "smoothingIterationsSpinBox": "valueChanged(int)",
}


def parameter_widgets(widgets: Iterable) -> dict:
    """The widgets that name a parameter in their :data:`PARAMETER_NAME_PROPERTY`, by that name."""
    found = {}
    for widget in widgets:
        name = widget.property(PARAMETER_NAME_PROPERTY)
        if name:
            found[str(name)] = widget
    return found


class ParameterGuiBinding:
    """The panel's widgets bound to one parameter node at a time, connected once per node.

    Parameters
    ----------
    widgets : mapping of str to widget
        The widgets by the parameter they show (:func:`parameter_widgets`).
    """

    def __init__(self, widgets: Mapping[str, object]):
        self._widgets = dict(widgets)
        self._wrapper = None
        self._tag = None

    @property
    def parameter_node(self):
        """The MRML node the widgets are bound to, or None."""
        return None if self._wrapper is None else self._wrapper.parameterNode

    def bind(self, wrapper) -> bool:
        """Bind the widgets to ``wrapper``'s parameter node (a ``parameterNodeWrapper`` instance; None: unbind).

        Returns True when the connections changed. For the node already bound
        (the module shown again, with a new wrapper of the same node) nothing
        is connected, refilled or written, and False is returned.
        """
        if (None if wrapper is None else wrapper.parameterNode) is self.parameter_node:
            return False
        self.unbind()
        if wrapper is not None:
            self._tag = wrapper.connectParametersToGui(self._widgets)
            self._wrapper = wrapper
        return True

    def unbind(self) -> None:
        """Disconnect the widgets from the bound node, if any."""
        if self._wrapper is not None:
            self._wrapper.disconnectGui(self._tag)
        self._wrapper = self._tag = None
