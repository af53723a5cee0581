"""What the Slicer module's first use installs, and how it checks what is already there.

The install itself runs in CI (``.ci/slicer_python.sh``): a virtual
environment per supported Slicer, with the Python and the numpy, scipy,
and SimpleITK versions that Slicer ships, plus exactly
:func:`first_use_requirements`. There ``KNEEBONESEG_SLICER`` names the Slicer
version, and the last test checks the environment is what it claims to be.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from KneeBoneSegLib.slicer.environment import (
    FIRST_USE,
    SLICER_RELEASES,
    ensure_requirements,
    first_use_requirements,
    install_plan,
    installed_version,
    main,
    requirement_problems,
    shipped_requirements,
    version_tuple,
)


def _installed(folder, distribution, version):
    """A package's metadata as pip leaves it in site-packages."""
    info = folder / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")


def test_supported_slicers_and_their_pythons():
    assert {version: release["python"] for version, release in SLICER_RELEASES.items()} == {
        "5.6": "3.9",
        "5.8": "3.9",
        "5.10": "3.12",
    }
    for release in SLICER_RELEASES.values():
        assert set(release["shipped"]) == {"numpy", "scipy", "SimpleITK"}


@pytest.mark.parametrize("slicer_version", sorted(SLICER_RELEASES))
def test_first_use_installs_the_onnx_runtime_not_tensorflow(slicer_version):
    python = version_tuple(SLICER_RELEASES[slicer_version]["python"])
    requirements = first_use_requirements(python)
    names = {requirement.split("==")[0].lower() for requirement in requirements}
    assert names == {"onnxruntime", "edt", "fill-voids", "connected-components-3d", "slicerio", "tqdm"}
    assert not names & {"tensorflow", "tensorflow-cpu", "keras", "torch", "jax", "scikit-image"}
    assert not names & {name.lower() for name in SLICER_RELEASES[slicer_version]["shipped"]}, (
        "never replace what Slicer ships"
    )
    pins, megabytes = install_plan(dict.fromkeys(names, "not installed"), python)
    assert sorted(pins) == sorted(requirements) and 20 < megabytes < 60


def test_python_39_gets_the_last_releases_that_support_it():
    on_39 = dict(requirement.split("==") for requirement in first_use_requirements((3, 9)))
    on_312 = dict(requirement.split("==") for requirement in first_use_requirements((3, 12)))
    # onnxruntime 1.20 needs Python 3.10.
    assert version_tuple(on_39["onnxruntime"]) < (1, 20) <= version_tuple(on_312["onnxruntime"])


def test_problems_name_missing_and_too_old_packages(tmp_path):
    site = tmp_path / "site-packages"
    _installed(site, "slicerio", "1.0.0")  # as another extension may have left it
    for name, version in (
        ("edt", "3.1.2"),
        ("fill-voids", "2.1.2"),
        ("connected-components-3d", "4.1.1"),
        ("tqdm", "4.66.1"),
    ):
        _installed(site, name, version)
    problems = requirement_problems([str(site)])
    assert problems == {
        "onnxruntime": "not installed",
        "slicerio": "1.0.0 is installed; KneeBoneSeg needs 1.1 or later",
    }
    pins, _ = install_plan(problems, (3, 9))
    assert [pin.split("==")[0] for pin in pins] == ["onnxruntime", "slicerio"]

    _installed(site, "onnxruntime", "1.19.2")
    (site / "slicerio-1.0.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: slicerio\nVersion: 1.4.0\n"
    )
    assert requirement_problems([str(site)]) == {}
    assert installed_version("SlicerIO", [str(site)]) == "1.4.0"


class _Panel:
    """The module panel's side of a first-use install: its answer to the question, and what it shows."""

    def __init__(self, site, agrees=True, pip_fails=False):
        self.site, self.agrees, self.pip_fails = site, agrees, pip_fails
        self.questions, self.installed, self.shown = [], [], []
        self.locked = False

    def confirm(self, question):
        self.questions.append(question)
        return self.agrees

    def install(self, pins):
        """``pip install`` into the panel's site folder; the panel must be locked meanwhile."""
        assert self.locked, "Segment must be locked while packages install"
        if self.pip_fails:
            raise OSError("network unreachable")
        for pin in pins:
            name, version = pin.split("==")
            for old in self.site.glob(f"{name.replace('-', '_')}-*.dist-info"):  # pip replaces an older release
                shutil.rmtree(old)
            _installed(self.site, name, version)
            self.installed.append(pin)

    def installing(self, message):
        self.locked = message is not None
        self.shown.append(message)

    def problems(self):
        return requirement_problems([str(self.site)])


def test_a_complete_python_asks_nothing(tmp_path):
    panel = _Panel(tmp_path)
    for requirement in FIRST_USE:
        _installed(tmp_path, requirement.distribution, requirement.minimum)
    outcome = ensure_requirements(panel.confirm, panel.install, panel.installing, panel.problems)
    assert outcome.ready and not panel.questions and not panel.shown


def test_first_use_asks_then_installs_what_is_missing_with_the_panel_locked(tmp_path):
    panel = _Panel(tmp_path)
    _installed(tmp_path, "slicerio", "1.0.0")  # too old, as another extension may have left it
    outcome = ensure_requirements(panel.confirm, panel.install, panel.installing, panel.problems)
    assert outcome.ready and outcome.status == "Packages installed." and outcome.error is None
    (question,) = panel.questions
    assert "onnxruntime: not installed" in question and "slicerio: 1.0.0 is installed" in question and "MB" in question
    assert {pin.split("==")[0] for pin in panel.installed} == set(requirement_problems([str(tmp_path / "nothing")]))
    assert panel.shown[0].startswith("Installing ") and panel.shown[-1] is None and not panel.locked
    assert panel.problems() == {}


def test_a_declined_or_failed_install_leaves_the_panel_unlocked_and_says_why(tmp_path):
    declined = _Panel(tmp_path / "declined", agrees=False)
    outcome = ensure_requirements(declined.confirm, declined.install, declined.installing, declined.problems)
    assert not outcome.ready and "not installed" in outcome.status and not declined.installed and not declined.shown

    failing = _Panel(tmp_path / "failing", pip_fails=True)
    outcome = ensure_requirements(failing.confirm, failing.install, failing.installing, failing.problems)
    assert not outcome.ready and "network unreachable" in outcome.error and "internet connection" in outcome.error
    assert failing.shown[-1] is None and not failing.locked


def test_packages_slicer_still_sees_as_old_ask_for_a_restart(tmp_path):
    panel = _Panel(tmp_path)
    panel.install = lambda pins: None  # pip ran, but the packages Slicer sees are still the old ones
    outcome = ensure_requirements(panel.confirm, panel.install, panel.installing, panel.problems)
    assert not outcome.ready and "Restart Slicer" in outcome.status and "onnxruntime: not installed" in outcome.error


def test_ci_reads_the_versions_from_here(capsys):
    assert main(["shipped", "5.8"]) == 0
    assert capsys.readouterr().out.split() == shipped_requirements("5.8")
    assert main(["python", "5.10"]) == 0
    assert capsys.readouterr().out.strip() == "3.12"
    assert main(["first-use"]) == 0
    assert capsys.readouterr().out.split() == first_use_requirements()
    with pytest.raises(ValueError, match="not supported"):
        shipped_requirements("5.2")


@pytest.mark.skipif(
    "KNEEBONESEG_SLICER" not in os.environ, reason="only in CI's stand-ins for Slicer's Python (.ci/slicer_python.sh)"
)
def test_this_environment_is_the_slicer_it_stands_in_for():
    release = SLICER_RELEASES[os.environ["KNEEBONESEG_SLICER"]]
    assert sys.version_info[:2] == version_tuple(release["python"])
    for distribution, version in release["shipped"].items():
        assert installed_version(distribution) == version, distribution
    assert requirement_problems() == {}
    for requirement in FIRST_USE:
        assert installed_version(requirement.distribution) == requirement.pin_for(sys.version_info[:2])[0]


def test_minimum_versions_are_the_packages_dependencies():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    dependencies = dict(
        re.findall(
            r'^\s*"([A-Za-z0-9_.-]+)>=([0-9.]+)",?$', text.split("dependencies = [", 1)[1].split("]", 1)[0], re.M
        )
    )
    for requirement in FIRST_USE:
        assert dependencies[requirement.distribution] == requirement.minimum, requirement.distribution


def test_the_module_files_import_before_the_first_use_install():
    """The Slicer module loads its library files at Slicer's start, before the first use installs its packages,
    and Sample Data's button runs the command line (``kneeboneseg sample``) then too."""
    import subprocess

    from KneeBoneSegLib.slicer.environment import FIRST_USE

    absent = [requirement.import_name for requirement in FIRST_USE]
    modules = ["cli", "slicer.logic", "slicer.environment", "slicer.gui", "slicer.sampledata", "slicer.worker"] + (
        ["slicer.mrml"] if _has_mrml() else []
    )
    code = f"import sys\nfor name in {absent!r}: sys.modules[name] = None\n" + "".join(
        f"import KneeBoneSegLib.{name}\n" for name in modules
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr.strip().splitlines()[-1]


def _has_mrml() -> bool:
    import importlib.util

    return importlib.util.find_spec("slicer") is not None


def test_slicers_python_launcher_is_found_beside_its_interpreter_or_refused_in_one_line(tmp_path, monkeypatch):
    from KneeBoneSegLib.slicer.environment import python_slicer_executable

    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    launcher = tmp_path / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    launcher.write_text("")
    assert python_slicer_executable(str(tmp_path / "python-real")) == str(launcher)
    with pytest.raises(RuntimeError, match="was not found beside Slicer .*; reinstall Slicer"):
        python_slicer_executable(str(tmp_path / "other" / "python-real"))


def test_the_first_use_install_holds_slicers_own_packages_where_they_are():
    from pathlib import Path

    from KneeBoneSegLib.slicer.environment import constrained_install, slicer_owned_constraints

    with constrained_install(["edt==3.1.2"]) as arguments:
        assert arguments[:2] == ["edt==3.1.2", "--constraint"]
        held = Path(arguments[2]).read_text(encoding="utf-8").split()
        assert held == slicer_owned_constraints() and any(line.startswith("numpy==") for line in held)
    assert not Path(arguments[2]).exists(), "the constraints file goes with the install"
