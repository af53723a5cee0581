"""Between 3D Slicer's scene (MRML) and the library: volumes in, named bone segments and STL files out.

This module uses only MRML, segmentation-core and VTK classes (no ``slicer.app``,
``slicer.util``, Qt or CTK), so it runs inside the Slicer application and,
unchanged, under the PyPI package ``slicer-core``, where the tests use it.

Conventions: Slicer places a volume with its IJK-to-RAS matrix; the library's
:class:`~KneeBoneSegLib.volume.Geometry` is ITK's LPS. The two differ by the
sign of the first two world axes, so ``ijk_to_lps = diag(-1, -1, 1, 1) @ ijk_to_ras``.
Arrays keep SimpleITK's ``array[k, j, i]`` order, which is also how
``vtkImageData`` stores its voxels (i fastest).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..anatomy import BONE_BY_LABEL, BONES
from ..atomic import output_directory
from ..errors import InputError, OutputError
from ..io.images import geometry_from_ijk_to_lps
from ..io.outputs import VERDICT_TAG, bone_verdicts, shown_verdict, slicer_segment_metadata
from ..postprocess.surfaces import Surface, to_vtk_polydata
from ..volume import Geometry, Volume

log = logging.getLogger(__name__)

#: Flips the first two world axes: RAS <-> LPS (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

BINARY_LABELMAP = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
CLOSED_SURFACE = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()

# The Slicer application registers these when its Segmentations module starts;
# a bare MRML scene (slicer-core) has none until registered by hand.
_CONVERTER_RULES = (
    slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
    slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
)


def register_segmentation_converters() -> None:
    """Make binary labelmap <-> closed surface conversion available, once.

    Rules already registered (as in the Slicer application) are not added again.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule_class in _CONVERTER_RULES:
        if rule_class.__name__ not in registered:
            factory.RegisterConverterRule(rule_class())


def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 NumPy array."""
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def array_to_matrix(array) -> vtk.vtkMatrix4x4:
    """A 4x4 array-like as a ``vtkMatrix4x4``."""
    matrix = vtk.vtkMatrix4x4()
    matrix.DeepCopy(np.asarray(array, dtype=float).ravel())
    return matrix


def geometry_from_node(volume_node) -> Geometry:
    """The LPS :class:`Geometry` of a volume node (from its IJK-to-RAS matrix).

    A parent transform of the node is not part of the geometry; put the
    results under the same transform (:func:`labels_to_segmentation_node`
    does when given the volume node).
    """
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return geometry_from_ijk_to_lps(RAS_TO_LPS @ matrix_to_array(ijk_to_ras))


def volume_placement(volume_node) -> tuple:
    """Everything that places a volume's voxels in the world, as a comparable tuple.

    The voxels (the image's modification time and dimensions), the
    IJK-to-RAS matrix (spacing, origin, directions) and the parent
    transforms up to the world: their matrix where linear, else each
    transform node's ID and modification time. Two calls give equal tuples
    only while none of these has changed.
    """
    image = volume_node.GetImageData()
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    parent = volume_node.GetParentTransformNode()
    if parent is None or parent.IsTransformToWorldLinear():
        matrix = vtk.vtkMatrix4x4()  # identity: no parent transform
        if parent is not None:
            parent.GetMatrixTransformToWorld(matrix)
        to_world = tuple(matrix_to_array(matrix).ravel())
    else:
        chain = []
        while parent is not None:
            chain.append((parent.GetID(), parent.GetMTime()))
            parent = parent.GetParentTransformNode()
        to_world = tuple(chain)
    return (
        volume_node.GetID(),
        image.GetMTime() if image is not None else None,
        image.GetDimensions() if image is not None else None,
        tuple(matrix_to_array(ijk_to_ras).ravel()),
        to_world,
    )


def volume_from_node(volume_node) -> Volume:
    """A copy of a scalar volume node's voxels, ``array[k, j, i]``, with its LPS geometry.

    Raises
    ------
    InputError
        If the node holds no image or more than one component per voxel.
    """
    image = volume_node.GetImageData() if volume_node is not None else None
    name = volume_node.GetName() if volume_node is not None else "the input"
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume '{name}' holds no image data; load a knee MRI first")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"volume '{name}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "choose a single-channel (grey-level) MRI"
        )
    dimensions_ijk = image.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    # Copy: the node's buffer may change or be freed while the library works.
    array = voxels.reshape(dimensions_ijk[::-1]).copy()
    return Volume(array, geometry_from_node(volume_node))


def volume_to_node(volume: Volume, scene, name: str = "Volume", class_name: str = "vtkMRMLScalarVolumeNode"):
    """Add ``volume`` to ``scene`` as a new volume node (a copy of its voxels) and return the node.

    ``class_name`` may be ``"vtkMRMLLabelMapVolumeNode"`` for a label map.
    """
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(array_to_matrix(volume.geometry.ijk_to_ras))
    node.SetAndObserveImageData(image_data_from_array(volume.array, vtk.vtkImageData()))
    return node


def terminology_entry(bone) -> str:
    """The ``TerminologyEntry`` tag of a bone's segment, in Slicer's serialised form.

    ``context~category~type~type modifier~anatomic context~region~region
    modifier``, each code ``scheme^value^meaning``; the codes are those of
    :data:`~KneeBoneSegLib.anatomy.BONES`, the same as in the ``.seg.nrrd``
    files the library writes.
    """
    from slicerio.segmentation import terminology_entry_to_string

    return terminology_entry_to_string(slicer_segment_metadata(bone)["terminology"])


def labels_to_segmentation_node(
    labels: np.ndarray,
    geometry: Geometry,
    target,
    reference_volume_node=None,
    surfaces: dict[str, Surface] | None = None,
    name: str = "Knee bones",
):
    """Show a label map as a segmentation: one named, coloured, coded segment per bone present.

    Parameters
    ----------
    labels : ndarray of int, shape (k, j, i)
        0 background, 1 femur, 2 tibia, 3 patella (:data:`~KneeBoneSegLib.anatomy.BONES`).
    geometry : Geometry
        Where ``labels`` lies (LPS).
    target : vtkMRMLSegmentationNode or vtkMRMLScene
        The node to fill (its segments are replaced), or the scene to add a
        new node named ``name`` to.
    reference_volume_node : vtkMRMLScalarVolumeNode, optional
        The scanned volume: the segmentation takes its grid as reference
        geometry and sits under the same parent transform.
    surfaces : dict of str to Surface, optional
        Closed surfaces by bone key (``"femur"``, ...) in LPS millimetres, as
        the library makes them (smoothed, checked closed). Given for every
        bone present, they become the segmentation's *source*
        representation, so that Slicer never replaces them with its own
        conversion: toggling Show 3D or its smoothing keeps them, and STL
        export writes them. The labels stay as the binary labelmap shown in
        2D, until an edit in the Segment Editor (which makes the labelmap the
        source again, and Slicer's converter makes the surfaces from then on).
        Without them, the labelmap is the source and Slicer's
        labelmap-to-surface converter makes the surfaces.

    Returns
    -------
    vtkMRMLSegmentationNode
        Binary labelmap (one shared layer) and closed surface
        representations, shown in 2D and 3D.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D array, not {labels.ndim}D")
    register_segmentation_converters()
    if isinstance(target, slicer.vtkMRMLScene):
        node = target.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    else:
        node = target
        node.GetSegmentation().RemoveAllSegments()
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()

    labelmap = image_data_from_array(labels.astype(np.uint8, copy=False), slicer.vtkOrientedImageData())
    labelmap.SetImageToWorldMatrix(array_to_matrix(geometry.ijk_to_ras))
    segmentation = node.GetSegmentation()
    if reference_volume_node is not None:
        # Transform first: the reference geometry is stored in the segmentation's
        # own frame, which Slicer computes through the node's parent transform;
        # set before it, the volume's transform would be applied twice.
        node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    else:
        segmentation.SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(labelmap),
        )

    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=len(BONES) + 1)[1:]) + 1
    library_surfaces = bool(surfaces) and all(
        BONE_BY_LABEL[int(label)].key in surfaces for label in present if int(label) in BONE_BY_LABEL
    )
    # Chosen while the segmentation is empty: changing it later drops every other representation.
    segmentation.SetSourceRepresentationName(CLOSED_SURFACE if library_surfaces else BINARY_LABELMAP)
    for label in present:
        bone = BONE_BY_LABEL.get(int(label))
        if bone is None:
            raise ValueError(f"label {label} is not a bone; labels must lie in 0..{len(BONES)}")
        segment = slicer.vtkSegment()
        segment.SetName(bone.name)
        segment.SetNameAutoGenerated(False)
        segment.SetColor(*bone.color)
        segment.SetColorAutoGenerated(False)
        segment.SetLabelValue(bone.label)
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology_entry(bone))
        # All segments share one labelmap (one layer), each with its own label value.
        segment.AddRepresentation(BINARY_LABELMAP, labelmap)
        if library_surfaces:
            segment.AddRepresentation(CLOSED_SURFACE, surface_to_polydata(surfaces[bone.key]))
        segmentation.AddSegment(segment, bone.name)

    if present.size and not node.CreateClosedSurfaceRepresentation():
        raise OutputError(f"segmentation '{node.GetName()}': Slicer could not make its closed surfaces")
    display = node.GetDisplayNode()
    display.SetPreferredDisplayRepresentationName2D(BINARY_LABELMAP)
    display.SetPreferredDisplayRepresentationName3D(CLOSED_SURFACE)
    missing = [bone.name for bone in BONES if bone.label not in present]
    if missing:
        log.warning("No %s in the segmentation '%s'", ", ".join(missing), node.GetName())
    return node


def surface_to_polydata(surface: Surface) -> vtk.vtkPolyData:
    """A library :class:`Surface` (LPS mm) as triangles in Slicer's RAS world."""
    # Negating two axes is a rotation, so the faces keep their outward winding.
    return to_vtk_polydata(Surface(surface.vertices * RAS_TO_LPS.diagonal()[:3], surface.faces))


def export_segments_to_stl(segmentation_node, folder, segment_ids=None) -> list[Path]:
    """Write each segment's closed surface as a binary STL (LPS millimetres), as Slicer exports it.

    Uses ``vtkSlicerSegmentationsModuleLogic.ExportSegmentsClosedSurfaceRepresentationToFiles``:
    files are named ``<segmentation name>_<segment name>.stl`` and their
    header says ``SPACE=LPS``. Existing files of the same names are replaced.

    Parameters
    ----------
    segmentation_node : vtkMRMLSegmentationNode
    folder : str or Path
        Created if missing.
    segment_ids : sequence of str, optional
        Default: all segments.

    Returns
    -------
    list of Path
        The files written.
    """
    register_segmentation_converters()
    folder = Path(folder)
    segmentation = segmentation_node.GetSegmentation()
    if segment_ids is None:
        segment_ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    if not segment_ids:
        raise OutputError(f"segmentation '{segmentation_node.GetName()}' has no segments to export")
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    # Export into a staging folder first: it tells exactly which files were
    # written, and the target never holds a half-written set.
    with output_directory(folder, overwrite=True) as staging:
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsClosedSurfaceRepresentationToFiles(
            str(staging), segmentation_node, ids, "STL", True, 1.0, False
        )
        names = sorted(path.name for path in staging.glob("*.stl"))
        if not exported or len(names) != len(segment_ids):
            raise OutputError(f"{folder}: Slicer could not write the STL files of '{segmentation_node.GetName()}'")
    return [folder.absolute() / name for name in names]


#: The segmentation node's attribute with the run's reasons (its verdict is in :data:`~KneeBoneSegLib.io.outputs.VERDICT_TAG`).
VERDICT_REASONS_ATTRIBUTE = "KneeBoneSeg.VerdictReasons"


def mark_verdicts(segmentation_node, verdict: dict) -> None:
    """Show a run's verdict on its segmentation node as the ``.seg.nrrd`` shows it (:func:`~KneeBoneSegLib.io.outputs.shown_verdict`).

    A bone that is not ``ok`` is renamed ("Femur (failed)"), flagged and
    tagged with its verdict; the node's attributes
    :data:`~KneeBoneSegLib.io.outputs.VERDICT_TAG` and :data:`VERDICT_REASONS_ATTRIBUTE`
    hold the run's verdict and reasons.
    """
    segmentation = segmentation_node.GetSegmentation()
    verdicts = bone_verdicts(verdict)
    for bone in BONES:
        segment = segmentation.GetSegment(bone.name)
        if segment is not None:
            name, tags = shown_verdict(bone, verdicts.get(bone.key))
            segment.SetName(name)
            for tag, value in tags.items():
                segment.SetTag(tag, value)
    segmentation_node.SetAttribute(VERDICT_TAG, verdict["run"])
    segmentation_node.SetAttribute(VERDICT_REASONS_ATTRIBUTE, "; ".join(verdict["reasons"]))


def bones_to_segmentation_node(written, target, reference_volume_node=None, name: str = "Knee bones"):
    """Show a run's results (a :class:`~KneeBoneSegLib.io.outputs.WrittenResult`) as a segmentation.

    The bones as :func:`labels_to_segmentation_node` shows them, marked with
    the run's verdicts (:func:`mark_verdicts`), and stamped with a digest of
    what was written (:func:`edited_since_written` compares with it).
    """
    node = labels_to_segmentation_node(
        written.labels.array,
        written.labels.geometry,
        target,
        reference_volume_node=reference_volume_node,
        surfaces=written.surfaces,
        name=name,
    )
    mark_verdicts(node, written.verdict)
    node.SetAttribute(WRITTEN_CONTENT_ATTRIBUTE, content_digest(node))
    return node


def bone_segment_ids(segmentation_node) -> dict[str, str]:
    """The bones a segmentation holds, by bone name, with their segment ids.

    A bone's segment keeps the bone's name as its id whatever it is shown
    as ("Tibia (review)" when flagged, or a name the user gave it).
    """
    segmentation = segmentation_node.GetSegmentation()
    return {bone.name: bone.name for bone in BONES if segmentation.GetSegment(bone.name) is not None}


#: The segmentation node's attribute with the digest of the bones as KneeBoneSeg wrote them (:func:`content_digest`).
WRITTEN_CONTENT_ATTRIBUTE = "KneeBoneSeg.WrittenContent"


def content_digest(segmentation_node) -> str:
    """A digest of what an edit can change in a segmentation: its source representation, and each
    segment's id, name, label value and source representation data.

    Views and Show 3D convert to other representations and leave the source
    alone, so only an edit changes the digest (the Segment Editor edits the
    binary labelmap, which it makes the source first).
    """
    segmentation = segmentation_node.GetSegmentation()
    source = segmentation.GetSourceRepresentationName()
    digest = hashlib.sha256(source.encode())
    hashed = []  # segments on one shared labelmap layer are hashed once
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        digest.update(f"{segment_id}\0{segment.GetName()}\0{segment.GetLabelValue()}\0".encode())
        data = segment.GetRepresentation(source)
        if data is None or any(data is seen for seen in hashed):
            continue
        hashed.append(data)
        for array in _representation_arrays(data):
            digest.update(
                np.ascontiguousarray(numpy_support.vtk_to_numpy(array))
            )  # hashed in place, no copy of the voxels
        if isinstance(data, vtk.vtkImageData):
            digest.update(repr(data.GetExtent()).encode())
            if isinstance(data, slicer.vtkOrientedImageData):
                matrix = vtk.vtkMatrix4x4()
                data.GetImageToWorldMatrix(matrix)
                digest.update(matrix_to_array(matrix).tobytes())
    return digest.hexdigest()


def _representation_arrays(data) -> list:
    """The VTK arrays that hold a representation's shape: a labelmap's voxels, a surface's points and triangles."""
    if isinstance(data, vtk.vtkPolyData):
        arrays = [data.GetPoints().GetData()] if data.GetPoints() is not None else []
        return arrays + [data.GetPolys().GetOffsetsArray(), data.GetPolys().GetConnectivityArray()]
    scalars = data.GetPointData().GetScalars()
    return [scalars] if scalars is not None else []


def edited_since_written(segmentation_node) -> bool:
    """True when replacing this segmentation's segments would lose someone's work: it has segments,
    and they are not the bones as KneeBoneSeg wrote them (edited since, or never written by it)."""
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        return False
    return segmentation_node.GetAttribute(WRITTEN_CONTENT_ATTRIBUTE) != content_digest(segmentation_node)


def image_data_from_array(array: np.ndarray, image):
    """Fill ``image`` (a ``vtkImageData`` or ``vtkOrientedImageData``) with a copy of ``array[k, j, i]``."""
    array = np.ascontiguousarray(array)
    image.SetDimensions(*array.shape[::-1])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image
