"""common.timing.timed: one stage timer for eval, the Retriever and the demo."""
from __future__ import annotations

import logging
import time

import pytest

from common.timing import timed


def test_stages_of_one_name_add_up_and_count_when_the_block_raises():
    timings: dict[str, float] = {}
    for _ in range(2):
        with timed(timings, "search"):
            time.sleep(0.01)
    assert timings["search"] >= 0.02
    with pytest.raises(RuntimeError):
        with timed(timings, "failing"):
            time.sleep(0.005)
            raise RuntimeError("boom")
    assert timings["failing"] >= 0.005 and list(timings) == ["search", "failing"]


def test_none_measures_nothing_and_the_logger_gets_each_stage(caplog):
    with timed(None, "x"):
        pass
    log = logging.getLogger("test.timing")
    timings: dict[str, float] = {}
    with caplog.at_level(logging.INFO, logger="test.timing"), timed(timings, "extract", logger=log):
        pass
    assert "stage extract" in caplog.text and set(timings) == {"extract"}
