"""Percentile normalisation straight from a scan's integers: the values of the float32 arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from KneeBoneSegLib.preprocess.normalization import normalize_intensities


@pytest.mark.parametrize("spec", [None, {"method": "minmax"}, {"method": "percentile", "low": 2, "high": 98}])
def test_an_integer_scan_normalises_exactly_as_its_float32_copy(rng, spec):
    scan = rng.integers(0, 4096, (21, 30, 33)).astype(np.uint16)
    as_float = scan.astype(np.float32)
    out = normalize_intensities(scan, spec)
    assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_array_equal(out, normalize_intensities(as_float, spec))
    if spec is None:
        low, high = np.percentile(as_float[::3, ::3, ::3], [0.5, 99.5])
        expected = np.clip((as_float - np.float32(low)) / np.float32(high - low), 0, 1)
        np.testing.assert_array_equal(out, expected)
