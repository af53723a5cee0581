"""What KneeBoneSeg needs in 3D Slicer's Python, for each supported Slicer: the one place for these versions.

Two readers: the Slicer module's first-use install (which packages to add,
and whether those already there are recent enough) and the CI jobs in
``.ci/slicer_python.sh``, which rebuild each supported Slicer's Python from
:data:`SLICER_RELEASES` and add exactly what the first-use install adds::

    python -m KneeBoneSegLib.slicer.environment shipped 5.8    # numpy==1.26.4 ...
    python -m KneeBoneSegLib.slicer.environment first-use      # for the running Python

Slicer 5.6 and 5.8 run Python 3.9, 5.10 runs 3.12; the versions of the
packages Slicer ships come from its SuperBuild files (``External_python-numpy``,
``External_python-scipy``, ``External_SimpleITK``) at each release tag.
Slicer also ships its own build of VTK (9.2 in 5.6 and 5.8, 9.5 in 5.10),
which the worker uses for the bones' surfaces; a CI stand-in gets the PyPI
release closest to it (``vtk``), or, where ``slicer-core`` installs (Python
3.10 on), the VTK that slicer-core was built with. This module imports nothing beyond the
standard library, so it runs in any Slicer before anything is installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

#: Newest first. ``shipped``: packages in Slicer's Python (distribution name: version);
#: ``vtk``: the PyPI release of VTK closest to the VTK that Slicer builds itself.
SLICER_RELEASES = {
    "5.10": {"python": "3.12", "shipped": {"numpy": "2.0.2", "scipy": "1.13.1", "SimpleITK": "2.5.2"}, "vtk": "9.5.2"},
    "5.8": {"python": "3.9", "shipped": {"numpy": "1.26.4", "scipy": "1.13.1", "SimpleITK": "2.3.1"}, "vtk": "9.2.6"},
    "5.6": {"python": "3.9", "shipped": {"numpy": "1.26.1", "scipy": "1.11.3", "SimpleITK": "2.2.1"}, "vtk": "9.2.6"},
}

#: Packages Slicer ships that the install must never replace (a constraints file holds them).
SLICER_OWNED = ("numpy", "scipy", "SimpleITK", "vtk")


@dataclass(frozen=True)
class Requirement:
    """A package the first use installs.

    ``minimum``: the oldest version the library works with (as in
    ``pyproject.toml``'s dependencies); an older one already in Slicer's
    Python is reported, not used. ``pins``: what is
    installed, by the oldest Python it is for (newest first), with its download
    in MB: its wheel and those of the packages it pulls in that Slicer does not
    ship (onnxruntime brings sympy), on the platform
    where they are largest, rounded up (``bench/bench_slicer_first_use.py``,
    ``bench/results/slicer_first_use.txt``).
    """

    distribution: str
    import_name: str
    minimum: str
    pins: Tuple[Tuple[str, str, int], ...]  # (from Python, version, download MB)
    why: str

    def pin_for(self, python: Tuple[int, int]) -> Tuple[str, int]:
        """The (version, download MB) installed on Python ``python`` (major, minor)."""
        for from_python, pinned, megabytes in self.pins:
            if python >= version_tuple(from_python):
                return pinned, megabytes
        raise ValueError(f"{self.distribution}: no pinned version for Python {python[0]}.{python[1]}")


FIRST_USE = (
    Requirement(
        "onnxruntime",
        "onnxruntime",
        "1.16",
        (("3.10", "1.23.2", 27), ("3.9", "1.19.2", 25)),
        "runs the network; 1.19.2 is the last release for Python 3.9, 1.23.2 the last with Intel-Mac wheels",
    ),
    Requirement(
        "edt", "edt", "3.1", (("3.9", "3.1.2", 3),), "exact multi-threaded distance transforms for the closing"
    ),
    Requirement(
        "fill-voids", "fill_voids", "2.1", (("3.9", "2.1.2", 3),), "fills the holes inside each bone (with fastremap)"
    ),
    Requirement(
        "connected-components-3d", "cc3d", "4.1", (("3.9", "4.1.1", 5),), "labels the bone mask's connected components"
    ),
    Requirement("slicerio", "slicerio", "1.1", (("3.9", "1.4.0", 1),), "writes the .seg.nrrd file"),
    Requirement("tqdm", "tqdm", "4.60", (("3.9", "4.70.1", 1),), "progress of the command line"),
)


def version_tuple(text: str) -> Tuple[int, ...]:
    """The release numbers at the start of a version string: ``"1.26.4rc1"`` -> ``(1, 26, 4)``."""
    match = re.match(r"\d+(\.\d+)*", text.strip())
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def running_python() -> Tuple[int, int]:
    return sys.version_info[:2]


def first_use_requirements(python: Optional[Tuple[int, int]] = None) -> List[str]:
    """``name==version`` of every package the first use installs on ``python`` (default: this one)."""
    python = python or running_python()
    return [f"{requirement.distribution}=={requirement.pin_for(python)[0]}" for requirement in FIRST_USE]


def shipped_requirements(slicer_version: str) -> List[str]:
    """``name==version`` of the packages Slicer ``slicer_version`` ships, for a CI stand-in of its Python."""
    if slicer_version not in SLICER_RELEASES:
        raise ValueError(f"Slicer {slicer_version} is not supported; supported: {', '.join(SLICER_RELEASES)}")
    return [f"{name}=={version}" for name, version in SLICER_RELEASES[slicer_version]["shipped"].items()]


def installed_version(distribution: str, path: Optional[List[str]] = None) -> Optional[str]:
    """The installed version of ``distribution`` (searched on ``path``, default ``sys.path``), or None."""
    wanted = _normalised(distribution)
    for found in metadata.distributions(path=path) if path is not None else metadata.distributions():
        if _normalised(found.metadata["Name"] or "") == wanted:
            return found.version
    return None


def requirement_problems(path: Optional[List[str]] = None) -> Dict[str, str]:
    """What is wrong with the first-use packages in a Python: ``{distribution: problem}``.

    Empty when every package is there at a version the library works with.
    A package is a problem when it is missing or older than its
    :attr:`Requirement.minimum` (e.g. an old slicerio another extension
    installed); the message says which version is there and which is needed.

    Parameters
    ----------
    path : list of str, optional
        Folders to look for installed packages in (default ``sys.path``).
    """
    problems = {}
    for requirement in FIRST_USE:
        found = installed_version(requirement.distribution, path)
        if found is None:
            problems[requirement.distribution] = "not installed"
        elif version_tuple(found) < version_tuple(requirement.minimum):
            problems[requirement.distribution] = (
                f"{found} is installed; KneeBoneSeg needs {requirement.minimum} or later"
            )
    return problems


def install_plan(problems: Dict[str, str], python: Optional[Tuple[int, int]] = None) -> Tuple[List[str], int]:
    """The ``name==version`` to install for ``problems`` and their download size in MB."""
    python = python or running_python()
    pins, megabytes = [], 0
    for requirement in FIRST_USE:
        if requirement.distribution in problems:
            pinned, size = requirement.pin_for(python)
            pins.append(f"{requirement.distribution}=={pinned}")
            megabytes += size
    return pins, megabytes


@dataclass(frozen=True)
class RequirementsOutcome:
    """How :func:`ensure_requirements` ended: whether KneeBoneSeg can run now, and what to tell the user."""

    ready: bool
    status: str = ""  #: the panel's status line ("" leaves it as it is)
    error: Optional[str] = None  #: a message for an error dialog


def ensure_requirements(
    confirm: Callable[[str], bool],
    install: Callable[[List[str]], None],
    installing: Callable[[Optional[str]], None],
    problems: Callable[[], Dict[str, str]] = requirement_problems,
) -> RequirementsOutcome:
    """Offer to install the missing or too old first-use packages, and install them if the user agrees.

    The module's panel passes its dialogs and Slicer's ``pip_install`` in:

    Parameters
    ----------
    confirm : callable
        ``confirm(question)``: True when the user agrees to the install.
    install : callable
        ``install(pins)``: installs ``name==version`` pins; may raise.
    installing : callable
        ``installing(message)`` before the install starts (the panel locks
        everything that starts work and shows ``message``) and
        ``installing(None)`` once it has ended, failed or not.
    problems : callable
        What is wrong now (:func:`requirement_problems`); asked again after
        the install, since a package Slicer already imported stays old until
        Slicer restarts.
    """
    found = problems()
    if not found:
        return RequirementsOutcome(ready=True)
    pins, megabytes = install_plan(found)
    details = "\n".join(f"{name}: {problem}" for name, problem in found.items())
    question = (
        f"KneeBoneSeg needs these Python packages in Slicer's Python:\n\n{details}\n\n"
        f"Install {', '.join(pins)} now (about {megabytes} MB to download)?"
    )
    if not confirm(question):
        return RequirementsOutcome(
            ready=False, status="The packages were not installed; KneeBoneSeg cannot run without them."
        )
    installing(f"Installing {', '.join(pins)}...")
    try:
        install(pins)
    except Exception as error:  # pip's failures are many and all end the same way: say so, keep Slicer running
        log.exception("Installing %s failed", pins)
        return RequirementsOutcome(
            ready=False,
            status="Installing the Python packages failed.",
            error=f"Installing {', '.join(pins)} failed: {error}\n\nCheck the internet connection; details are in the Python console.",
        )
    finally:
        installing(None)
    remaining = problems()
    if remaining:
        seen = "; ".join(f"{name}: {problem}" for name, problem in remaining.items())
        return RequirementsOutcome(
            ready=False,
            status="Restart Slicer to use the newly installed packages.",
            error=f"The packages were installed, but Slicer still sees {seen}. Restart Slicer, then press Segment again.",
        )
    return RequirementsOutcome(ready=True, status="Packages installed.")


def slicer_owned_constraints(path: Optional[List[str]] = None) -> List[str]:
    """``name==version`` holding Slicer's own packages where they are during an install."""
    constraints = []
    for distribution in SLICER_OWNED:
        found = installed_version(distribution, path)
        if found is not None:
            constraints.append(f"{distribution}=={found}")
    return constraints


def python_slicer_executable(interpreter: str = sys.executable) -> str:
    """Slicer's own Python launcher (``PythonSlicer``, which sets up Slicer's libraries) on the PATH or beside
    ``interpreter``; a one-line ``RuntimeError`` where there is none."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    found = shutil.which(name) or os.path.join(os.path.dirname(interpreter), name)
    if not os.path.isfile(found):
        raise RuntimeError(f"{name} was not found beside Slicer ({found}); reinstall Slicer")
    return found


@contextlib.contextmanager
def constrained_install(pins: Sequence[str], path: Optional[List[str]] = None) -> Iterator[List[str]]:
    """``pip install`` arguments for ``pins`` that hold Slicer's own packages where they are.

    A constraints file (valid inside the ``with`` block) pins numpy, scipy,
    SimpleITK and VTK to the installed versions (:func:`slicer_owned_constraints`),
    so pip fails with a message rather than replace them.
    """
    with tempfile.TemporaryDirectory(prefix="kneeboneseg-install-") as folder:
        constraints = os.path.join(folder, "slicer-constraints.txt")
        with open(constraints, "w", encoding="utf-8") as stream:
            stream.write("\n".join(slicer_owned_constraints(path)) + "\n")
        yield [*pins, "--constraint", constraints]


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: Optional[List[str]] = None) -> int:
    """``shipped <Slicer version>``, ``vtk <Slicer version>``, ``python <Slicer version>`` or ``first-use``: print one requirement a line (for CI)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shipped"] and len(argv) == 2:
        lines = shipped_requirements(argv[1])
    elif argv == ["first-use"]:
        lines = first_use_requirements()
    elif argv[:1] == ["python"] and len(argv) == 2:
        lines = [SLICER_RELEASES[argv[1]]["python"]]
    elif argv[:1] == ["vtk"] and len(argv) == 2:
        lines = [f"vtk=={SLICER_RELEASES[argv[1]]['vtk']}"]
    else:
        print(
            "usage: python -m KneeBoneSegLib.slicer.environment {shipped VERSION | vtk VERSION | python VERSION | first-use}",
            file=sys.stderr,
        )
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
