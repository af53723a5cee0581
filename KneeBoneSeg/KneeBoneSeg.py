"""KneeBoneSeg: femur, tibia and patella from a knee MRI in one click, as a 3D Slicer module.

The module is a thin layer over the ``KneeBoneSegLib`` library, which is
installed beside it. The network runs in a background process (PythonSlicer
running ``-m KneeBoneSegLib segment ... --progress json``) so that Slicer
stays responsive and Cancel can stop it at once; the results come back as one
segmentation node through :mod:`KneeBoneSegLib.mrml`.
"""

import json
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
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

#: Packages the library needs that Slicer does not ship, by import name, pinned to the
#: versions the project's tests run with. numpy, vtk and SimpleITK come with Slicer and
#: are never installed, upgraded or downgraded (see :meth:`KneeBoneSegLogic.installRequirements`).
REQUIREMENTS = {
    "keras": "keras==3.15.1",
    "tensorflow": "tensorflow==2.21.0",
    "skimage": "scikit-image==0.26.0",
    "scipy": "scipy==1.17.1",
    "slicerio": "slicerio==1.4.0",
    "tqdm": "tqdm==4.70.1",
}
SLICER_OWNED_PACKAGES = ("numpy", "vtk", "SimpleITK")

#: The annotated KneeBones3Dify scan (GPL-3.0) and its ground truth, as NRRD files with
#: their SHA-256. The published dataset (Zenodo 10.5281/zenodo.10534328, GitHub
#: diego-romano/KneeBones3Dify-Annotated-Dataset) holds DICOM slices and PNG masks, with
#: no direct link to these volumes; until they are published, SampleData fetches them from
#: the folder named by KNEEBONESEG_SAMPLE_DIR (README: "Use in 3D Slicer").
SAMPLE_NAME = "KneeBones3Dify"
SAMPLE_FILES = {
    "knee_mri.nrrd": "SHA256:cf1d8356655e0a83e9eadcae46061a06981917120efa336af078a1665623ba08",
    "knee_bones_labels.nrrd": "SHA256:c86294c8f0a3dec6a06659dac20188d6540f91d0eb9be9b5cf9e77bb27e0b7e4",
}
SAMPLE_DIR_ENV = "KNEEBONESEG_SAMPLE_DIR"


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
<code>slicer.util.getModuleLogic("KneeBoneSeg").segment(volumeNode)</code>.
"""
        self.parent.acknowledgementText = """
Implements "Bone Segmentation in Low-Field Knee MRI Using a 3D Convolutional Neural Network"
(BDCC 2025, 9(6), 146). Sample data: KneeBones3Dify-Annotated-Dataset (Soscia, Romano, Maddalena
et al., 2024; DOI 10.5281/zenodo.10534328), GPL-3.0.
"""
        slicer.app.connect("startupCompleted()", registerSampleData)


def sampleDataFolder():
    """The folder SampleData fetches the sample scan from, or None where none is set."""
    folder = os.environ.get(SAMPLE_DIR_ENV)
    return Path(folder) if folder and Path(folder, "knee_mri.nrrd").is_file() else None


def registerSampleData():
    """Offer the annotated KneeBones3Dify scan in the Sample Data module (checked by SHA-256)."""
    import SampleData

    folder = sampleDataFolder()
    if folder is None:
        return
    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="KneeBoneSeg",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(iconsPath, "KneeBoneSeg.png"),
        uris=(folder / "knee_mri.nrrd").as_uri(),
        fileNames="knee_mri.nrrd",
        nodeNames=SAMPLE_NAME,
        checksums=SAMPLE_FILES["knee_mri.nrrd"],
    )


#
# KneeBoneSegParameterNode
#


@parameterNodeWrapper
class KneeBoneSegParameterNode:
    """Settings of the module, saved with the scene.

    inputVolume - the knee MRI.
    outputSegmentation - where the bones go; none: a new segmentation is made.
    modelPath - a trained .keras model; empty: the model shipped with the extension.
    threeProjections - predict on the axial, coronal and sagittal orientations (else axial only).
    fusion - how the projections' probabilities are fused.
    closingRadius - radius (voxels) of the sphere that closes each bone; 0: no closing.
    smoothingIterations - Laplacian smoothing steps of the surfaces.
    device - where the network runs.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelPath: str = ""
    threeProjections: bool = True
    fusion: Annotated[str, Choice(["or", "vote", "mean"])] = "or"
    closingRadius: Annotated[float, WithinRange(0.0, 30.0)] = 9.0
    smoothingIterations: Annotated[int, WithinRange(0, 200)] = 20
    device: Annotated[str, Choice(["auto", "cpu", "gpu"])] = "auto"


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
        self._parameterNodeGuiTag = None
        self._run = None
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
        self.logic = KneeBoneSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.exportSTLButton.connect("clicked(bool)", self.onExportSTLButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.closingRadiusSliderWidget.connect("valueChanged(double)", self.onPostprocessingSettingChanged)
        self.ui.smoothingIterationsSpinBox.connect("valueChanged(int)", self.onPostprocessingSettingChanged)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.show3DButton.setSegmentationNode)
        self.ui.progressBar.hide()
        self.ui.stageLabel.hide()
        self.ui.cancelButton.hide()

        self.initializeParameterNode()

    def cleanup(self):
        self.onCancelButton()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event):
        self.onCancelButton()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui follow the node both ways.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelPath
            self.updateButtons()

    def onModelPathChanged(self, path):
        if self._parameterNode:
            self._parameterNode.modelPath = path

    def updateButtons(self, caller=None, event=None):
        parameters = self._parameterNode
        running = self._run is not None
        hasInput = bool(parameters and parameters.inputVolume)
        self.ui.segmentButton.enabled = hasInput and not running
        if not hasInput:
            self.ui.segmentButton.toolTip = "Choose an input volume first."
        elif self.logic.canReusePrediction(parameters.inputVolume, **networkSettings(parameters)):
            self.ui.segmentButton.toolTip = "Re-apply closing and smoothing to the kept network output (fast)."
        else:
            self.ui.segmentButton.toolTip = "Run the network and segment femur, tibia and patella."
        output = parameters.outputSegmentation if parameters else None
        self.ui.exportSTLButton.enabled = bool(output) and not running
        self.ui.show3DButton.enabled = bool(output)
        if parameters and parameters.inputVolume:
            self.ui.outputSegmentationSelector.baseName = parameters.inputVolume.GetName() + " bones"
        self.updateDeviceLabel()

    def updateDeviceLabel(self):
        device = self._parameterNode.device if self._parameterNode else "auto"
        lastDevice = self.logic.lastDevice
        if device == "auto":
            text = f"Last run used {lastDevice}." if lastDevice else "The GPU if Keras finds one, else the CPU."
        elif device == "gpu":
            text = "A GPU (the run stops with a message if Keras finds none)."
        else:
            text = "The CPU."
        self.ui.deviceLabel.text = text

    def onSegmentButton(self):
        if self._run is not None or not self.ensureRequirements():
            return
        parameters = self._parameterNode
        self.ui.statusLabel.text = ""
        with slicer.util.tryWithErrorDisplay("KneeBoneSeg could not start.", waitCursor=True):
            self._run = self.logic.startSegmentation(
                parameters.inputVolume,
                closingRadius=parameters.closingRadius,
                smoothingIterations=parameters.smoothingIterations,
                onProgress=self.onProgress,
                **networkSettings(parameters),
            )
        if self._run is None:
            return
        self.ui.progressBar.value = 0
        for widget in (self.ui.progressBar, self.ui.stageLabel, self.ui.cancelButton):
            widget.show()
        self.ui.stageLabel.text = "Starting..."
        self.updateButtons()
        self._pollTimer.start()

    def onPostprocessingSettingChanged(self, value):
        self._reapplyTimer.start()

    def onReapplyPostprocessing(self):
        """Redo closing and smoothing from the kept network output when only those settings changed."""
        parameters = self._parameterNode
        if (
            self._run is None
            and parameters
            and parameters.inputVolume
            and parameters.outputSegmentation
            and self.logic.canReusePrediction(parameters.inputVolume, **networkSettings(parameters))
        ):
            self.onSegmentButton()

    def onProgress(self, stage, fraction):
        self.ui.stageLabel.text = stage
        self.ui.progressBar.value = int(round(100 * fraction))

    def onPollRun(self):
        if self._run is None or self._run.poll():
            return
        self._pollTimer.stop()
        run, self._run = self._run, None
        for widget in (self.ui.progressBar, self.ui.stageLabel, self.ui.cancelButton):
            widget.hide()
        try:
            if run.cancelled:
                self.ui.statusLabel.text = "Cancelled; the scene is as it was."
            elif run.error:
                self.ui.statusLabel.text = "Failed: " + run.error
                slicer.util.errorDisplay(run.error, windowTitle="KneeBoneSeg")
            else:
                with slicer.util.tryWithErrorDisplay("KneeBoneSeg could not load its results.", waitCursor=True):
                    parameters = self._parameterNode
                    node = self.logic.loadResults(run, parameters.inputVolume, parameters.outputSegmentation)
                    parameters.outputSegmentation = node
                    self.ui.statusLabel.text = self.logic.summary(run)
        finally:
            self.updateButtons()

    def onCancelButton(self):
        if self._run is not None:
            self._run.cancel()
            self.onPollRun()

    def onExportSTLButton(self):
        folder = self.ui.exportDirectoryButton.directory
        with slicer.util.tryWithErrorDisplay("The STL files could not be written.", waitCursor=True):
            written = self.logic.exportSTL(self._parameterNode.outputSegmentation, folder)
            self.ui.statusLabel.text = f"Wrote {len(written)} STL files (LPS, mm) to {folder}."

    def ensureRequirements(self):
        """Offer to install the missing Python packages; True when all are there."""
        missing = self.logic.missingRequirements()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            "KneeBoneSeg needs these Python packages, which will be downloaded and installed into Slicer's Python "
            f"(this can take several minutes):\n\n{chr(10).join(missing)}\n\nInstall them now?",
            windowTitle="KneeBoneSeg: install packages",
        ):
            self.ui.statusLabel.text = "The packages were not installed; KneeBoneSeg cannot run without them."
            return False
        self.ui.statusLabel.text = "Installing Python packages..."
        slicer.app.processEvents()
        try:
            with slicer.util.WaitCursor():
                self.logic.installRequirements(missing)
        except Exception as error:
            logging.exception("Installing %s failed", missing)
            self.ui.statusLabel.text = "Installing the Python packages failed."
            slicer.util.errorDisplay(
                f"Installing {', '.join(missing)} failed: {error}\n\nCheck the internet connection; details are in the Python console.",
                windowTitle="KneeBoneSeg",
            )
            return False
        self.ui.statusLabel.text = "Packages installed."
        return True


def networkSettings(parameters):
    """The settings that change the network's output (the rest only change post-processing)."""
    return {
        "projections": 3 if parameters.threeProjections else 1,
        "fusion": parameters.fusion,
        "device": parameters.device,
        "modelPath": parameters.modelPath,
    }


#
# KneeBoneSegRun
#


class KneeBoneSegRun:
    """One run of the ``kneeboneseg`` command line in a background PythonSlicer process.

    Its ``--progress json`` lines are read by a thread and handed to the caller
    by :meth:`poll`, called from the GUI thread (a QTimer), so that Slicer stays
    responsive. :meth:`cancel` kills the process at once.
    """

    def __init__(self, arguments, workFolder, onProgress=None, settingsKey=None):
        self.arguments = list(arguments)
        self.workFolder = Path(workFolder)
        self.onProgress = onProgress
        # Set for a network run: which volume and settings its probability map belongs to.
        self.settingsKey = settingsKey
        self.report = None
        self.outputs = None
        self.error = None
        self.cancelled = False
        self.startTime = time.time()
        self.seconds = None
        self._lines = queue.Queue()
        self._otherLines = []
        self._process = slicer.util.launchConsoleProcess(
            [pythonSlicerExecutable(), "-m", "KneeBoneSegLib", *self.arguments],
            updateEnvironment={
                "PYTHONPATH": libraryParentFolder(),
                "PYTHONUNBUFFERED": "1",
                "TF_CPP_MIN_LOG_LEVEL": "2",
            },
        )
        self._reader = threading.Thread(target=self._readLines, daemon=True)
        self._reader.start()

    def _readLines(self):
        for line in self._process.stdout:
            self._lines.put(line)

    def poll(self):
        """Handle the lines printed so far; True while the process runs."""
        while True:
            try:
                self._handleLine(self._lines.get_nowait())
            except queue.Empty:
                break
        if self._process.poll() is None or self._reader.is_alive():
            return True
        while not self._lines.empty():
            self._handleLine(self._lines.get_nowait())
        self.seconds = time.time() - self.startTime
        if not self.cancelled and self.outputs is None and self.error is None:
            logging.error("KneeBoneSeg process output:\n%s", "".join(self._otherLines))
            lastLine = next((line.strip() for line in reversed(self._otherLines) if line.strip()), "no output")
            self.error = f"the segmentation process stopped (exit code {self._process.returncode}): {lastLine}"
        if self.cancelled or self.error:
            shutil.rmtree(self.workFolder, ignore_errors=True)
        return False

    def wait(self):
        """Block until the process ends (for scripts); returns self."""
        while self.poll():
            time.sleep(0.1)
            slicer.app.processEvents()
        return self

    def cancel(self):
        """Stop the process now; nothing it wrote is used."""
        if self._process.poll() is None:
            self.cancelled = True
            self._process.kill()
            self._process.wait()
            self._reader.join(timeout=5)

    def _handleLine(self, line):
        message = None
        if line.startswith("{"):
            try:
                message = json.loads(line)
            except ValueError:
                message = None
        if not isinstance(message, dict):
            self._otherLines.append(line)
            logging.debug("kneeboneseg: %s", line.rstrip())
        elif "stage" in message and self.onProgress:
            self.onProgress(message["stage"], float(message.get("fraction", 0.0)))
        elif message.get("done"):
            self.outputs = message.get("outputs", [])
        elif "error" in message:
            self.error = message["error"]


def pythonSlicerExecutable():
    """Slicer's own Python interpreter launcher, which sets up Slicer's libraries."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    found = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.isfile(found):
        raise RuntimeError(f"{name} was not found beside Slicer ({found}); reinstall Slicer")
    return found


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
        segmentationNode = logic.segment(volumeNode, closingRadius=9, projections=3)
        logic.exportSTL(segmentationNode, "/path/to/folder")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastDevice = None
        # The last network run whose probability map can be post-processed again:
        # (settings key, work folder holding probability.nrrd).
        self._kept = None

    def getParameterNode(self):
        return KneeBoneSegParameterNode(super().getParameterNode())

    @staticmethod
    def missingRequirements():
        """The pinned requirements whose packages Slicer's Python cannot import."""
        import importlib.util

        return [requirement for name, requirement in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]

    @staticmethod
    def installRequirements(requirements):
        """``pip install`` ``requirements`` into Slicer's Python, holding Slicer's own packages where they are.

        A constraints file pins numpy, vtk and SimpleITK to the installed
        versions, so pip fails with a message rather than replace them.
        """
        from importlib.metadata import PackageNotFoundError, version

        pins = []
        for package in SLICER_OWNED_PACKAGES:
            try:
                pins.append(f"{package}=={version(package)}")
            except PackageNotFoundError:
                continue
        with tempfile.TemporaryDirectory() as folder:
            constraints = Path(folder, "slicer-constraints.txt")
            constraints.write_text("\n".join(pins) + "\n")
            slicer.util.pip_install(list(requirements) + ["--constraint", str(constraints)])

    def canReusePrediction(self, volumeNode, projections, fusion, device, modelPath):
        """True when the kept network output belongs to this volume and these network settings.

        The device is not part of it: CPU and GPU give the same output.
        """
        return self._kept is not None and self._kept[0] == self._settingsKey(volumeNode, projections, fusion, modelPath)

    @staticmethod
    def _settingsKey(volumeNode, projections, fusion, modelPath):
        image = volumeNode.GetImageData() if volumeNode else None
        return (volumeNode.GetID() if volumeNode else None, image.GetMTime() if image else None, projections, fusion, modelPath)

    def startSegmentation(
        self,
        volumeNode,
        closingRadius=9.0,
        projections=3,
        fusion="or",
        smoothingIterations=20,
        device="auto",
        modelPath="",
        onProgress=None,
    ):
        """Start segmenting ``volumeNode`` in the background; returns the :class:`KneeBoneSegRun`.

        When the network already ran on this volume with these network
        settings, only the post-processing (closing, smoothing, surfaces) runs
        again, from the kept probability map. Poll the run (or ``wait()``),
        then call :meth:`loadResults`.
        """
        from KneeBoneSegLib.io import write_volume
        from KneeBoneSegLib.mrml import volume_from_node

        postprocessing = ["--closing-radius", str(closingRadius), "--smoothing-iterations", str(int(smoothingIterations))]
        workFolder = Path(tempfile.mkdtemp(prefix="KneeBoneSeg-", dir=slicer.app.temporaryPath))
        try:
            if self.canReusePrediction(volumeNode, projections, fusion, device, modelPath):
                probability = str(self._kept[1] / "output" / "probability.nrrd")
                arguments = ["postprocess", probability, "-o", str(workFolder / "output"), *postprocessing, "--progress", "json"]
                return KneeBoneSegRun(arguments, workFolder, onProgress)
            inputPath = workFolder / "input.nrrd"
            write_volume(volume_from_node(volumeNode), inputPath)
            arguments = [
                "segment", str(inputPath), "-o", str(workFolder / "output"),
                "--projections", str(projections), "--fusion", fusion, "--device", device,
                *postprocessing, "--save-probability", "--progress", "json",
            ]  # fmt: skip
            if modelPath:
                arguments += ["--model", str(modelPath)]
            settingsKey = self._settingsKey(volumeNode, projections, fusion, modelPath)
            return KneeBoneSegRun(arguments, workFolder, onProgress, settingsKey)
        except Exception:
            shutil.rmtree(workFolder, ignore_errors=True)
            raise

    def loadResults(self, run, volumeNode, segmentationNode=None):
        """Put a finished run's bones into ``segmentationNode`` (a new node if None) and return it."""
        from KneeBoneSegLib.io import read_volume
        from KneeBoneSegLib.mrml import labels_to_segmentation_node, mark_verdicts
        from KneeBoneSegLib.surfaces import read_stl

        if run.error or run.cancelled or run.outputs is None:
            raise RuntimeError(run.error or "the run did not finish")
        outputs = {Path(path).name: Path(path) for path in run.outputs}
        labels = read_volume(outputs["segmentation.seg.nrrd"])
        # "femur.stl", or "femur.failed.stl" for a bone that failed its checks
        surfaces = {name.split(".")[0]: read_stl(path) for name, path in outputs.items() if name.endswith(".stl")}
        run.report = json.loads(outputs["summary.json"].read_text())
        self.lastDevice = run.report.get("device", self.lastDevice)
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", volumeNode.GetName() + " bones")
        labels_to_segmentation_node(labels.array, labels.geometry, segmentationNode, reference_volume_node=volumeNode, surfaces=surfaces)
        mark_verdicts(segmentationNode, run.report["verdict"])
        self._keep(run)
        return segmentationNode

    def _keep(self, run):
        """Keep the folder of the last network run (its probability map); remove the others."""
        if run.settingsKey is None:
            shutil.rmtree(run.workFolder, ignore_errors=True)
            return
        if self._kept is not None:
            shutil.rmtree(self._kept[1], ignore_errors=True)
        (run.workFolder / "input.nrrd").unlink(missing_ok=True)
        self._kept = (run.settingsKey, run.workFolder)

    @staticmethod
    def summary(run):
        """One line: the verdict per bone with its first reason, the bones' volumes, and the time taken."""
        from KneeBoneSegLib.verdicts import verdict_line

        bones = run.report.get("bones", {})
        found = ", ".join(f"{name} {bone['volume_mm3'] / 1000:.1f} cm³" for name, bone in bones.items()) or "no bones"
        return f"{verdict_line(run.report['verdict'])} | {found} ({run.seconds:.0f} s)."

    def segment(
        self,
        volumeNode,
        closingRadius=9.0,
        projections=3,
        fusion="or",
        smoothingIterations=20,
        device="auto",
        modelPath="",
        segmentationNode=None,
    ):
        """Segment femur, tibia and patella in ``volumeNode`` and return the segmentation node.

        Runs the same background process as the module panel and waits for it
        (Slicer keeps redrawing meanwhile).

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
            The knee MRI.
        closingRadius : float
            Radius in voxels of the sphere that closes each bone (the paper's 9); 0 skips it.
        projections : int
            3 to predict on the axial, coronal and sagittal orientations, 1 for axial only (faster).
        fusion : str
            How the projections are fused: ``"or"`` (the paper's, the default), ``"vote"`` or ``"mean"``.
        smoothingIterations : int
            Laplacian smoothing steps of the surfaces.
        device : str
            ``"auto"``, ``"cpu"`` or ``"gpu"``.
        modelPath : str
            A trained ``.keras`` model; empty for the shipped one.
        segmentationNode : vtkMRMLSegmentationNode, optional
            Node to fill (its segments are replaced); default a new one.

        Returns
        -------
        vtkMRMLSegmentationNode
            Segments Femur, Tibia and Patella (those found), coloured and
            coded with SNOMED CT, with closed surfaces. Its attribute
            ``KneeBoneSeg.Verdict`` is ``ok``, ``review`` or ``failed`` and
            ``KneeBoneSeg.VerdictReasons`` says why; a bone that is not ok
            is named so ("Tibia (review)") and flagged.

        Raises
        ------
        RuntimeError
            With the library's one-line message when the run fails.
        """
        missing = self.missingRequirements()
        if missing:
            raise RuntimeError(f"missing Python packages {', '.join(missing)}: install them with slicer.util.pip_install or the module panel")
        run = self.startSegmentation(volumeNode, closingRadius, projections, fusion, smoothingIterations, device, modelPath).wait()
        if run.error:
            raise RuntimeError(run.error)
        return self.loadResults(run, volumeNode, segmentationNode)

    def exportSTL(self, segmentationNode, folder):
        """Write one binary STL per segment (LPS millimetres) into ``folder``; returns the paths.

        Files are named ``<segmentation name>_<segment name>.stl``, as Slicer's
        Segmentations module names them.
        """
        from KneeBoneSegLib.mrml import export_segments_to_stl

        if segmentationNode is None:
            raise ValueError("no segmentation to export; segment a volume first")
        return [str(path) for path in export_segments_to_stl(segmentationNode, folder)]


#
# KneeBoneSegTest
#


class KneeBoneSegTest(ScriptedLoadableModuleTest):
    """Segments the annotated KneeBones3Dify scan and compares the bones with its ground truth.

    Needs the sample files (SAMPLE_FILES) in the folder named by KNEEBONESEG_SAMPLE_DIR
    until they are published for download; see the README's "Use in 3D Slicer".
    """

    #: Largest relative difference between a bone's segmented and true volume.
    VOLUME_TOLERANCE = 0.15

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segments_the_sample_scan()

    def test_segments_the_sample_scan(self):
        import numpy as np
        import SampleData

        if sampleDataFolder() is None:
            self.skipTest(f"set {SAMPLE_DIR_ENV} to the folder holding {', '.join(SAMPLE_FILES)}")
        registerSampleData()
        self.delayDisplay("Loading the KneeBones3Dify sample scan")
        volumeNode = SampleData.downloadSample(SAMPLE_NAME)
        self.assertIsNotNone(volumeNode)
        groundTruthPath = SampleData.SampleDataLogic().downloadFileIntoCache(
            (sampleDataFolder() / "knee_bones_labels.nrrd").as_uri(), "knee_bones_labels.nrrd", SAMPLE_FILES["knee_bones_labels.nrrd"]
        )

        self.delayDisplay("Segmenting (one projection, to keep the test short)")
        logic = KneeBoneSegLogic()
        self.assertEqual(logic.missingRequirements(), [], "install the Python packages first (press Segment once)")
        segmentationNode = logic.segment(volumeNode, projections=1)

        from KneeBoneSegLib.anatomy import BONES
        from KneeBoneSegLib.io import read_volume

        truth = read_volume(groundTruthPath)
        voxelMm3 = float(np.prod(volumeNode.GetSpacing()))
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual([segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())], [bone.name for bone in BONES])
        for bone in BONES:
            found = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, bone.name, volumeNode)
            foundMm3 = np.count_nonzero(found) * voxelMm3
            trueMm3 = np.count_nonzero(truth.array == bone.label) * voxelMm3
            logging.info("%s: %.1f cm3 segmented, %.1f cm3 true", bone.name, foundMm3 / 1000, trueMm3 / 1000)
            self.assertAlmostEqual(foundMm3 / trueMm3, 1.0, delta=self.VOLUME_TOLERANCE, msg=bone.name)

        with tempfile.TemporaryDirectory() as folder:
            written = logic.exportSTL(segmentationNode, folder)
            self.assertEqual(len(written), len(BONES))
        self.delayDisplay("Test passed")
