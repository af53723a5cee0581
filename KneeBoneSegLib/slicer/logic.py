"""What the Slicer module does with a segmentation run, without Qt or the Slicer application.

The module's widget and logic (``KneeBoneSeg.py``) only add the buttons, the
dialogs and a timer around this; here are the parts that decide where results
go and what is kept, tested with real MRML nodes (``slicer-core``) and real
worker processes:

- A run is bound to the nodes it started with: its results go to *that*
  volume's segmentation, whatever is selected when it ends.
- The network's output of the last run is kept so that changing only the
  closing or smoothing re-runs the fast post-processing; it is reused only
  while the volume, its voxels, its placement in the world and the network
  settings are all unchanged, and re-applied at once only to the segmentation
  its bones went to, when the post-processing options differ from the ones
  those bones were made with (:meth:`SegmentationRuns.reapplies`).
- Every temporary folder is removed: on Cancel, on failure (of the run or of
  loading its results), when the kept output is replaced or discarded (scene
  close), and when the module is cleaned up.

What the panel shows and offers, which the module reads at every Slicer
start, is in :mod:`.panel`, which imports nothing heavy.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import vtk

from ..errors import InputError
from ..io.images import read_volume, write_volume
from ..io.outputs import PROBABILITY_FILE, read_outputs, summary_line, write_json
from ..options import SegmentOptions
from .worker import WorkerProcess, worker_environment

# The MRML conversions (.mrml) are imported where they are used: they need Slicer's MRML classes, which the
# worker's Python and the Slicer stand-ins of CI, where this module's logic is tested too, lack.

#: A run's outputs go to this folder inside its work folder.
OUTPUT_FOLDER = "output"


@dataclass
class SegmentationRun:
    """One background run, bound to the nodes it was started with.

    Attributes
    ----------
    volume_node_id : str
        The segmented volume.
    segmentation_node_id : str or None
        Where the bones go; None: a new segmentation node.
    reuse_key : tuple or None
        For a network run: the volume placement and network options its
        probability map belongs to. None for a post-processing-only run.
    worker : WorkerProcess
    options : SegmentOptions
        The options the run was started with.
    report : dict or None
        The run's ``summary.json``, once loaded.
    """

    volume_node_id: str
    segmentation_node_id: Optional[str]
    reuse_key: Optional[tuple]
    worker: WorkerProcess
    options: SegmentOptions
    report: Optional[dict] = field(default=None)

    @property
    def work_folder(self) -> Path:
        return self.worker.work_folder

    @property
    def output_folder(self) -> Path:
        """Where the worker writes the run's outputs (:func:`~KneeBoneSegLib.io.outputs.write_outputs`)."""
        return self.work_folder / OUTPUT_FOLDER

    def summary_line(self) -> str:
        """One line for the panel's status: verdicts, bone volumes and the run's wall time."""
        return summary_line(self.report, seconds=self.worker.seconds)


@dataclass(frozen=True)
class KeptOutput:
    """The network output kept from the last network run, to re-post-process without the network."""

    reuse_key: tuple  #: the volume placement and network options it belongs to
    work_folder: Path  #: holds ``output/probability.nrrd``
    segmentation_node_id: str  #: the segmentation its bones were last shown in
    postprocess: dict  #: the post-processing options those bones were made with


class SegmentationRuns:
    """Starts, finishes and cleans up the segmentation runs of one Slicer session.

    Parameters
    ----------
    python_command : sequence of str
        How to start Slicer's Python (``[PythonSlicer]``; ``[sys.executable]`` outside Slicer).
    library_folder : str
        The folder that holds ``KneeBoneSegLib``.
    temporary_folder : str
        Where work folders are made (Slicer's temporary folder).
    """

    def __init__(self, python_command: Sequence[str], library_folder: str, temporary_folder: str):
        self.python_command = list(python_command)
        self.library_folder = library_folder
        self.temporary_folder = temporary_folder
        self._kept: Optional[KeptOutput] = None
        self._running: List[SegmentationRun] = []

    @property
    def running(self) -> List[SegmentationRun]:
        return list(self._running)

    @staticmethod
    def reuse_key(volume_node, options: SegmentOptions) -> tuple:
        """The volume, placed as it is now, and the options the network output depends on (no others)."""
        from .mrml import volume_placement  # noqa: PLC0415

        return (volume_placement(volume_node), options.network_key())

    def can_reuse(self, volume_node, options: SegmentOptions) -> bool:
        """True when the kept network output belongs to this volume, placed as it is now, and these network options."""
        return (
            self._kept is not None
            and volume_node is not None
            and self._kept.reuse_key == self.reuse_key(volume_node, options)
        )

    def reapplies(self, volume_node, segmentation_node, options: SegmentOptions) -> bool:
        """True when a change of post-processing options should re-apply them at once.

        That is when the kept network output fits (:meth:`can_reuse`), its
        bones were last shown in ``segmentation_node``, and they were made
        with other post-processing options. A panel that writes back the
        values the bones were made with (as Slicer does when it binds the
        widgets) re-applies nothing. Whether the segmentation was edited
        since is for the caller to ask (:func:`~KneeBoneSegLib.slicer.mrml.edited_since_written`).
        """
        return (
            segmentation_node is not None
            and self.can_reuse(volume_node, options)
            and segmentation_node.GetID() == self._kept.segmentation_node_id
            and options.stage("postprocess") != self._kept.postprocess
        )

    def start(
        self,
        volume_node,
        segmentation_node,
        options: SegmentOptions,
        on_progress: Optional[Callable[[str, float], None]] = None,
    ) -> SegmentationRun:
        """Start segmenting ``volume_node`` into ``segmentation_node`` (None: a new node) in the background.

        The worker gets ``options`` as a request file (``--options``). When the
        kept network output fits (:meth:`can_reuse`), only the post-processing
        runs again, from it.
        """
        from .mrml import volume_from_node  # noqa: PLC0415

        options.validate()
        reuse = self.can_reuse(volume_node, options)
        reuse_key = None if reuse else self.reuse_key(volume_node, options)

        def arguments(work_folder: Path) -> List[str]:
            output = str(work_folder / OUTPUT_FOLDER)
            if reuse:
                return ["postprocess", str(self._kept.work_folder / OUTPUT_FOLDER / PROBABILITY_FILE), "-o", output]
            write_volume(volume_from_node(volume_node), work_folder / "input.nrrd")
            return ["segment", str(work_folder / "input.nrrd"), "-o", output]

        # A network run keeps its probability, from which a change of the post-processing runs again without the network.
        request = options if reuse else options.with_values(keep_probability=True)
        worker = self._start_worker("KneeBoneSeg-", arguments, request, on_progress)
        run = SegmentationRun(
            volume_node.GetID(),
            segmentation_node.GetID() if segmentation_node is not None else None,
            reuse_key,
            worker,
            options,
        )
        self._running.append(run)
        return run

    def finish(self, run: SegmentationRun, scene):
        """Load an ended run's bones into the nodes it is bound to; returns the segmentation node.

        The volume must still be in ``scene``; the bound segmentation node is
        filled, or a new one made when there was none or it has been removed
        meanwhile. The run's folder is kept (for a network run, as the
        output to re-post-process) or removed, also when loading fails.

        Raises
        ------
        RuntimeError
            With the run's message when it was cancelled or failed, or when
            its volume has been removed from the scene.
        """
        from .mrml import bones_to_segmentation_node  # noqa: PLC0415

        worker = run.worker
        if worker.poll():
            raise RuntimeError("the run has not ended yet")
        if run in self._running:
            self._running.remove(run)
        try:
            if worker.cancelled or worker.error or worker.outputs is None:
                raise RuntimeError(worker.error or "the run was cancelled")
            volume_node = scene.GetNodeByID(run.volume_node_id)
            if volume_node is None:
                raise RuntimeError("the segmented volume was removed from the scene while it was segmented")
            written = read_outputs(run.output_folder)
            run.report = written.report
            target = scene.GetNodeByID(run.segmentation_node_id) if run.segmentation_node_id else None
            if target is None:
                target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", volume_node.GetName() + " bones")
            node = bones_to_segmentation_node(written, target, reference_volume_node=volume_node)
        except BaseException:
            shutil.rmtree(run.work_folder, ignore_errors=True)
            raise
        self._keep(run, node)
        return node

    def start_batch(
        self,
        inputs: Sequence[str],
        outdir: str,
        options: SegmentOptions,
        on_progress: Optional[Callable[[str, float], None]] = None,
    ) -> WorkerProcess:
        """Start ``kneeboneseg batch`` on ``inputs`` (files, folders, CSV files) into ``outdir`` in the background.

        Resumes what an earlier batch into ``outdir`` did. Finish it with
        :func:`finish_batch`; ``worker.cancel()`` stops it at once (what was
        done stays done, and the next batch into ``outdir`` goes on from there).
        """
        options.validate()
        return self._start_worker(
            "KneeBoneSeg-batch-",
            lambda work_folder: ["batch", *map(str, inputs), "-o", str(outdir)],
            options,
            on_progress,
        )

    def assemble_sample(self, folder: Path, on_idle: Optional[Callable[[], None]] = None) -> Optional[str]:
        """Assemble the public sample scan into ``folder`` (``kneeboneseg sample``) in the background and wait,
        calling ``on_idle`` meanwhile; the worker's one-line error, or None once the files are there."""
        worker = self._start_worker(
            "KneeBoneSeg-sample-", lambda work_folder: ["sample", "-o", str(folder)], None, None
        )
        try:
            worker.wait(on_idle=on_idle)
        finally:
            shutil.rmtree(worker.work_folder, ignore_errors=True)
        return worker.error

    def _start_worker(
        self, prefix: str, arguments: Callable[[Path], List[str]], options: Optional[SegmentOptions], on_progress
    ) -> WorkerProcess:
        """``python -m KneeBoneSegLib`` with ``arguments(work_folder)`` in a new work folder, ``options`` (if any) as
        its request file.

        The work folder is removed again when the worker cannot start.
        """
        work_folder = Path(tempfile.mkdtemp(prefix=prefix, dir=self.temporary_folder))
        try:
            request = (
                []
                if options is None
                else ["--options", str(write_json(options.to_request(), work_folder / "options.json"))]
            )
            command = [
                *self.python_command,
                "-m",
                "KneeBoneSegLib",
                *arguments(work_folder),
                *request,
                "--progress",
                "json",
            ]
            return WorkerProcess(command, work_folder, worker_environment(os.environ, self.library_folder), on_progress)
        except BaseException:
            shutil.rmtree(work_folder, ignore_errors=True)
            raise

    def cancel(self, run: SegmentationRun) -> None:
        """Stop a run and its processes; its folder is removed."""
        run.worker.cancel()
        if run in self._running:
            self._running.remove(run)

    def discard_kept(self) -> None:
        """Forget the kept network output and remove its folder (e.g. when the scene closes)."""
        if self._kept is not None:
            shutil.rmtree(self._kept.work_folder, ignore_errors=True)
            self._kept = None

    def close(self) -> None:
        """Cancel every run and remove every folder (module cleanup, application exit)."""
        for run in self.running:
            self.cancel(run)
        self.discard_kept()

    def _keep(self, run: SegmentationRun, node) -> None:
        """Keep a network run's output; note where a run's bones went and how they were post-processed."""
        shown = dict(segmentation_node_id=node.GetID(), postprocess=run.options.stage("postprocess"))
        if run.reuse_key is None:  # post-processing only: the kept network output stays
            shutil.rmtree(run.work_folder, ignore_errors=True)
            if self._kept is not None:
                self._kept = replace(self._kept, **shown)
            return
        self.discard_kept()
        (run.work_folder / "input.nrrd").unlink(missing_ok=True)
        self._kept = KeptOutput(run.reuse_key, run.work_folder, **shown)


#: The table node attribute that says which batch folder its cases are in.
BATCH_FOLDER_ATTRIBUTE = "KneeBoneSeg.BatchFolder"


def finish_batch(worker: WorkerProcess, scene):
    """The ended batch's ``cases.csv`` as a new table node in ``scene``; its work folder is removed.

    Raises
    ------
    RuntimeError
        With the batch's message when it was cancelled or failed before its table was complete.
    """
    try:
        if worker.poll():
            raise RuntimeError("the batch has not ended yet")
        if worker.cancelled or worker.error or not worker.outputs:
            raise RuntimeError(worker.error or "the batch was cancelled; run it again to go on")
        return cases_table_node(scene, Path(worker.outputs[0]))
    finally:
        shutil.rmtree(worker.work_folder, ignore_errors=True)


def cases_table_node(scene, table_path: Path, name: str = "KneeBoneSeg cases"):
    """A table node holding ``cases.csv`` (a text column per field), marked with its batch folder."""
    with open(table_path, newline="", encoding="utf-8") as stream:
        header, *rows = list(csv.reader(stream))
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    for column, title in enumerate(header):
        values = vtk.vtkStringArray()
        values.SetName(title)
        for row in rows:
            values.InsertNextValue(row[column])
        table.AddColumn(values)
    node.SetUseColumnTitleAsColumnHeader(True)
    node.SetAttribute(BATCH_FOLDER_ATTRIBUTE, str(Path(table_path).parent))
    return node


#: The attribute that marks a case's volume and segmentation nodes with the case's folder.
CASE_FOLDER_ATTRIBUTE = "KneeBoneSeg.CaseFolder"


def load_case(scene, table_node, row: int):
    """Show the case on ``row`` of a cases table: its scan as a volume node, its bones as a segmentation node.

    A case already shown in ``scene`` is not loaded again: its nodes are
    returned (a click on a row, or each click of a double-click, adds nothing).

    Raises :class:`~KneeBoneSegLib.errors.InputError` for a case without
    outputs (status ``error``), naming its reason.
    """
    from .mrml import (  # noqa: PLC0415
        bones_to_segmentation_node,
        volume_to_node,
    )

    table = table_node.GetTable()
    cells = {
        table.GetColumnName(column): table.GetValue(row, column).ToString()
        for column in range(table.GetNumberOfColumns())
    }
    if cells.get("status") == "error":
        raise InputError(f"case {cells['id']} has no bones to show: {cells.get('error', '')}")
    case_folder = str(Path(table_node.GetAttribute(BATCH_FOLDER_ATTRIBUTE)) / cells["id"])
    shown = [
        _node_with_attribute(scene, class_name, CASE_FOLDER_ATTRIBUTE, case_folder)
        for class_name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode")
    ]
    if all(shown):
        return tuple(shown)
    for node in shown:
        if node is not None:  # half a case (the other node was deleted): load it whole again
            scene.RemoveNode(node)
    written = read_outputs(Path(case_folder))
    volume_node = volume_to_node(read_volume(written.report["input"]), scene, cells["id"])
    segmentation = bones_to_segmentation_node(
        written, scene, reference_volume_node=volume_node, name=f"{cells['id']} bones"
    )
    for node in (volume_node, segmentation):
        node.SetAttribute(CASE_FOLDER_ATTRIBUTE, case_folder)
    return volume_node, segmentation


def _node_with_attribute(scene, class_name: str, attribute: str, value: str):
    """The first node of ``class_name`` in ``scene`` whose ``attribute`` is ``value``, or None."""
    nodes = scene.GetNodesByClass(class_name)
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if node.GetAttribute(attribute) == value:
            return node
    return None
