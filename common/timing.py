"""Wall time of named stages: one context manager for eval's stage table, the Retriever's per-query timings and
the demo's stage table."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator


@contextlib.contextmanager
def timed(timings: dict[str, float] | None, name: str, *, logger: logging.Logger | None = None) -> Iterator[None]:
    """Add the seconds the block took to ``timings[name]`` (summed over repeated stages of one name; nothing is
    measured when ``timings`` is None), and log them to ``logger`` if given. The time counts even when the block
    raises."""
    if timings is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        timings[name] = timings.get(name, 0.0) + elapsed
        if logger is not None:
            logger.info("stage %-40s %7.1f s", name, elapsed)
