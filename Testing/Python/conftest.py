"""Shared fixtures. The annotated sample scan is found through KNEEBONESEG_SAMPLE_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SAMPLE_ENV = "KNEEBONESEG_SAMPLE_DIR"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The folder holding knee_mri.nrrd, knee_bones_labels.nrrd and dicom_subset/."""
    value = os.environ.get(SAMPLE_ENV)
    if not value:
        pytest.skip(f"{SAMPLE_ENV} is not set: the annotated sample scan is not available on this machine")
    path = Path(value)
    if not (path / "knee_mri.nrrd").is_file():
        pytest.skip(f"{SAMPLE_ENV}={path} does not hold knee_mri.nrrd")
    return path


@pytest.fixture(scope="session")
def sample_labels(sample_dir):
    """The ground-truth label map of the sample scan as a Volume (1 femur, 2 tibia, 3 patella)."""
    from KneeBoneSegLib.io import read_volume

    return read_volume(sample_dir / "knee_bones_labels.nrrd")


@pytest.fixture
def rng():
    return np.random.default_rng(20251124)
