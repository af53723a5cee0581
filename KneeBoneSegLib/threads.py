"""How many CPU threads a run may use, in one place every stage asks.

A run uses every core the process may run on unless it is told otherwise
(``SegmentOptions.threads``, ``kneeboneseg segment --threads``, the Slicer
module's worker). :func:`using_threads` sets the count for the duration of a
run; the stages read it with :func:`thread_count` and pass it to their
libraries (the ``edt`` package, VTK's SMP tools, SimpleITK, the network's
engine) or split their own work over that many threads. The setting is a
context variable, so two runs in two threads of one process (the Slicer
application) each keep their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

_requested: contextvars.ContextVar[int | None] = contextvars.ContextVar("kneeboneseg_threads", default=None)


def available_cores() -> int:
    """The number of CPU cores this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def effective_threads(requested: int | None = None) -> int:
    """The thread count a run asking for ``requested`` threads gets: that many, or all cores for ``None``.

    Raises
    ------
    ValueError
        For a count below 1.
    """
    if requested is None:
        return available_cores()
    if int(requested) < 1:
        raise ValueError(f"threads must be at least 1, not {requested}")
    return int(requested)


def thread_count() -> int:
    """Threads the current run may use: the count set by :func:`using_threads`, else all cores."""
    value = _requested.get()
    return available_cores() if value is None else value


@contextlib.contextmanager
def using_threads(requested: int | None = None) -> Iterator[int]:
    """Let the code inside the ``with`` block use ``effective_threads(requested)`` threads; yields that count."""
    count = effective_threads(requested)
    token = _requested.set(count)
    try:
        yield count
    finally:
        _requested.reset(token)


def split_ranges(length: int, parts: int) -> list[slice]:
    """``length`` indices as at most ``parts`` contiguous, non-empty slices of near-equal size."""
    bounds = [round(n * length / parts) for n in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def in_slabs(function: Callable[[tuple[slice, ...]], None], shape, axis: int = 0) -> None:
    """``function(slab)`` for slabs of an array of ``shape`` cut across ``axis``, one per thread of the run.

    ``slab`` indexes the array (all of every other axis). The function should
    spend its time in code that releases the GIL (numpy's arithmetic, scipy's
    filters), so that the threads run at once.
    """
    slabs = [(slice(None),) * axis + (part,) for part in split_ranges(shape[axis], thread_count())]
    if len(slabs) <= 1:
        for slab in slabs:
            function(slab)
        return
    with ThreadPoolExecutor(len(slabs)) as pool:
        list(pool.map(function, slabs))
