"""Ordered parallel map over processes, or in-process when one worker is asked for."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def ordered_map(fn, items, workers: int, window: int | None = None, initializer=None):
    """Yield an iterator of fn(item) in input order.

    At most `window` items (default 4 per worker) are in flight, so results never pile up
    in memory when the consumer is slower than the workers. A worker that dies (a crashing
    decoder, the out-of-memory killer) raises BrokenProcessPool instead of hanging. Workers
    are spawned, not forked: the parent may hold torch's thread pools, which a forked child
    can deadlock on.
    """
    if workers <= 1:
        if initializer is not None:
            initializer()
        yield map(fn, items)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer) as pool:
        yield _windowed(pool, fn, iter(items), window or 4 * workers)


def _windowed(pool, fn, items, window: int):
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
