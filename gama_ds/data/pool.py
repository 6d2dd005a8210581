"""Ordered parallel map over processes, or in-process when one worker is asked for."""

from __future__ import annotations

import multiprocessing
from contextlib import contextmanager


@contextmanager
def ordered_map(fn, items, workers: int, chunksize: int = 1, initializer=None):
    """Yield an iterator of fn(item) in input order.

    Workers are spawned, not forked: the parent may hold torch's thread pools, which a
    forked child can deadlock on.
    """
    if workers <= 1:
        if initializer is not None:
            initializer()
        yield map(fn, items)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=initializer) as pool:
        yield pool.imap(fn, items, chunksize=chunksize)
