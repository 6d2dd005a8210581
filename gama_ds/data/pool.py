"""Ordered parallel map over processes, or in-process when one worker is asked for."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from contextlib import contextmanager


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def ordered_map(fn, items, workers: int, window: int | None = None, initializer=None):
    """Yield an iterator of fn(item) in input order.

    At most `window` items (default 4 per worker) are in flight, so results never pile up
    in memory when the consumer is slower than the workers. Workers are spawned, not
    forked: the parent may hold torch's thread pools, which a forked child can deadlock on.
    """
    if workers <= 1:
        if initializer is not None:
            initializer()
        yield map(fn, items)
        return
    window = window or 4 * workers
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=initializer) as pool:
        yield _windowed(pool, fn, iter(items), window)


def _windowed(pool, fn, items, window: int):
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
