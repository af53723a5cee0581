"""The README's quality and speed tables, printed from the results in bench/results.

    python bench/readme_tables.py                 # print the tables
    python bench/readme_tables.py --check README.md   # exit 1, naming the table, where the README differs
    python bench/readme_tables.py --update README.md  # rewrite the README's tables in place

Each table sits in the README between ``<!-- table NAME: bench/readme_tables.py -->``
and ``<!-- end of table NAME -->``, so a figure in them is never typed by hand:
a new benchmark run changes its results file, this script the README, and
``Testing/Python/test_readme.py`` fails until both agree.

- ``quality``: held-out figures of the shipped model families
  (``bench/heldout_table.py --json``, one file per family);
- ``speed``: one whole ``kneeboneseg segment`` of the sample scan per model,
  all in one run (``bench/bench_pipeline.py --segmentations-only --json``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODELS = ROOT / "Resources" / "Models"

#: The shipped model families, as the tables name them: (family, column title, held-out results file).
FAMILIES = (
    ("kneeboneseg-compact", "compact (default)", "heldout_compact.json"),
    ("kneeboneseg-slices", "2D network", "heldout_slices.json"),
)
#: The whole segmentations the speed table shows: results file, configuration, and the column of each family.
SPEED_RUN = ("pipeline_slices.json", "default", {"kneeboneseg-compact": "after", "kneeboneseg-slices": "other model"})
BONES = ("femur", "tibia", "patella")


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header, rows) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header)), *(_row(row) for row in rows)])


def _dice(scores: dict) -> str:
    """``all (femur, tibia, patella)`` Dice of one way of scoring."""
    per_bone = ", ".join(f"{scores[bone]['dice']:.4f}" for bone in BONES)
    return f"{scores['all']['dice']:.4f} ({per_bone})"


def quality_table(results: Path = RESULTS) -> str:
    """Held-out Dice, IoU and HD95 of each shipped family, both ways of stitching the folds."""
    heldout = {family: json.loads((results / name).read_text()) for family, _, name in FAMILIES}
    ways = (
        ("probabilities stitched", lambda figures: figures["heldout"]["default pipeline"]),
        ("each fold's own `segment` stitched", lambda figures: figures["segmentations_stitched"]),
    )
    rows = []
    for way, scores_of in ways:
        scores = [scores_of(heldout[family]) for family, _, _ in FAMILIES]
        rows.append([f"{way}: all-bone Dice (femur, tibia, patella)", *(_dice(score) for score in scores)])
        rows.append(
            [
                f"{way}: all-bone IoU, HD95",
                *(f"{score['all']['iou']:.4f}, {score['all']['hd95_mm']:.2f} mm" for score in scores),
            ]
        )
    return _table(["held out", *(title for _, title, _ in FAMILIES)], rows)


def speed_table(results: Path = RESULTS, models: Path = MODELS) -> str:
    """Wall time, the network's time, peak memory and file size of one whole segmentation per shipped model."""
    name, configuration, columns = SPEED_RUN
    runs = json.loads((results / name).read_text())[configuration]
    measured = [runs[columns[family]] for family, _, _ in FAMILIES]
    for (family, _, _), run in zip(FAMILIES, measured):
        if run["model"] != family:
            raise SystemExit(f"{name}: column {columns[family]!r} ran {run['model']}, not {family}")
    rows = [
        ["whole `segment`, with start-up", *(f"{run['wall_s']:.1f} s" for run in measured)],
        ["the network", *(f"{run['timings_s']['network']:.1f} s" for run in measured)],
        ["peak memory", *(f"{run['peak_memory_gib']:.2f} GiB" for run in measured)],
        ["engine, precision", *(f"{run['engine']['engine']}, {run['engine']['precision']}" for run in measured)],
        ["model file", *(f"{(models / f'{family}.onnx').stat().st_size / 1e6:.1f} MB" for family, _, _ in FAMILIES)],
    ]
    return _table(["sample scan, 512 × 512 × 286", *(title for _, title, _ in FAMILIES)], rows)


TABLES = {"quality": quality_table, "speed": speed_table}


def _markers(name: str) -> tuple:
    return f"<!-- table {name}: bench/readme_tables.py -->\n", f"\n<!-- end of table {name} -->"


def _pattern(name: str) -> re.Pattern:
    """A table between its markers; the table may be empty (markers just written)."""
    return re.compile(rf"<!-- table {name}: bench/readme_tables\.py -->\n(.*?)\n?<!-- end of table {name} -->", re.S)


def readme_tables(readme: str) -> dict:
    """The tables as they stand in a README's text; a missing table is absent from the result."""
    found = {name: _pattern(name).search(readme) for name in TABLES}
    return {name: match.group(1) for name, match in found.items() if match}


def updated(readme: str) -> str:
    """The README's text with every table as the results give it now."""
    for name, table in TABLES.items():
        start, end = _markers(name)
        readme, count = _pattern(name).subn(lambda match: start + table() + end, readme)
        if count != 1:
            raise SystemExit(f"the README must hold table {name} once between its markers; it holds it {count} times")
    return readme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--check", type=Path, metavar="README", help="exit 1 when this README's tables differ from the results"
    )
    action.add_argument("--update", type=Path, metavar="README", help="rewrite this README's tables from the results")
    args = parser.parse_args()
    if args.update:
        text = args.update.read_text(encoding="utf-8")
        args.update.write_text(updated(text), encoding="utf-8")
    elif args.check:
        standing = readme_tables(args.check.read_text(encoding="utf-8"))
        differing = [name for name, table in TABLES.items() if standing.get(name) != table()]
        if differing:
            sys.exit(
                f"{args.check}: table {', '.join(differing)} differs from bench/results (run bench/readme_tables.py --update {args.check})"
            )
    else:
        for name, table in TABLES.items():
            print(f"{name}:\n{table()}\n")


if __name__ == "__main__":
    main()
