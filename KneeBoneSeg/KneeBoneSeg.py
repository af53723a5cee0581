"""KneeBoneSeg: femur, tibia and patella from a knee MRI in one click, as a 3D Slicer module.

The module is a thin layer over the ``KneeBoneSegLib`` library, which is
installed beside it, in the split of SlicerNNUnet: what to install
(:mod:`KneeBoneSegLib.slicer.environment`), the background process
(:mod:`KneeBoneSegLib.slicer.worker`), the runs and their results
(:mod:`KneeBoneSegLib.slicer.logic`, :mod:`KneeBoneSegLib.slicer.mrml`), all free of
Qt and tested outside Slicer; this file adds the panel, the dialogs and the
timer that follows a run.
"""

import logging
import os
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: The extension's terminology list: the bones' SNOMED CT codes, which Slicer's own lists lack.
TERMINOLOGY_FILE = (
    Path(__file__).resolve().parent / "Resources" / "Terminologies" / "SegmentationCategoryType-KneeBoneSeg.term.json"
)
#: Where the last STL folder is remembered (Slicer's application settings).
EXPORT_FOLDER_SETTING = "KneeBoneSeg/ExportFolder"


#
# KneeBoneSeg
#


class KneeBoneSeg(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Knee Bone Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["KneeBoneSeg contributors"]
        self.parent.helpText = """
Segments the femur, tibia and patella in a knee MRI (made for low-field scans) with a 3D U-Net,
and shows them as named, coloured, SNOMED-coded segments with smoothed closed surfaces that can be
exported as STL files for 3D printing. From the Python console:
<code>slicer.util.getModuleLogic("KneeBoneSeg").segment(volumeNode)</code>; the sample scan:
<code>import KneeBoneSeg; KneeBoneSeg.loadSampleScan()</code>.
"""
        self.parent.acknowledgementText = """
Implements "Bone Segmentation in Low-Field Knee MRI Using a 3D Convolutional Neural Network"
(BDCC 2025, 9(6), 146). Sample data: KneeBones3Dify-Annotated-Dataset (Soscia, Romano, Maddalena
et al., 2024; DOI 10.5281/zenodo.10534328), GPL-3.0.
"""
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", loadTerminology)


def loadTerminology():
    """Make the bones' codes known to Slicer's terminology picker (the segments name this list)."""
    terminologies = getattr(slicer.modules, "terminologies", None)
    if terminologies is not None:
        terminologies.logic().LoadTerminologyFromFile(str(TERMINOLOGY_FILE))


def sampleDataFolder():
    """The folder holding the sample scan and its ground truth (KNEEBONESEG_SAMPLE_DIR's, else the assembled one), or None."""
    from KneeBoneSegLib.slicer.sampledata import sample_folder

    return sample_folder(os.environ, slicer.app.cachePath)


def registerSampleData():
    """Offer the annotated KneeBones3Dify scan (GPL-3.0) in the Sample Data module.

    Its button assembles the public dataset once (``loadSampleScan``);
    ``SampleData.downloadSample("KneeBones3Dify")`` loads the assembled scan
    or KNEEBONESEG_SAMPLE_DIR's. Imports nothing heavy: this runs at every start.
    """
    import SampleData

    from KneeBoneSegLib.slicer.sampledata import sample_data_source

    thumbnail = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "KneeBoneSeg.png")
    source = sample_data_source(os.environ, slicer.app.cachePath, thumbnail)
    SampleData.SampleDataLogic.registerCustomSampleDataSource(**source, customDownloader=loadSampleScan)


def loadSampleScan(source=None):
    """Load the sample scan as a volume node, assembling the public dataset first when it is not there yet.

    Sample Data's button calls it with its source; from a script, call it
    without. The assembly (``kneeboneseg sample``: download, checked against
    the published voxels) runs in the background, and Slicer stays responsive.
    """
    from KneeBoneSegLib.slicer.sampledata import IMAGE_FILE, SAMPLE_NAME, assembled_folder

    folder = sampleDataFolder()
    if folder is None:
        folder = assembled_folder(slicer.app.cachePath)
        with slicer.util.WaitCursor():
            error = backgroundRuns().assemble_sample(folder, on_idle=slicer.app.processEvents)
        if error:
            slicer.util.errorDisplay(f"The sample scan could not be made: {error}", windowTitle="KneeBoneSeg")
            return None
    return slicer.util.loadVolume(str(folder / IMAGE_FILE), {"name": SAMPLE_NAME})


#
# KneeBoneSegParameterNode
#


def parameterNodeClass():
    """The module's parameter node (saved with the scene): the input volume, the output segmentation, and
    one field per option the panel shows, with its type, default, choices and range taken from the library
    (KneeBoneSegLib.slicer.panel.panel_parameters), so the panel offers what the library accepts."""
    from KneeBoneSegLib.slicer.panel import panel_parameters

    annotations = {"inputVolume": vtkMRMLScalarVolumeNode, "outputSegmentation": vtkMRMLSegmentationNode}
    defaults = {}
    for parameter in panel_parameters():
        if parameter.choices:
            annotations[parameter.name] = Annotated[parameter.kind, Choice(list(parameter.choices))]
        elif parameter.minimum is not None and parameter.maximum is not None:
            annotations[parameter.name] = Annotated[parameter.kind, WithinRange(parameter.minimum, parameter.maximum)]
        else:
            annotations[parameter.name] = parameter.kind
        defaults[parameter.name] = parameter.default
    return parameterNodeWrapper(type("KneeBoneSegParameterNode", (), {"__annotations__": annotations, **defaults}))


KneeBoneSegParameterNode = parameterNodeClass()


#
# KneeBoneSegWidget
#


class KneeBoneSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: choose a volume, Segment, follow the progress, show and export the bones."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._guiBinding = None
        self._run = None
        self._installing = False
        self._batch = None
        self._batchTable = None
        self._batchTimer = qt.QTimer()
        self._batchTimer.setInterval(200)
        self._batchTimer.connect("timeout()", self.onPollBatch)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.onPollRun)
        # Dragging the closing-radius slider fires many changes: re-apply once it rests.
        self._reapplyTimer = qt.QTimer()
        self._reapplyTimer.setSingleShot(True)
        self._reapplyTimer.setInterval(600)
        self._reapplyTimer.connect("timeout()", self.onReapplyPostprocessing)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/KneeBoneSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        from KneeBoneSegLib.slicer.gui import REAPPLY_SIGNALS, ParameterGuiBinding, parameter_widgets

        # Widgets with a "SlicerParameterName" property in the .ui follow the parameter node both ways.
        self._guiBinding = ParameterGuiBinding(parameter_widgets(uiWidget.findChildren(qt.QWidget)))
        self.logic = KneeBoneSegLogic()
        loadTerminology()  # also when the module is loaded after startup (added or reloaded)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.exportSTLButton.connect("clicked(bool)", self.onExportSTLButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        for name, signal in REAPPLY_SIGNALS.items():
            getattr(self.ui, name).connect(signal, self.onPostprocessingSettingChanged)
        self.ui.outputSegmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.ui.show3DButton.setSegmentationNode
        )
        self.ui.exportDirectoryButton.directory = str(self.logic.defaultExportFolder())
        self.ui.progressBar.hide()
        self.ui.stageLabel.hide()
        self.ui.cancelButton.hide()
        self.ui.batchRunButton.connect("clicked(bool)", self.onBatchRunButton)
        self.ui.batchCancelButton.connect("clicked(bool)", self.onBatchCancelButton)
        self.ui.batchTableView.connect("clicked(QModelIndex)", self.onBatchCaseClicked)
        self.ui.batchProgressBar.hide()
        self.ui.batchCancelButton.hide()

        self.initializeParameterNode()

    def cleanup(self):
        """Module reload or application exit: stop any run and remove every temporary folder."""
        self._pollTimer.stop()
        self._reapplyTimer.stop()
        self._batchTimer.stop()
        if self._batch is not None:
            self._batch.cancel()
            self._batch = None
        if self.logic is not None:
            self.logic.close()
        self._run = None
        if self._guiBinding is not None:
            self._guiBinding.unbind()
        self.removeObservers()

    def enter(self):
        # The widgets stay bound while the module is hidden: showing it again connects, refills and writes nothing.
        self.initializeParameterNode()
        self.updateButtons()

    def onSceneStartClose(self, caller, event):
        self.onCancelButton()
        self.logic.discardKeptOutput()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        parameters = self.logic.getParameterNode()
        if self.setParameterNode(parameters) and not parameters.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                parameters.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode):
        """Bind the panel to a parameter node (None: to none); True when it was not bound to that node already."""
        previous = self._parameterNode
        if not self._guiBinding.bind(inputParameterNode):
            return False
        if previous:
            self.removeObserver(previous, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if inputParameterNode:
            self.addObserver(inputParameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.ui.modelPathLineEdit.currentPath = inputParameterNode.model
            self.updateButtons()
        return True

    def onModelPathChanged(self, path):
        if self._parameterNode:
            self._parameterNode.model = path

    def updateButtons(self, caller=None, event=None):
        """Show what can be used now (the library's panel_state decides)."""
        from KneeBoneSegLib.slicer.panel import device_description, panel_options, panel_state

        parameters = self._parameterNode
        hasInput = bool(parameters and parameters.inputVolume)
        output = parameters.outputSegmentation if parameters else None
        state = panel_state(
            has_input=hasInput,
            has_output=bool(output),
            running=self._run is not None,
            installing=self._installing,
            can_reuse=hasInput and self.logic.canReusePrediction(parameters.inputVolume, panel_options(parameters)),
        )
        for widget in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.modelPathLineEdit):
            widget.enabled = state.choosers_enabled
        self.ui.segmentButton.enabled = state.segment_enabled
        self.ui.segmentButton.toolTip = state.segment_tooltip
        self.ui.exportSTLButton.enabled = state.export_enabled
        self.ui.show3DButton.enabled = state.show_3d_enabled
        if hasInput:
            self.ui.outputSegmentationSelector.baseName = parameters.inputVolume.GetName() + " bones"
        self.ui.deviceLabel.text = device_description(
            parameters.device if parameters else "auto", self.logic.lastDevice
        )

    def onSegmentButton(self):
        from KneeBoneSegLib.slicer.panel import panel_options

        if (
            self._run is not None
            or self._installing
            or not self.ensureRequirements()
            or not self.confirmReplacingEdits()
        ):
            return
        parameters = self._parameterNode
        self.ui.statusLabel.text = ""
        with slicer.util.tryWithErrorDisplay("KneeBoneSeg could not start.", waitCursor=True):
            self._run = self.logic.startSegmentation(
                parameters.inputVolume,
                parameters.outputSegmentation,
                panel_options(parameters),
                onProgress=self.onProgress,
            )
        if self._run is None:
            return
        self.ui.progressBar.value = 0
        for widget in (self.ui.progressBar, self.ui.stageLabel, self.ui.cancelButton):
            widget.show()
        self.ui.stageLabel.text = "Starting..."
        self.updateButtons()
        self._pollTimer.start()

    def confirmReplacingEdits(self):
        """True unless the output segmentation holds work that a run would replace and the user keeps it."""
        from KneeBoneSegLib.slicer.mrml import edited_since_written

        output = self._parameterNode.outputSegmentation
        if output is None or not edited_since_written(output):
            return True
        return slicer.util.confirmOkCancelDisplay(
            f"The segments of '{output.GetName()}' have been edited since KneeBoneSeg made them, or were not made by it. "
            "Replace them with the new bones? (Cancel keeps them; choose a new output segmentation to keep both.)",
            windowTitle="KneeBoneSeg",
        )

    def onPostprocessingSettingChanged(self, value):
        self._reapplyTimer.start()

    def onReapplyPostprocessing(self):
        """Redo closing and smoothing from the kept network output when the user changed them (asking first if the bones were edited)."""
        from KneeBoneSegLib.slicer.panel import panel_options

        self.updateButtons()
        parameters = self._parameterNode
        # onSegmentButton starts nothing while a run or an install is under way.
        if parameters and self.logic.reappliesPostprocessing(
            parameters.inputVolume, parameters.outputSegmentation, panel_options(parameters)
        ):
            self.onSegmentButton()

    def onProgress(self, stage, fraction):
        self.ui.stageLabel.text = stage
        self.ui.progressBar.value = int(round(100 * fraction))

    def onPollRun(self):
        if self._run is None or self._run.worker.poll():
            return
        self._pollTimer.stop()
        run, self._run = self._run, None
        for widget in (self.ui.progressBar, self.ui.stageLabel, self.ui.cancelButton):
            widget.hide()
        try:
            if run.worker.cancelled:
                self.ui.statusLabel.text = "Cancelled; the scene is as it was."
            elif run.worker.error:
                self.ui.statusLabel.text = "Failed: " + run.worker.error
                slicer.util.errorDisplay(run.worker.error, windowTitle="KneeBoneSeg")
            else:
                with slicer.util.tryWithErrorDisplay("KneeBoneSeg could not load its results.", waitCursor=True):
                    node = self.logic.finishRun(run)
                    if (
                        self._parameterNode
                        and self._parameterNode.inputVolume
                        and self._parameterNode.inputVolume.GetID() == run.volume_node_id
                    ):
                        self._parameterNode.outputSegmentation = node
                    self.ui.statusLabel.text = run.summary_line()
        finally:
            self.updateButtons()

    def onCancelButton(self):
        if self._run is not None:
            self.logic.cancelRun(self._run)
            self.onPollRun()

    def onExportSTLButton(self):
        folder = self.ui.exportDirectoryButton.directory
        with slicer.util.tryWithErrorDisplay("The STL files could not be written.", waitCursor=True):
            written = self.logic.exportSTL(self._parameterNode.outputSegmentation, folder)
            qt.QSettings().setValue(EXPORT_FOLDER_SETTING, folder)
            self.ui.statusLabel.text = f"Wrote {len(written)} STL files (LPS, mm) to {folder}."

    def onBatchRunButton(self):
        """Segment every scan of the chosen folder into the results folder, in the background."""
        from KneeBoneSegLib.slicer.panel import panel_options

        if self._batch is not None or self._installing or not self.ensureRequirements():
            return
        with slicer.util.tryWithErrorDisplay("The batch could not start.", waitCursor=True):
            self._batch = self.logic.startBatch(
                self.ui.batchInputDirectoryButton.directory,
                self.ui.batchOutputDirectoryButton.directory,
                panel_options(self._parameterNode),
                onProgress=self.onBatchProgress,
            )
        if self._batch is None:
            return
        self.ui.batchProgressBar.value = 0
        self.ui.batchProgressBar.show()
        self.ui.batchCancelButton.show()
        self.ui.batchRunButton.enabled = False
        self.ui.batchStatusLabel.text = "Starting..."
        self._batchTimer.start()

    def onBatchProgress(self, stage, fraction):
        self.ui.batchStatusLabel.text = stage
        self.ui.batchProgressBar.value = int(round(100 * fraction))

    def onPollBatch(self):
        from KneeBoneSegLib.slicer.logic import finish_batch

        if self._batch is None or self._batch.poll():
            return
        self._batchTimer.stop()
        batch, self._batch = self._batch, None
        self.ui.batchProgressBar.hide()
        self.ui.batchCancelButton.hide()
        self.ui.batchRunButton.enabled = True
        try:
            self._batchTable = finish_batch(batch, slicer.mrmlScene)
        except RuntimeError as error:
            self.ui.batchStatusLabel.text = str(error)
            return
        self.ui.batchTableView.setMRMLTableNode(self._batchTable)
        self.ui.batchStatusLabel.text = (
            f"{self._batchTable.GetNumberOfRows()} cases in {self._batchTable.GetName()}; click one to load it."
        )

    def onBatchCancelButton(self):
        if self._batch is not None:
            self._batch.cancel()
            self.onPollBatch()

    def onBatchCaseClicked(self, index):
        """Load the clicked case's scan and bones, and show them."""
        from KneeBoneSegLib.slicer.logic import load_case

        with slicer.util.tryWithErrorDisplay("The case could not be loaded.", waitCursor=True):
            volumeNode, segmentationNode = load_case(slicer.mrmlScene, self._batchTable, index.row())
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
            self._parameterNode.inputVolume = volumeNode
            self._parameterNode.outputSegmentation = segmentationNode

    def ensureRequirements(self):
        """Offer to install the missing or too old Python packages; True when all are there."""
        from KneeBoneSegLib.slicer.environment import ensure_requirements

        def install(pins):
            with slicer.util.WaitCursor():
                self.logic.installRequirements(pins)

        outcome = ensure_requirements(
            confirm=lambda question: slicer.util.confirmOkCancelDisplay(
                question, windowTitle="KneeBoneSeg: install packages"
            ),
            install=install,
            installing=self.setInstalling,
        )
        if outcome.status:
            self.ui.statusLabel.text = outcome.status
        if outcome.error:
            slicer.util.errorDisplay(outcome.error, windowTitle="KneeBoneSeg")
        return outcome.ready

    def setInstalling(self, message):
        """Lock the panel while packages install (``message`` shown), unlock it when ``message`` is None."""
        self._installing = message is not None
        self.updateButtons()
        if message:
            self.ui.statusLabel.text = message
            slicer.app.processEvents()


def backgroundRuns():
    """A :class:`KneeBoneSegLib.slicer.logic.SegmentationRuns`: the library's commands in Slicer's Python, in the background."""
    from KneeBoneSegLib.slicer.environment import python_slicer_executable
    from KneeBoneSegLib.slicer.logic import SegmentationRuns

    return SegmentationRuns([python_slicer_executable()], libraryParentFolder(), slicer.app.temporaryPath)


def libraryParentFolder():
    """The folder that holds the KneeBoneSegLib package (installed beside this module)."""
    import KneeBoneSegLib

    return str(Path(KneeBoneSegLib.__file__).resolve().parent.parent)


#
# KneeBoneSegLogic
#


class KneeBoneSegLogic(ScriptedLoadableModuleLogic):
    """Segmentation of knee bones for the module panel and for scripts.

    From Slicer's Python console::

        logic = slicer.util.getModuleLogic("KneeBoneSeg")
        segmentationNode = logic.segment(volumeNode, closing_radius=3.2, closing_units="mm")
        logic.exportSTL(segmentationNode, "/path/to/folder")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastDevice = None
        self._runs = None
        # Nothing may outlive the application: no process, no temporary folder.
        slicer.app.connect("aboutToQuit()", self.close)

    def getParameterNode(self):
        return KneeBoneSegParameterNode(super().getParameterNode())

    @property
    def runs(self):
        """The session's :class:`KneeBoneSegLib.slicer.logic.SegmentationRuns` (made once the packages are there)."""
        if self._runs is None:
            self._runs = backgroundRuns()
        return self._runs

    @staticmethod
    def installRequirements(pins):
        """``pip install`` ``pins`` into Slicer's Python, holding Slicer's own packages where they are."""
        from KneeBoneSegLib.slicer.environment import constrained_install

        with constrained_install(pins) as arguments:
            slicer.util.pip_install(arguments)

    def canReusePrediction(self, volumeNode, options):
        """True when the kept network output belongs to this volume, as it is placed now, and these options' network part."""
        return self._runs is not None and self._runs.can_reuse(volumeNode, options)

    def reappliesPostprocessing(self, volumeNode, segmentationNode, options):
        """True when ``options``' post-processing differs from that of the kept output's bones in ``segmentationNode``."""
        return self._runs is not None and self._runs.reapplies(volumeNode, segmentationNode, options)

    @staticmethod
    def defaultExportFolder():
        """The last STL folder, else the scene's folder, else the user's documents."""
        from KneeBoneSegLib.slicer.panel import export_folder

        documents = qt.QStandardPaths.writableLocation(qt.QStandardPaths.DocumentsLocation)
        return export_folder(
            str(qt.QSettings().value(EXPORT_FOLDER_SETTING, "") or ""), slicer.mrmlScene.GetRootDirectory(), documents
        )

    def startSegmentation(self, volumeNode, segmentationNode, options, onProgress=None):
        """Start segmenting ``volumeNode`` into ``segmentationNode`` (None: a new one) in the background.

        Returns the run, bound to these nodes: poll ``run.worker`` (or
        ``run.worker.wait()``), then :meth:`finishRun`. When the network
        already ran on this volume, placed as it is, with these network
        settings, only the post-processing runs again.
        """
        return self.runs.start(volumeNode, segmentationNode, options, onProgress)

    def startBatch(self, inputFolder, outputFolder, options, onProgress=None):
        """Start ``kneeboneseg batch`` on a folder of scans into ``outputFolder`` in the background; returns its worker.

        Poll ``worker`` (or ``worker.wait()``), then
        ``KneeBoneSegLib.slicer.logic.finish_batch(worker, scene)`` gives the
        cases table as a table node. Running again into the same folder goes
        on where the last batch stopped.
        """
        from KneeBoneSegLib.slicer.panel import batch_folders

        scans, results = batch_folders(inputFolder, outputFolder)
        return self.runs.start_batch([str(scans)], str(results), options, onProgress)

    def finishRun(self, run):
        """Load an ended run's bones into the nodes it started with; returns the segmentation node."""
        node = self.runs.finish(run, slicer.mrmlScene)
        self.lastDevice = (run.report or {}).get("device", self.lastDevice)
        return node

    def cancelRun(self, run):
        self.runs.cancel(run)

    def discardKeptOutput(self):
        if self._runs is not None:
            self._runs.discard_kept()

    def close(self):
        """Cancel every run and remove every temporary folder."""
        if self._runs is not None:
            self._runs.close()

    def segment(self, volumeNode, segmentationNode=None, **options):
        """Segment femur, tibia and patella in ``volumeNode`` and return the segmentation node.

        Runs the same background process as the module panel and waits for it
        (Slicer keeps redrawing meanwhile).

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
            The knee MRI.
        segmentationNode : vtkMRMLSegmentationNode, optional
            Node to fill (its segments are replaced); default a new one.
        **options
            Any option of the library's ``KneeBoneSegLib.options.SegmentOptions``
            by its name, e.g. ``closing_radius=3.2, closing_units="mm"``,
            ``projections=3``, ``fusion="or"``, ``smoothing_iterations=20``,
            ``device="cpu"``, ``model="/path/to/model.onnx"``, ``precision="bf16"``
            (``kneeboneseg segment --help`` says what each does); the others
            keep their defaults.

        Returns
        -------
        vtkMRMLSegmentationNode
            Segments Femur, Tibia and Patella (those found), coloured and
            coded with SNOMED CT, with the library's closed surfaces. Its attribute
            ``KneeBoneSeg.Verdict`` is ``ok``, ``review`` or ``failed`` and
            ``KneeBoneSeg.VerdictReasons`` says why; a bone that is not ok
            is named so ("Tibia (review)") and flagged.

        Raises
        ------
        RuntimeError
            With the library's one-line message when the run fails.
        """
        from KneeBoneSegLib.options import options_from_mapping
        from KneeBoneSegLib.slicer.environment import requirement_problems

        problems = requirement_problems()
        if problems:
            wrong = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
            raise RuntimeError(
                f"Python packages are missing or too old ({wrong}): press Segment in the module panel once to install them"
            )
        run = self.startSegmentation(volumeNode, segmentationNode, options_from_mapping(options))
        run.worker.wait(on_idle=slicer.app.processEvents)
        return self.finishRun(run)

    def exportSTL(self, segmentationNode, folder):
        """Write one binary STL per segment (LPS millimetres) into ``folder``; returns the paths.

        Files are named ``<segmentation name>_<segment name>.stl``, as Slicer's
        Segmentations module names them. The surfaces are the library's
        smoothed, closed ones, whatever Show 3D was toggled to (they are the
        segmentation's source representation), until the segments are edited.
        """
        from KneeBoneSegLib.slicer.mrml import export_segments_to_stl

        if segmentationNode is None:
            raise ValueError("no segmentation to export; segment a volume first")
        return [str(path) for path in export_segments_to_stl(segmentationNode, folder)]


#
# KneeBoneSegTest
#


class KneeBoneSegTest(ScriptedLoadableModuleTest):
    """Segments the annotated KneeBones3Dify scan and compares the bones with its ground truth.

    Needs the sample scan and its ground truth: in the folder named by KNEEBONESEG_SAMPLE_DIR,
    or assembled once by Sample Data (``loadSampleScan``); see the README's "Use in 3D Slicer".
    Without them it says so and does nothing (a skip raised from ``runTest``
    would show as a failure in Reload and Test and in the SelfTests module).
    """

    #: Smallest Dice of each bone with the ground truth. The shipped model was trained on this
    #: scan: the same run through the library (one projection, default settings, 2 CPU cores)
    #: scores femur 0.981, tibia 0.983, patella 0.959, so 0.9 fails only a real regression.
    MIN_DICE = 0.9

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if sampleDataFolder() is None:
            from KneeBoneSegLib.slicer.sampledata import SAMPLE_DIR_ENV, SAMPLE_FILES

            message = (
                f"KneeBoneSeg self-test did nothing: set {SAMPLE_DIR_ENV} to the folder holding {', '.join(SAMPLE_FILES)}, "
                "or load the KneeBones3Dify sample once from Sample Data."
            )
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_segments_the_sample_scan()

    def test_segments_the_sample_scan(self):
        import tempfile

        from KneeBoneSegLib.slicer.sampledata import LABELS_FILE

        self.delayDisplay("Loading the KneeBones3Dify sample scan")
        volumeNode = loadSampleScan()
        self.assertIsNotNone(volumeNode)
        groundTruthPath = sampleDataFolder() / LABELS_FILE

        self.delayDisplay("Segmenting (one projection, to keep the test short)")
        logic = KneeBoneSegLogic()
        from KneeBoneSegLib.slicer.environment import requirement_problems

        self.assertEqual(requirement_problems(), {}, "install the Python packages first (press Segment once)")
        segmentationNode = logic.segment(volumeNode, projections=1)

        from KneeBoneSegLib.anatomy import BONES
        from KneeBoneSegLib.io.images import read_volume
        from KneeBoneSegLib.metrics import dice
        from KneeBoneSegLib.slicer.mrml import bone_segment_ids

        truth = read_volume(groundTruthPath)
        # A bone may be shown flagged ("Tibia (review)"): the bones are found by their segment ids.
        segmentIds = bone_segment_ids(segmentationNode)
        self.assertEqual(sorted(segmentIds), sorted(bone.name for bone in BONES))
        for bone in BONES:
            found = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentIds[bone.name], volumeNode) > 0
            score = dice(found, truth.array == bone.label)
            logging.info("%s: Dice %.4f with the ground truth", bone.name, score)
            self.assertGreaterEqual(score, self.MIN_DICE, msg=bone.name)

        with tempfile.TemporaryDirectory() as folder:
            written = logic.exportSTL(segmentationNode, folder)
            self.assertEqual(len(written), len(BONES))
        logic.close()
        self.delayDisplay("Test passed")
