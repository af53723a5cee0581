"""The sample scan in Slicer's Sample Data: registered at every start without heavy imports, loadable from a script.

``SampleData.downloadSample(name)`` ignores a source's ``customDownloader``: it
copies the source's URI into Slicer's cache with ``urllib.request.urlretrieve``
and loads the copy (3D Slicer 5.6.2, 5.8.1, 5.10.0,
``SampleDataLogic.downloadFile``). The tests take that same path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
from conftest import knee_phantom

from KneeBoneSegLib.io.dataset import DATASET_URL
from KneeBoneSegLib.io.images import read_volume, write_volume
from KneeBoneSegLib.slicer.sampledata import (
    SAMPLE_DIR_ENV,
    SAMPLE_FILES,
    assembled_folder,
    sample_data_source,
    sample_folder,
)
from KneeBoneSegLib.volume import Volume

ROOT = Path(__file__).resolve().parents[2]


def test_registering_the_sample_and_building_the_panel_import_nothing_heavy(tmp_path):
    """What the module runs at every Slicer start: the sample's registration and its parameter node's fields."""
    script = (
        "import json, os, sys\n"
        "from KneeBoneSegLib.slicer.sampledata import sample_data_source\n"
        "from KneeBoneSegLib.slicer.panel import panel_parameters\n"
        f"sample_data_source(os.environ, {str(tmp_path)!r}, 'icon.png'); panel_parameters()\n"
        "print(json.dumps(sorted(m for m in ('numpy', 'SimpleITK', 'scipy', 'vtk', 'slicer') if m in sys.modules)))\n"
    )
    found = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(found.stdout) == []


def _write_sample(folder: Path) -> np.ndarray:
    image, labels, geometry = knee_phantom(shape=(20, 24, 24))
    write_volume(Volume(image, geometry), folder / SAMPLE_FILES[0])
    write_volume(Volume(labels, geometry), folder / SAMPLE_FILES[1])
    return image


def test_sample_data_downloads_the_assembled_scan_never_the_archive(tmp_path):
    cache = tmp_path / "cache"
    source = sample_data_source({}, str(cache), "icon.png")
    assert source["uris"] == (assembled_folder(str(cache)) / SAMPLE_FILES[0]).as_uri() != DATASET_URL
    assert source["fileNames"].endswith(".nrrd") and source["sampleName"] == source["nodeNames"] == "KneeBones3Dify"
    assert sample_folder({}, str(cache)) is None

    # Once assembled, Sample Data's script path copies it into its cache and reads the scan.
    assembled = assembled_folder(str(cache))
    assembled.mkdir(parents=True)
    image = _write_sample(assembled)
    assert sample_folder({}, str(cache)) == assembled
    source = sample_data_source({}, str(cache), "icon.png")
    copy = tmp_path / "slicer-download-cache" / source["fileNames"]
    copy.parent.mkdir()
    urllib.request.urlretrieve(source["uris"], copy)
    np.testing.assert_array_equal(read_volume(copy).array, image)


def test_a_complete_sample_folder_in_the_environment_comes_first(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / SAMPLE_FILES[0]).write_bytes(b"")  # one file only: not a sample folder
    assert sample_folder({SAMPLE_DIR_ENV: str(own)}, str(tmp_path / "cache")) is None
    _write_sample(own)
    assert sample_folder({SAMPLE_DIR_ENV: str(own)}, str(tmp_path / "cache")) == own
    assert (
        sample_data_source({SAMPLE_DIR_ENV: str(own)}, str(tmp_path / "cache"), "icon.png")["uris"]
        == (own / SAMPLE_FILES[0]).as_uri()
    )
