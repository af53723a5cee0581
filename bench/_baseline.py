"""The library as it was before the post-network speed-ups, for side-by-side benchmarks.

The benchmarks time today's stages against the ones they replaced, in the
same run, on the same data. The old code is not kept in the library: it is
taken from git at :data:`BASELINE_COMMIT` (the last commit before the
speed-ups: scipy distance transforms and hole filling, scikit-image marching
cubes, ``ndimage.zoom`` resampling, TensorFlow for the network) into a
temporary folder, and imported from there under another package name.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "aeaaac8641693d84b52ffecdd3b327f1b7948159"
BASELINE_PACKAGE = "kneeboneseg_before"


@functools.cache
def baseline_tree() -> Path:
    """A folder holding ``KneeBoneSegLib`` and the shipped Keras model as they were at :data:`BASELINE_COMMIT`."""
    return _from_git(
        BASELINE_COMMIT,
        ["KneeBoneSegLib", "Resources/Models/kneeboneseg-compact.keras", "Resources/Models/kneeboneseg-compact.json"],
    )


def _from_git(commit: str, paths: list[str]) -> Path:
    """A temporary folder (removed at exit) holding ``paths`` as they were at ``commit``."""
    folder = Path(tempfile.mkdtemp(prefix="kneeboneseg-before-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, *paths], check=True, capture_output=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        sys.exit(f"cannot take {paths[0]} from git commit {commit[:10]} (a clone with its history is needed): {error}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def baseline_module(name: str):
    """``KneeBoneSegLib.<name>`` as it was at :data:`BASELINE_COMMIT`, imported as ``kneeboneseg_before.<name>``."""
    if BASELINE_PACKAGE not in sys.modules:
        package = baseline_tree() / "KneeBoneSegLib"
        spec = importlib.util.spec_from_file_location(
            BASELINE_PACKAGE, package / "__init__.py", submodule_search_locations=[str(package)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[BASELINE_PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{BASELINE_PACKAGE}.{name}")
