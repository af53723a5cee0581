"""Volume in, labelled bones and surfaces out: the one path every caller takes.

The command line, the Slicer module and the tests all call :func:`segment`
(the whole method) or :func:`postprocess` (everything after the network, from
a kept probability map, an existing mask or a label map). The stages are the
paper's (with one addition, 7), each a function of its own module:

1. normalise intensities as the model's card says       (normalization)
2. resample to the model's voxel spacing, if it has one  (resampling)
3. predict overlapping sub-volumes (or whole slices, with a 2D network)
   on 1 or 3 projections                                  (inference, projections)
4. fuse the projections and bring them back to the scan's grid
5. keep the three largest components, name them          (components)
6. close each bone with a sphere                          (morphology)
7. fill holes left inside each bone                       (morphology)
8. smoothed closed surfaces in patient millimetres        (surfaces)

Around them, what says whether to trust the result: the input compared with
the model's card before the network runs (inputcheck), bones named only when
their size and place fit (plausibility, in step 5), the network's confidence
per bone (confidence) and a verdict per bone and per run (verdicts).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

import numpy as np

from . import __version__
from .anatomy import BONES
from .errors import Cancelled, InputError
from .io.images import check_volume
from .network.models import Model
from .network.projections import fuse_probabilities
from .options import SegmentOptions
from .postprocess.components import label_bones
from .postprocess.morphology import close_bones, fill_bone_holes
from .postprocess.surfaces import bone_surfaces
from .threads import thread_count, using_threads
from .trust.confidence import ProjectionRange, bone_confidence
from .trust.inputcheck import compare_with_card
from .trust.plausibility import FieldOfView
from .trust.verdicts import judge
from .volume import Geometry, Volume

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


@dataclass
class SegmentationResult:
    """Everything a run produces, on the input's grid."""

    labels: np.ndarray
    geometry: Geometry
    probability: np.ndarray | None = None
    surfaces: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    uncertainty: np.ndarray | None = None  # disagreement between projections, on request
    options: SegmentOptions = field(default_factory=SegmentOptions)  # the run's, which also say what to write

    @property
    def verdict(self) -> dict:
        """``{"run": "ok" | "review" | "failed", "reasons": [...], "bones": {...}}`` (see :mod:`~KneeBoneSegLib.trust.verdicts`)."""
        return self.report["verdict"]


class _Stages:
    """Times the stages of a run and reports progress; a raising callback cancels."""

    def __init__(self, progress: Progress | None):
        self._progress = progress
        self.timings: dict[str, float] = {}

    def report(self, stage: str, fraction: float) -> None:
        if self._progress is not None:
            try:
                self._progress(stage, float(fraction))
            except Cancelled:
                raise
            except Exception as error:
                raise Cancelled(f"stopped during {stage}: {error}") from None

    def run(self, stage: str, function, *args, **kwargs):
        self.report(stage, 0.0)
        start = time.perf_counter()
        value = function(*args, **kwargs)
        self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - start, 3)
        self.report(stage, 1.0)
        return value


def segment(
    volume: Volume,
    model: Model,
    options: SegmentOptions | None = None,
    progress: Progress | None = None,
) -> SegmentationResult:
    """Segment femur, tibia and patella in a knee MRI ``volume`` with an opened ``model``.

    Returns labels (0 background, 1 femur, 2 tibia, 3 patella) and the fused
    bone probability on the input's grid, the smoothed surfaces of the bones
    found and a JSON-able report whose ``verdict`` says, per bone and for the
    run, whether to trust them (``ok``, ``review``, ``failed``, with reasons).
    The network runs as ``model`` was opened (:func:`~KneeBoneSegLib.network.models.load_model`):
    options that name another engine, device, precision or threads are refused
    in one line, and the report records what ran.
    ``progress(stage, fraction)`` is called as
    the run goes; an exception raised from it cancels the run (:class:`Cancelled`).
    """
    # Options that contradict the model are refused first, before any work on the scan.
    options = model.check_options((options or SegmentOptions()).validate())
    stages = _Stages(progress)
    with using_threads(options.threads):
        warnings = check_volume(volume, min_shape=(model.card.patch_size,) * 3, model_spacing=model.card.spacing_mm)
        engine = model.describe()
        log.info(
            "Running the network with %s on %s (%s, %s threads)",
            engine["engine"],
            engine["device"],
            engine["provider"],
            engine["threads"],
        )
        model_input = model.model_input(volume, run=stages.run)
        input_check = compare_with_card(model_input.image, volume.geometry.spacing, volume.tags, model.card)
        for difference in input_check["differences"]:
            warnings.append(f"the scan differs from the model's training data: {difference}")
            log.warning("the scan differs from the model's training data: %s", difference)
        # Each projection's map is folded into the fused one as it comes (never all three held),
        # and into the running range that measures their disagreement.
        maps = model.projection_maps(model_input, options, stages.report)
        grid = model_input.grid
        del model_input  # the iterator holds the image only as long as it needs it
        spread = ProjectionRange()
        fusion = model.fusion_rule(options.fusion)
        probability = stages.run("network", fuse_probabilities, spread.watch(maps), fusion)
        disagreement = spread.disagreement()
        if grid.resamples:
            probability = stages.run("resample", grid.to_scan, probability)
            if disagreement is not None:
                disagreement = stages.run("resample", grid.to_scan, disagreement)

        result = postprocess(
            Volume(probability, volume.geometry),
            options,
            progress=progress,
            field_of_view=FieldOfView(volume.array),
            _stages=stages,
        )
    model_record = {
        "path": str(model.path) if model.path else None,
        "name": model.card.name,
        "card": model.card.to_dict(),
    }
    result.report.update(
        model=model_record, device=engine["device"], engine=engine, input_check=input_check, fusion=fusion
    )
    result.report["warnings"] = warnings + result.report.get("warnings", [])
    result.report["confidence"] = stages.run(
        "confidence", bone_confidence, result.labels, probability, disagreement, options.threshold
    )
    result.report["verdict"] = judge(result.report, model.card.confidence)
    result.uncertainty = disagreement if options.keep_uncertainty else None
    return result


def postprocess(
    volume: Volume,
    options: SegmentOptions | None = None,
    progress: Progress | None = None,
    field_of_view=None,
    _stages: _Stages | None = None,
) -> SegmentationResult:
    """Turn a probability map, binary mask or label map into named, closed, surfaced bones.

    ``volume.array`` may be a floating-point probability map (thresholded at
    ``options.threshold``) or an integer mask or label map (any non-zero voxel
    is bone; names are re-derived from anatomy, so a label map from another
    tool with other label values works too). ``field_of_view``
    (:class:`~KneeBoneSegLib.trust.plausibility.FieldOfView` of the scan) finds a
    turned scan's zero-filled margin, where a bone is cut by the field of view
    as at the array's edge, and into which the closing never grows a bone;
    without it only the array's edge cuts.
    """
    options = (options or SegmentOptions()).validate()
    with using_threads(options.threads):
        return _postprocess(volume, options, _stages or _Stages(progress), field_of_view)


def _postprocess(volume: Volume, options: SegmentOptions, stages: _Stages, field_of_view=None) -> SegmentationResult:
    array = volume.array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputError("the probability map holds NaN or infinite values; re-run the segmentation")
        bone = array >= options.threshold
        probability = array
    else:
        bone = array > 0
        probability = None

    labels, bone_report = stages.run("components", label_bones, bone, volume.geometry, field_of_view=field_of_view)
    del bone
    if options.closing_radius > 0:
        labels = stages.run(
            "closing",
            close_bones,
            labels,
            options.closing_radius,
            spacing=volume.geometry.spacing,
            units=options.closing_units,
            field_of_view=field_of_view,
        )
    if options.fill_holes:
        labels = stages.run("fill holes", fill_bone_holes, labels)

    voxel_mm3 = float(np.prod(volume.geometry.spacing))
    counts = np.bincount(labels.ravel(), minlength=len(BONES) + 1)
    bones = {
        bone.key: {
            "label": bone.label,
            "voxels": int(counts[bone.label]),
            "volume_mm3": round(counts[bone.label] * voxel_mm3, 1),
        }
        for bone in BONES
        if counts[bone.label]
    }

    surfaces = {}
    if options.surfaces and bones:
        finished = []

        def bone_done(label: int) -> None:
            finished.append(label)
            stages.report("surfaces", len(finished) / len(bones))

        made = stages.run(
            "surfaces", bone_surfaces, labels, volume.geometry, options.smoothing_iterations, done=bone_done
        )
        for bone in BONES:
            if bone.label in made:
                surfaces[bone.key], bones[bone.key]["surface"] = made[bone.label]

    report = {
        "kneeboneseg_version": __version__,
        "options": asdict(options),
        "bones": bones,
        "missing": bone_report.get("missing", []),
        "components": bone_report,
        "timings_s": stages.timings,
        "threads": thread_count(),
        "warnings": list(bone_report.get("warnings", [])),
        "versions": _versions(),
    }
    report["verdict"] = judge(report)
    return SegmentationResult(
        labels=labels,
        geometry=volume.geometry,
        probability=probability,
        surfaces=surfaces,
        report=report,
        options=options,
    )


@functools.cache
def _versions() -> dict:
    found = {}
    for package in ("numpy", "scipy", "scikit-image", "SimpleITK", "vtk", "onnxruntime", "openvino", "keras"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
