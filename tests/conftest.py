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


@pytest.fixture
def http_server():
    """A local HTTP server on 127.0.0.1 (tests/support/fake_http.FakeServer): plain files, and Google Drive's
    pages."""
    from tests.support.fake_http import FakeServer

    with FakeServer() as server:
        yield server


@pytest.fixture
def fake_drive(http_server, monkeypatch):
    """``http_server`` as Google Drive: every request gdown makes to a Google host lands on it."""
    from tests.support.fake_http import route_google_to

    route_google_to(monkeypatch, http_server.url)
    return http_server


@pytest.fixture(scope="session")
def official_r50() -> bytes:
    """A tiny file in the layout of CVPR2022_CVNet_R50.pyth (every value 0.25; loads strictly at depth 50)."""
    from tests.support.fake_http import official_checkpoint

    return official_checkpoint(50, fill=0.25)


@pytest.fixture(scope="session")
def official_r101() -> bytes:
    """A tiny file in the layout of CVPR2022_CVNet_R101.pyth (every value 0.5; loads strictly at depth 101)."""
    from tests.support.fake_http import official_checkpoint

    return official_checkpoint(101, fill=0.5)
