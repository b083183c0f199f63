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
