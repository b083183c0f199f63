"""bench.rerank_superglobal measures the library's re-ranking on the device it is given (the release's loop, its
baseline, stays on the CPU), and agrees with the loop there."""
from __future__ import annotations

import pytest
import torch

import bench.rerank_superglobal as bench_sg
from helpers.builders import make_database
from tests.support.spies import header_device, recording

_TINY = ["--no-thp", "--db-sizes", "300", "--dim", "16", "--nq", "4", "--M", "20", "--K", "3", "--repeats", "1",
         "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_database_and_the_header_follow_the_device(monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(bench_sg, "make_database", recording(calls, make_database))
    assert bench_sg.main(["--device", "cpu", "--no-ftz", *_TINY]) == 0
    assert [c["device"] for c in calls] == [torch.device("cpu")]
    assert "FAIL" not in capsys.readouterr().out
    assert header_device(monkeypatch, bench_sg, ["--quick"]) == torch.device("cuda", 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_re_ranking_agrees_with_the_cpu_loop(capsys):
    assert bench_sg.main(["--device", "cuda", "--no-ftz", *_TINY]) == 0
    assert "cuda" in capsys.readouterr().out
