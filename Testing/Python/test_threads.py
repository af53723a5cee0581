"""The thread count of a run: all cores unless told, scoped to the run, honoured by the stages."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from KneeBoneSegLib.postprocess.morphology import close_bones
from KneeBoneSegLib.preprocess.normalization import normalize_intensities
from KneeBoneSegLib.preprocess.resampling import resample_to_shape
from KneeBoneSegLib.threads import available_cores, effective_threads, split_ranges, thread_count, using_threads


def test_a_run_uses_all_cores_unless_told_and_the_setting_ends_with_the_run():
    assert thread_count() == effective_threads(None) == available_cores() >= 1
    with using_threads(3) as count:
        assert count == thread_count() == 3
        with using_threads(1):
            assert thread_count() == 1
        assert thread_count() == 3
    assert thread_count() == available_cores()
    with pytest.raises(ValueError, match="at least 1"):
        effective_threads(0)


def test_each_thread_of_a_process_keeps_its_own_setting():
    seen = {}

    def run(count):
        with using_threads(count):
            barrier.wait()  # both runs are inside their settings at once
            seen[count] = thread_count()

    barrier = threading.Barrier(2)
    workers = [threading.Thread(target=run, args=(n,)) for n in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert seen == {1: 1, 2: 2}


@pytest.mark.parametrize("length,parts", [(10, 3), (2, 5), (7, 1), (0, 2)])
def test_split_ranges_cover_every_index_once(length, parts):
    slabs = split_ranges(length, parts)
    assert len(slabs) <= parts and all(s.stop > s.start for s in slabs)
    np.testing.assert_array_equal(np.concatenate([np.arange(length)[s] for s in slabs] or [[]]), np.arange(length))


def test_stages_give_the_same_result_on_any_number_of_threads(rng):
    image = rng.random((23, 30, 17)).astype(np.float32)
    scan = rng.integers(0, 4096, (23, 30, 17), dtype=np.uint16)
    mask = rng.random((30, 28, 26)) < 0.02
    labels = (rng.random((30, 28, 26)) < 0.05) * rng.integers(1, 4, (30, 28, 26), dtype=np.uint8)
    with using_threads(1):
        resampled, closed = resample_to_shape(image, (11, 41, 9)), close_bones(mask.astype(np.uint8), 3)
        normalised, closed_bones = normalize_intensities(scan), close_bones(labels, 2)
    for count in (2, 5):
        with using_threads(count):
            np.testing.assert_array_equal(resample_to_shape(image, (11, 41, 9)), resampled)
            np.testing.assert_array_equal(close_bones(mask.astype(np.uint8), 3), closed)
            np.testing.assert_array_equal(normalize_intensities(scan), normalised)
            np.testing.assert_array_equal(close_bones(labels, 2), closed_bones)
