"""Shared pytest fixtures: seeded RNGs and a small thread count so the suite is deterministic on 2 cores."""
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole module (its module-scoped fixtures included): on a 2-core machine shared with
    other test runs, OpenMP threads spinning against each other cost 10-100x. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
