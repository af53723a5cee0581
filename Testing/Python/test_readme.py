"""The README is short and true: its tables come from bench/results, its command line from --help."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from KneeBoneSegLib.cli import build_parser
from KneeBoneSegLib.network.models import SHIPPED_MODEL

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def readme_tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "bench" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


def test_readme_tables_are_the_ones_the_benchmark_results_give(readme_tables, readme):
    standing = readme_tables.readme_tables(readme)
    assert set(standing) == set(readme_tables.TABLES), "the README lacks a generated table's markers"
    for name, table in readme_tables.TABLES.items():
        assert standing[name] == table(), (
            f"README table {name} is stale: run python bench/readme_tables.py --update README.md"
        )


def test_readme_tables_follow_the_results_files(readme_tables, readme, tmp_path):
    shutil.copytree(readme_tables.RESULTS, tmp_path, dirs_exist_ok=True)
    heldout = json.loads((tmp_path / "heldout_compact.json").read_text())
    heldout["heldout"]["default pipeline"]["all"]["dice"] = 0.12345
    (tmp_path / "heldout_compact.json").write_text(json.dumps(heldout))
    table = readme_tables.quality_table(tmp_path)
    assert "0.1235 (" in table and table != readme_tables.quality_table()
    # The default model's column is the shipped model's family.
    assert readme_tables.FAMILIES[0][0] == Path(SHIPPED_MODEL).stem and "default" in readme_tables.FAMILIES[0][1]

    stale = readme.replace(readme_tables.readme_tables(readme)["speed"], "| an old | table |")
    assert readme_tables.readme_tables(readme_tables.updated(stale)) == readme_tables.readme_tables(readme)


def test_each_shipped_card_holds_the_held_out_figures_the_readme_shows(readme_tables):
    """``kneeboneseg info`` reads a model's card; its figures are the README's, from the same results file."""
    from KneeBoneSegLib.network.models import read_card

    for family, _, results in readme_tables.FAMILIES:
        measured = json.loads((readme_tables.RESULTS / results).read_text())
        card = read_card(readme_tables.MODELS / f"{family}.onnx")
        carded = card.quality["heldout"]
        default_row = measured["variants"][0][0]
        for bone, figures in measured["heldout"][default_row].items():
            assert carded["metrics"][bone]["dice"] == round(figures["dice"], 4), (
                f"{family} card, {bone}: run heldout_table.py --held-out-from --write-card"
            )


def _subcommands():
    (subparsers,) = [action for action in build_parser()._actions if action.choices and action.dest == "command"]
    return subparsers.choices


def test_readme_shows_every_option_of_the_command_line(readme):
    (block,) = [
        block for block in re.findall(r"```bash\n(.*?)```", readme, re.S) if "kneeboneseg segment INPUT" in block
    ]
    for name, parser in _subcommands().items():
        assert f"kneeboneseg {name} " in block, f"the README's command line lacks kneeboneseg {name}"
        for action in parser._actions:
            long_options = [
                option for option in action.option_strings if option.startswith("--") and option != "--help"
            ]
            if long_options and not any(
                re.search(rf"{re.escape(option)}\b", block) for option in action.option_strings
            ):
                pytest.fail(f"the README's command line lacks {name} {long_options[0]}")


def test_readme_is_short_and_its_links_exist(readme):
    assert len(readme.splitlines()) <= 250, "the README's main page stays under about 250 lines: move detail to docs/"
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert (ROOT / link).exists(), f"the README links to {link}, which does not exist"


def test_ci_runs_the_readme_test_line_as_written(readme):
    """.ci/run finds the README's test line the way it does in CI, and gets that line, relative sample/ and all."""
    (first_block,) = re.findall(r"```bash\n(.*?)```", readme, re.S)[:1]
    test_lines = [line for line in first_block.splitlines() if line.endswith("# run the tests")]
    assert len(test_lines) == 1, "the README's first block has one line ending '# run the tests', which .ci/run runs"
    assert "KNEEBONESEG_SAMPLE_DIR=sample/ " in test_lines[0], "the test line uses the sample/ the line above writes"
    extraction = re.search(r'^TEST_LINE="\$\((.*)\)"$', (ROOT / ".ci" / "run").read_text(), re.M)
    assert extraction, ".ci/run sets TEST_LINE from the README"
    found = subprocess.run(["bash", "-c", extraction.group(1)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == test_lines[0].removesuffix("# run the tests").strip()
