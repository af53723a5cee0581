"""The sample scan in 3D Slicer's Sample Data module, decided without Qt or the Slicer application.

The module registers the scan at every Slicer start, so this imports the
standard library alone (a test holds it to that). Sample Data loads a sample
in two ways: its button calls the source's ``customDownloader``, while
``SampleData.downloadSample(name)`` from a script ignores it and copies the
source's ``uris`` into its cache as ``fileNames``, then loads that file (3D
Slicer 5.6.2, 5.8.1 and 5.10.0, ``SampleDataLogic.downloadFromSource``). So the
source's URI is always the assembled NRRD's own ``file://`` URI, never the
dataset's archive, which Sample Data would try to load as a volume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

from ..io.dataset import IMAGE_FILE, LABELS_FILE

SAMPLE_NAME = "KneeBones3Dify"
#: The scan and its ground truth, as ``kneeboneseg sample`` writes them.
SAMPLE_FILES = (IMAGE_FILE, LABELS_FILE)
#: The environment variable naming a folder that already holds :data:`SAMPLE_FILES`.
SAMPLE_DIR_ENV = "KNEEBONESEG_SAMPLE_DIR"


def assembled_folder(cache_folder: str) -> Path:
    """Where the module assembles the public dataset: a folder in Slicer's cache."""
    return Path(cache_folder) / "KneeBoneSeg" / SAMPLE_NAME


def sample_folder(environ: Mapping[str, str], cache_folder: str) -> Optional[Path]:
    """The folder holding both sample files: :data:`SAMPLE_DIR_ENV`'s, else the assembled one; None where neither has them."""
    for folder in (environ.get(SAMPLE_DIR_ENV), assembled_folder(cache_folder)):
        if folder and all(Path(folder, name).is_file() for name in SAMPLE_FILES):
            return Path(folder)
    return None


def sample_data_source(environ: Mapping[str, str], cache_folder: str, thumbnail: str) -> dict:
    """The arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for the sample scan, but its ``customDownloader``.

    The URI is the scan in :func:`sample_folder`, or where the module
    assembles it, so ``SampleData.downloadSample`` loads it once it is there.
    The cached copy's name carries the sample's name: Slicer's download
    cache is shared by every extension.
    """
    folder = sample_folder(environ, cache_folder) or assembled_folder(cache_folder)
    return {
        "category": "KneeBoneSeg",
        "sampleName": SAMPLE_NAME,
        "thumbnailFileName": thumbnail,
        "uris": Path(os.path.abspath(folder / IMAGE_FILE)).as_uri(),
        "fileNames": f"{SAMPLE_NAME}-{IMAGE_FILE}",
        "nodeNames": SAMPLE_NAME,
    }
