"""Where the benchmarks find the annotated sample scan (KNEEBONESEG_SAMPLE_DIR)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SAMPLE_ENV = "KNEEBONESEG_SAMPLE_DIR"


def sample_dir() -> Path:
    """The folder holding knee_mri.nrrd and knee_bones_labels.nrrd; exits with a clear message without it."""
    value = os.environ.get(SAMPLE_ENV)
    if not value or not (Path(value) / "knee_mri.nrrd").is_file():
        sys.exit(
            f"set {SAMPLE_ENV} to the folder holding knee_mri.nrrd and knee_bones_labels.nrrd (the KneeBones3Dify scan)"
        )
    return Path(value)
