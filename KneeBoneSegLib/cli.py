"""The ``kneeboneseg`` command line: segment, postprocess, evaluate, train, export, sample, info.

Every sub-command calls the same library entry points as the Slicer module.
A user error (bad path, unusable image, model that does not fit, output that
exists) prints one line and exits with status 2; nothing partial is written.
``segment`` and ``postprocess`` end with the verdict line (``OK``, ``REVIEW``
or ``FAILED`` with the reasons per bone); when no bone passes, the outputs are
written for inspection, marked failed, and the exit status is 3.
With ``--progress json`` progress goes to stdout as one JSON object per line,
which is how the Slicer module follows a run in its background process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .atomic import check_output_folder
from .batch import TABLE_FILE, failures, find_cases, segment_many
from .errors import InputError, KneeBoneSegError
from .io.images import read_mask, read_volume
from .io.outputs import write_outputs
from .io.sample import copy_sample, download_sample
from .metrics import evaluate_labels, format_metrics_table
from .network.devices import describe_devices
from .network.export import export_onnx
from .network.models import default_model_path, load_model, load_model_for, read_card
from .options import add_arguments, options_from_arguments, options_from_mapping
from .pipeline import _versions, postprocess, segment
from .preprocess.resampling import labels_onto_grid, same_grid
from .training.arguments import add_arguments as add_training_arguments
from .training.arguments import config_from_args
from .training.loop import train

log = logging.getLogger("kneeboneseg")

EXIT_USER_ERROR = 2
#: No bone passed (run verdict ``failed``): outputs written, for inspection only.
EXIT_NO_BONE = 3


class _Reporter:
    """Shows progress as tqdm bars (text) or JSON lines (for a driving process)."""

    def __init__(self, mode: str):
        self.mode = mode
        self._bar = None
        self._stage = None

    def __call__(self, stage: str, fraction: float) -> None:
        if self.mode == "json":
            print(json.dumps({"stage": stage, "fraction": round(fraction, 4)}), flush=True)
            return
        if self.mode != "text":
            return
        if stage != self._stage:
            self.close()
            from tqdm import tqdm

            self._bar = tqdm(
                total=100, desc=stage, unit="%", leave=False, file=sys.stderr, bar_format="{desc:<20} {bar} {n_fmt}%"
            )
            self._stage = stage
        self._bar.n = int(round(100 * fraction))
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None

    def finish(self, payload: dict) -> None:
        self.close()
        if self.mode == "json":
            print(json.dumps({"done": True, **payload}), flush=True)

    def error(self, message: str) -> None:
        self.close()
        if self.mode == "json":
            print(json.dumps({"error": message}), flush=True)
        print(f"kneeboneseg: error: {message}", file=sys.stderr)


def _add_options_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--options",
        type=Path,
        default=None,
        metavar="FILE",
        help="the run's options as a JSON object (SegmentOptions' names); flags given as well win over it",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options file, and how a run writes and shows its outputs (which files: the run's options)."""
    _add_options_file_argument(parser)
    group = parser.add_argument_group("outputs")
    group.add_argument("--overwrite", action="store_true", help="replace the outputs in an existing, non-empty OUTDIR")
    group.add_argument(
        "--progress",
        choices=("text", "json", "none"),
        default="text",
        help="progress display (json: one object per line on stdout)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kneeboneseg", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log every stage")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seg = commands.add_parser("segment", help="segment femur, tibia and patella in a knee MRI")
    seg.add_argument("input", type=Path, help="image file (NRRD, NIfTI, MetaImage) or DICOM series folder")
    seg.add_argument(
        "-o", "--output", type=Path, required=True, help="output folder (created; must be empty unless --overwrite)"
    )
    add_arguments(seg, "segment")
    _add_output_arguments(seg)

    post = commands.add_parser(
        "postprocess", help="name, close and surface the bones of an existing mask, label map or probability map"
    )
    post.add_argument(
        "mask", type=Path, help="binary mask, label map (.nrrd, .seg.nrrd, .nii.gz, ...) or probability map in [0, 1]"
    )
    post.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    add_arguments(post, "postprocess")
    _add_output_arguments(post)

    batch = commands.add_parser(
        "batch", help="segment a cohort: each case into OUTDIR/<case>/, one table OUTDIR/cases.csv; run again to resume"
    )
    batch.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="image files, folders (each image file and DICOM series in the tree a case) or CSV files with id and path columns",
    )
    batch.add_argument("-o", "--output", type=Path, required=True, help="the cohort's folder (created or resumed)")
    add_arguments(batch, "segment")
    _add_options_file_argument(batch)
    batch.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes, each with the model opened once and the cores shared (default: 1, faster on 2 cores than 2 workers, bench/bench_batch.py)",
    )
    batch.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="send the cases to this Dask distributed scheduler (tcp://host:8786; the [cluster] extra); inputs and OUTDIR on storage its workers share",
    )
    batch.add_argument(
        "--retry-failed", action="store_true", help="run again the cases that failed (error, or no bone passed) before"
    )
    batch.add_argument(
        "--progress",
        choices=("text", "json", "none"),
        default="text",
        help="a bar over the cases with the time left (default: text; json: one object per case on stdout, for the Slicer module)",
    )

    evaluate = commands.add_parser("evaluate", help="Dice, IoU and distances of a label map against the ground truth")
    evaluate.add_argument(
        "prediction",
        type=Path,
        metavar="PRED",
        help="the label map to score (0 background, 1 femur, 2 tibia, 3 patella), on any grid that overlaps REFERENCE",
    )
    evaluate.add_argument(
        "reference",
        type=Path,
        metavar="REFERENCE",
        help="the ground truth it is scored against, a label map with the same values",
    )
    evaluate.add_argument(
        "--json", action="store_true", help="print one JSON object keyed by femur, tibia, patella, all"
    )
    evaluate.add_argument(
        "--surfaces",
        action="store_true",
        help="also the distance from each predicted bone's smoothed surface (its STL) to the reference's: mean and 95th percentile, mm",
    )

    train = commands.add_parser("train", help="train or fine-tune the 3D U-Net on image + label-map pairs")
    add_training_arguments(train)

    export = commands.add_parser(
        "export", help="write a trained .keras model as .onnx (beside it) and record the export in its card"
    )
    export.add_argument("model", type=Path, help="the .keras model")
    export.add_argument(
        "-o", "--output", type=Path, default=None, help="the .onnx file to write (default: beside the model)"
    )

    sample = commands.add_parser(
        "sample", help="download the public annotated low-field knee scan (KneeBones3Dify) and assemble it as NRRD"
    )
    sample.add_argument(
        "-o", "--output", type=Path, required=True, help="folder for knee_mri.nrrd and knee_bones_labels.nrrd"
    )
    source = sample.add_mutually_exclusive_group()
    source.add_argument(
        "--url",
        default=None,
        help="where to download the dataset's archive from (default: its public repository at a pinned commit)",
    )
    source.add_argument(
        "--from",
        dest="from_folder",
        type=Path,
        default=None,
        metavar="DIR",
        help="no download: a local copy, either the unpacked dataset (Data/ and GT-Masks/) or a folder with knee_mri.nrrd and knee_bones_labels.nrrd",
    )
    sample.add_argument(
        "--progress",
        choices=("text", "json", "none"),
        default="none",
        help="progress display (json: one object per line on stdout, for the Slicer module)",
    )

    info = commands.add_parser(
        "info",
        help="versions, the engine and device a segmentation runs on, and the default model with its held-out figures",
    )
    info.add_argument(
        "--json", action="store_true", help="everything as one JSON object, the default model's whole card included"
    )
    return parser


def _options_from_args(args):
    """The run's options: the ``--options`` file's, then the flags given."""
    base = None
    if args.options is not None:
        try:
            request = json.loads(args.options.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise InputError(f"{args.options} cannot be read as a JSON object of options ({error})") from None
        if not isinstance(request, dict):
            raise InputError(f"{args.options} must hold a JSON object of options, not {type(request).__name__}")
        base = options_from_mapping(request)
    return options_from_arguments(args, base)


def _run_segment(args, reporter: _Reporter) -> dict:
    # Every refusal that needs no scan comes first, in a second: options, the output folder, the model and its engine.
    options = _options_from_args(args)
    check_output_folder(args.output, args.overwrite)
    model = load_model_for(options)
    volume = read_volume(args.input)
    result = segment(volume, model, options, progress=reporter)
    result.report["input"] = str(args.input)
    return write_outputs(result, args.output, overwrite=args.overwrite, inputs=[args.input, model.path])


def _run_postprocess(args, reporter: _Reporter) -> dict:
    options = _options_from_args(args)
    check_output_folder(args.output, args.overwrite)
    result = postprocess(read_mask(args.mask), options, progress=reporter)
    result.report["input"] = str(args.mask)
    return write_outputs(result, args.output, overwrite=args.overwrite, inputs=[args.mask])


def _run_batch(args, reporter: _Reporter) -> int:
    """``kneeboneseg batch``: the exit status is the number of failed cases (at most 100)."""
    options = _options_from_args(args)
    if args.workers < 1:
        raise InputError(f"workers must be at least 1, not {args.workers}")
    cases = find_cases(args.inputs)
    bar = None
    if args.progress == "text":
        from tqdm import tqdm

        bar = tqdm(total=len(cases), unit="case", file=sys.stderr)
    done = {"count": 0}

    def progress(count: int, total: int, row: dict) -> None:
        if args.progress == "json":
            reporter(f"{count} of {total} cases ({row['id']}: {row['status']})", count / total)
        if bar is not None:
            bar.n = count
            bar.set_postfix_str(f"{row['id']}: {row['status']}")
            bar.refresh()
        done["count"] = count

    client = _dask_client(args.scheduler) if args.scheduler else None
    try:
        rows = segment_many(
            cases,
            args.output,
            options,
            workers=args.workers,
            retry_failed=args.retry_failed,
            progress=progress,
            client=client,
        )
    except KeyboardInterrupt:
        print(
            f"kneeboneseg: interrupted with {done['count']} of {len(cases)} cases in {args.output / TABLE_FILE}; run the same command to go on",
            file=sys.stderr,
        )
        return 130
    finally:
        if bar is not None:
            bar.close()
        if client is not None:
            client.close()
    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "review", "failed", "error")}
    if args.progress == "json":
        reporter.finish({"outputs": [str(Path(args.output).absolute() / TABLE_FILE)], "cases": counts})
        return min(failures(rows), 100)
    print(
        f"{len(rows)} cases: "
        + ", ".join(f"{n} {status}" for status, n in counts.items())
        + f" -> {args.output / TABLE_FILE}"
    )
    return min(failures(rows), 100)


def _dask_client(address: str):
    """A client of the Dask scheduler at ``address``, or a one-line error saying what to install or check."""
    try:
        from distributed import Client
    except ImportError:
        raise InputError('--scheduler needs Dask distributed: pip install "kneeboneseg[cluster]"') from None
    try:
        return Client(address, timeout="30s")
    except (OSError, TimeoutError) as error:
        raise InputError(
            f"no Dask scheduler answers at {address} ({error}); start one (dask scheduler) or check the address"
        ) from None


def _run_evaluate(args, reporter: _Reporter) -> int:
    prediction, reference = read_volume(args.prediction), read_volume(args.reference)
    predicted = prediction.array
    if not same_grid(prediction, reference):
        # Scored where the reference's voxels are, whatever grid the prediction was saved on.
        predicted = labels_onto_grid(prediction, reference, names=(args.prediction, args.reference))
        print(
            f"kneeboneseg: note: {args.prediction} lies on another grid than {args.reference}; resampled onto it (nearest neighbour)",
            file=sys.stderr,
        )
    metrics = evaluate_labels(predicted, reference.array, reference.geometry.spacing, surfaces=args.surfaces)
    print(json.dumps(metrics, indent=2) if args.json else format_metrics_table(metrics))
    return 0


def _run_export(args, reporter: _Reporter) -> int:
    record = export_onnx(args.model, args.output)
    print(
        f"wrote {args.output or args.model.with_suffix('.onnx')} (largest difference from Keras {record['max_abs_difference']:.1e})"
    )
    return 0


def _run_sample(args, reporter: _Reporter) -> int:
    check_output_folder(args.output, overwrite=False)  # before a download of 140 MB
    if args.from_folder:
        written = copy_sample(args.from_folder, args.output)
    else:
        written = download_sample(args.output, **({"url": args.url} if args.url else {}), progress=reporter)
    if reporter.mode == "json":
        reporter.finish({"outputs": [str(path) for path in written]})
    else:
        print("\n".join(str(path) for path in written))
    return 0


def _run_train(args, reporter: _Reporter) -> int:
    train(config_from_args(args))
    return 0


def _run_info(args, reporter: _Reporter) -> int:
    info = {"kneeboneseg": __version__, "versions": _versions(), "devices": describe_devices()}
    model_path = default_model_path()
    card = read_card(model_path)
    info["default_model"] = {"path": str(model_path), "card": card.to_dict() if card else None}
    # What a default `segment` runs on here, read back from the opened model: engine, device, precision, CPU.
    info["engine"] = load_model(model_path).describe() if model_path.is_file() else None
    print(json.dumps(info, indent=2) if args.json else info_summary(info))
    return 0


def info_summary(info: dict) -> str:
    """A few lines of ``kneeboneseg info``'s object for a person: versions, engine, default model and its held-out figures."""
    engine, card = info["engine"], info["default_model"]["card"]
    lines = [
        f"kneeboneseg {info['kneeboneseg']}, Python {sys.version.split()[0]}, "
        + ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    ]
    if engine:
        lines.append(
            f"runs on: {engine['engine']} {engine['version']}, {engine['device']} ({engine['cpu']['name']}), {engine['precision']}, {engine['threads']} threads"
        )
    lines.append(f"default model: {info['default_model']['path']}" + ("" if card else " (no card)"))
    heldout = (card or {}).get("quality", {}).get("heldout")
    if heldout:
        dice = {bone: figures["dice"] for bone, figures in heldout["metrics"].items()}
        lines.append(
            "  held out, all-bone Dice {all:.4f} (femur {femur:.4f}, tibia {tibia:.4f}, patella {patella:.4f})".format(
                **dice
            )
        )
    lines.append("more: kneeboneseg info --json")
    return "\n".join(lines)


#: What each sub-command runs: an exit status, or for segment and postprocess what they wrote (see :func:`main`).
COMMANDS = {
    "segment": _run_segment,
    "postprocess": _run_postprocess,
    "evaluate": _run_evaluate,
    "batch": _run_batch,
    "export": _run_export,
    "sample": _run_sample,
    "train": _run_train,
    "info": _run_info,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:  # the console; a batch's per-case logs take the library's INFO lines
        handler.setLevel(logging.INFO if args.verbose else logging.WARNING)
    reporter = _Reporter(getattr(args, "progress", "none"))
    start = time.perf_counter()
    try:
        outcome = COMMANDS[args.command](args, reporter)
        if isinstance(outcome, int):
            return outcome
    except KneeBoneSegError as error:
        reporter.error(str(error))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        reporter.error("interrupted; nothing was written")
        return 130
    # segment and postprocess: what they wrote, and its verdict.
    reporter.finish(
        {"outputs": outcome["files"], "seconds": round(time.perf_counter() - start, 1), "verdict": outcome["verdict"]}
    )
    if reporter.mode != "json":
        print(outcome["summary_line"])
    return EXIT_NO_BONE if outcome["verdict"]["run"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
