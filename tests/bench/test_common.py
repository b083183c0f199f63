"""The benchmarks' shared set-up: the one device resolver, the dtype rule, quick images the models accept."""
from __future__ import annotations

import argparse

import pytest
import torch

from bench.common import add_common_args, autocast, fast_dtype, machine_info, setup_process


def _args(*argv: str) -> argparse.Namespace:
    """Options that leave the process as it is (threads, huge pages, denormals): only the device is under test."""
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    return parser.parse_args(["--no-thp", "--no-ftz", "--threads", str(torch.get_num_threads()), *argv])


def test_device_is_resolved_by_helpers_distributed():
    assert setup_process(_args("--device", "cpu")) == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert setup_process(_args("--device", "auto")) == expected
    with pytest.raises(SystemExit, match="auto, cpu, cuda or cuda:N"):
        setup_process(_args("--device", "gpu"))
    with pytest.raises(SystemExit, match="cuda:99"):
        setup_process(_args("--device", "cuda:99"))  # no CUDA here, or not 100 devices


def test_half_precision_is_a_cuda_option():
    assert fast_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(SystemExit, match="CUDA option"):
        fast_dtype("bfloat16", torch.device("cpu"))


def test_quick_images_are_large_enough_for_regional_gem():
    """--quick scales the images by 1/8; the retrieval pipeline's min_side guard lifts the 683-pixel side's 85
    back to 96, over the 92 that leave a 3x3 stage-4 map at scale 0.7071."""
    from bench.extract import make_images
    from helpers.retrieval.images import DEFAULT_MIN_SIDE

    images = make_images(4, seed=0, scale=0.125)
    assert min(min(im.shape[:2]) for im in images) == DEFAULT_MIN_SIDE >= 92
    assert [im.shape[:2] for im in make_images(4, seed=0)] == [(768, 1024), (1024, 768), (768, 1024), (683, 1024)]


def test_tf32_option_sets_the_policy_when_a_gpu_is_resolved(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert setup_process(_args("--device", "cuda", "--tf32")) == torch.device("cuda", 0)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        setup_process(_args("--device", "cuda"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        info = machine_info(torch.device("cuda", 0))
        assert info["gpu"] == "Fake GPU" and info["tf32"] is False  # the figures say which arithmetic made them
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_autocast_is_on_for_half_dtypes_only():
    x = torch.randn(4, 4)
    for dtype in (torch.bfloat16, torch.float16):
        with autocast(torch.device("cpu"), dtype):
            assert (x @ x).dtype == dtype
    with autocast(torch.device("cpu"), torch.float32):
        assert (x @ x).dtype == torch.float32
