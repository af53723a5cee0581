"""A cohort, not one scan: segment many cases into one folder with one table, resumably.

:func:`segment_many` (``kneeboneseg batch``) gives every case the outputs that
``kneeboneseg segment`` writes, in ``OUTDIR/<case>/``, and keeps
``OUTDIR/cases.csv`` with a row per case, rewritten whole after each case.

- **Cases** (:func:`find_cases`): image files, folders (every image file and
  every DICOM series in the tree is a case, a series named from patient, study
  and series, so names stay the same from run to run), or a CSV file with a
  case id and a path per row.
- **Resumable.** A case whose folder holds a complete run for the same input,
  model and options is not run again; a case that failed (an error, or no bone
  passed) is not run again either unless ``retry_failed``. Outputs appear
  whole or not at all (:func:`~KneeBoneSegLib.atomic.output_directory`), so
  after a crash or a kill nothing half-written is taken for done.
- **Faults stay contained.** A case that cannot be read or segmented gets
  status ``error`` and its one-line reason; the others go on.
- **One case, no shared state** (:func:`segment_case`): the function a process
  pool (``workers``), or a cluster scheduler, runs per case.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import multiprocessing
import re
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .anatomy import BONES
from .atomic import atomic_file
from .errors import InputError, KneeBoneSegError
from .io.images import find_scans, image_name, read_volume
from .io.outputs import write_json, write_outputs
from .network.models import file_sha256, load_model_for
from .options import SegmentOptions
from .pipeline import segment
from .threads import available_cores

log = logging.getLogger(__name__)

TABLE_FILE = "cases.csv"
ERROR_FILE = "error.json"
LOG_FOLDER = "logs"
STATUSES = ("ok", "review", "failed", "error")
COLUMNS = (
    ["id", "input", "status", "error"]
    + [f"{bone.key}_{what}" for bone in BONES for what in ("volume_mm3", "verdict")]
    + ["seconds", "engine", "precision", "model", "model_sha256"]
)


@dataclass(frozen=True)
class Case:
    """One scan of a cohort: its id (the name of its output folder) and where it is."""

    id: str
    input: Path


def find_cases(inputs: Iterable) -> list[Case]:
    """The cases named by ``inputs``: image files, folders (a case per image file and per DICOM series in the tree)
    or CSV files.

    A CSV file has a header with ``id`` and ``path`` columns (relative paths
    are taken from the CSV's folder). Ids are made safe as folder names and
    unique (``-2``, ``-3`` for repeats). Raises :class:`InputError` in one
    line for an input that is none of these, or when no case is found.
    """
    cases = []
    for item in map(Path, inputs):
        if item.suffix.lower() == ".csv":
            cases += _cases_from_csv(item)
        elif item.is_dir():
            cases += _folder_cases(item)
        elif item.is_file():
            cases.append(Case(_safe(image_name(item)), item))
        else:
            raise InputError(
                f"{item} does not exist; give image files, folders of image files or DICOM series, or a CSV of cases"
            )
    if not cases:
        raise InputError(
            "no cases found in the inputs; give image files, folders of image files or DICOM series, or a CSV with id and path columns"
        )
    seen: dict = {}
    unique = []
    for case in cases:
        seen[case.id] = seen.get(case.id, 0) + 1
        unique.append(Case(case.id if seen[case.id] == 1 else f"{case.id}-{seen[case.id]}", case.input))
    return unique


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "case"


def _cases_from_csv(path: Path) -> list[Case]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.DictReader(stream))
    except OSError as error:
        raise InputError(f"{path} cannot be read ({error.strerror}); give a CSV with id and path columns") from None
    if not rows or not {"id", "path"} <= set(rows[0]):
        raise InputError(f"{path} has no id and path columns; its header must name both")
    return [
        Case(
            _safe(row["id"]),
            (path.parent / row["path"]).resolve() if not Path(row["path"]).is_absolute() else Path(row["path"]),
        )
        for row in rows
    ]


def _folder_cases(folder: Path) -> list[Case]:
    """A case per image file in the tree under ``folder``, named after the file, and a case per DICOM series,
    named ``<patient>_<study date>_<series number>`` so that names stay the same from run to run."""
    images, series = find_scans(folder)
    cases = [Case(_safe(image_name(path)), path) for path in images]
    for first, tags in series:
        parts = (
            tags["PatientID"] or "patient",
            tags["StudyDate"],
            tags["SeriesNumber"] or tags["SeriesInstanceUID"][-8:],
        )
        cases.append(Case(_safe("_".join(part for part in parts if part)), first))
    return cases


def segment_case(case: Case, outdir, options: SegmentOptions, model=None) -> dict:
    """Segment one case into ``outdir/<case.id>/`` and return its table row; never raises for the case's own faults.

    ``model``: an opened model to reuse (a worker process opens it once);
    None opens the one ``options`` names. A case that cannot be read or
    segmented gets status ``error`` with the one-line reason, written to
    ``<case.id>/error.json`` so that a later run knows it failed.
    """
    outdir = Path(outdir)
    folder = outdir / case.id
    started = time.perf_counter()
    handler = _case_log(outdir, case)
    try:
        model = model or load_model_for(options)
        shutil.rmtree(folder, ignore_errors=True)  # a failed or stale earlier run of this case
        result = segment(read_volume(case.input), model, options)
        result.report["input"] = str(case.input)
        result.report["batch"] = _signature(case, options, model)
        write_outputs(result, folder, inputs=[case.input, model.path])
        return _row(case, result.report, time.perf_counter() - started)
    except (KneeBoneSegError, OSError, ValueError, RuntimeError, MemoryError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.error("%s: %s", case.id, message)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        signature = _signature(case, options, model) if model is not None else {"input": str(case.input)}
        write_json({"error": message, "batch": signature}, folder / ERROR_FILE)
        return _error_row(case, message, time.perf_counter() - started, signature)
    finally:
        logging.getLogger(__package__).removeHandler(handler)
        handler.close()


def _case_log(outdir: Path, case: Case) -> logging.Handler:
    """The library's log of one case, in ``outdir/logs/<case.id>.log``."""
    (outdir / LOG_FOLDER).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(outdir / LOG_FOLDER / f"{case.id}.log", mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    library = logging.getLogger(__package__)
    library.setLevel(logging.INFO)
    library.addHandler(handler)
    return handler


def _signature(case: Case, options: SegmentOptions, model) -> dict:
    """What a case's outputs depend on: its input, the model file and the options that change the bones."""
    return {
        "input": str(case.input),
        "model_sha256": _model_sha256(model.path) if model.path else None,
        "options": {
            name: value
            for name, value in options.to_request().items()
            if name not in ("device", "engine", "threads", "batch_size")
        },
    }


def _model_sha256(path) -> str:
    """The model file's SHA-256, read once per file version (every case of a batch asks for it twice)."""
    stat = Path(path).stat()
    return _sha256_of_version(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _sha256_of_version(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


def _row(case: Case, report: dict, seconds: float) -> dict:
    verdicts = report.get("verdict", {})
    row = {"id": case.id, "input": str(case.input), "status": verdicts.get("run", "failed"), "error": ""}
    for bone in BONES:
        row[f"{bone.key}_volume_mm3"] = (
            f"{report['bones'][bone.key]['volume_mm3']:.0f}" if bone.key in report.get("bones", {}) else ""
        )
        row[f"{bone.key}_verdict"] = verdicts.get("bones", {}).get(bone.key, {}).get("verdict", "missing")
    engine = report.get("engine", {})
    model = report.get("model", {})
    row.update(
        seconds=f"{seconds:.1f}",
        engine=engine.get("engine", ""),
        precision=engine.get("precision", ""),
        model=model.get("name", ""),
        model_sha256=report.get("batch", {}).get("model_sha256") or "",
    )
    return row


def _error_row(case: Case, message: str, seconds: float, signature: dict) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(
        id=case.id,
        input=str(case.input),
        status="error",
        error=message,
        seconds=f"{seconds:.1f}",
        model_sha256=signature.get("model_sha256") or "",
    )
    return row


def done_row(case: Case, outdir, options: SegmentOptions, model) -> dict | None:
    """The table row of a case already run for this input, model and options, or None to run it."""
    folder = Path(outdir) / case.id
    signature = _signature(case, options, model)
    for name in ("summary.json", ERROR_FILE):
        path = folder / name
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return None
        if record.get("batch") != signature:
            return None
        if name == ERROR_FILE:
            return _error_row(case, record["error"], 0.0, signature)
        return _row(case, record, sum(record.get("timings_s", {}).values()))
    return None


def write_table(rows: list[dict], path) -> None:
    """``cases.csv``: a row per case in :data:`COLUMNS`, replaced whole (never half written)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_file(path) as temporary:
        temporary.write_text(text.getvalue(), encoding="utf-8")


_PROCESS_MODELS: dict = {}


def _process_model(options: SegmentOptions):
    """The model ``options`` open, opened once per process (a pool's or a Dask cluster's worker) and kept."""
    key = (options.model, options.engine, options.device, options.threads, options.precision)
    if key not in _PROCESS_MODELS:
        _PROCESS_MODELS[key] = load_model_for(options)
    return _PROCESS_MODELS[key]


def _run_in_worker(case: Case, outdir: str, options: SegmentOptions) -> dict:
    """One case in a worker process, with that process's model."""
    return segment_case(case, outdir, options, _process_model(options))


def _remove_staging(outdir: Path) -> None:
    """Staging folders left by a run or a worker that was killed in the middle of a case."""
    for leftover in outdir.glob(".*.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def segment_many(
    cases: Iterable[Case],
    outdir,
    options: SegmentOptions | None = None,
    workers: int = 1,
    retry_failed: bool = False,
    progress: Callable[[int, int, dict], None] | None = None,
    client=None,
) -> list[dict]:
    """Segment every case into ``outdir`` (``<case.id>/`` each, ``cases.csv`` for all); returns the table's rows.

    Cases done before for the same input, model and options are skipped (the
    failed ones too, unless ``retry_failed``). ``workers`` processes run the
    cases, each with the model opened once and the cores shared among them
    (``options.threads``, else cores / workers each). ``client``: a
    ``dask.distributed.Client`` whose cluster runs the cases instead, on
    paths its workers share; a case whose worker is lost is run again on
    another (Dask reschedules it), and what the lost worker half wrote is
    removed. ``progress(done, total, row)`` after every case.
    """
    options = (options or SegmentOptions()).validate()
    cases = list(cases)
    outdir = Path(outdir).absolute()
    outdir.mkdir(parents=True, exist_ok=True)
    _remove_staging(outdir)
    if options.threads is None and client is None:
        options = options.with_values(threads=max(1, available_cores() // max(1, workers)))
    model = load_model_for(options)  # refused here, before any case, if it cannot run
    rows: dict[str, dict] = {}
    pending = []
    for case in cases:
        row = done_row(case, outdir, options, model)
        if row is not None and not (retry_failed and row["status"] in ("failed", "error")):
            rows[case.id] = row
        else:
            pending.append(case)
    table = outdir / TABLE_FILE
    write_table([rows[case.id] for case in cases if case.id in rows], table)
    log.info("%d cases: %d done before, %d to run", len(cases), len(rows), len(pending))

    def finished(row: dict) -> None:
        rows[row["id"]] = row
        write_table([rows[case.id] for case in cases if case.id in rows], table)
        if progress is not None:
            progress(len(rows), len(cases), row)

    if client is not None:
        _run_on_cluster(client, pending, outdir, options, finished)
    elif workers <= 1:
        for case in pending:
            finished(segment_case(case, outdir, options, model))
    elif pending:
        _run_in_processes(workers, pending, outdir, options, finished)
    _remove_staging(outdir)
    return [rows[case.id] for case in cases]


def _run_in_processes(workers: int, cases: list, outdir: Path, options: SegmentOptions, finished) -> None:
    context = multiprocessing.get_context("spawn")  # no forked copies of a runtime's threads
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_run_in_worker, case, str(outdir), options) for case in cases]
        try:
            for future in as_completed(futures):
                finished(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            raise


def _run_on_cluster(client, cases: list, outdir: Path, options: SegmentOptions, finished) -> None:
    """The cases as tasks of a Dask cluster; a task whose worker dies is rescheduled by Dask."""
    from distributed import as_completed as completed

    run = uuid.uuid4().hex[:8]
    futures = [
        client.submit(_run_in_worker, case, str(outdir), options, key=f"kneeboneseg-{run}-{case.id}", pure=False)
        for case in cases
    ]
    try:
        for future in completed(futures):
            finished(future.result())
    except BaseException:
        client.cancel(futures)
        raise


def failures(rows: list[dict]) -> int:
    """How many cases did not give bones to use: status ``error`` or ``failed``."""
    return sum(row["status"] in ("error", "failed") for row in rows)
