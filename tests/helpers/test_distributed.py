"""helpers.distributed: one device resolver (auto, cpu, cuda, cuda:N everywhere), the single-process env, the
GPU policy (TF32 off unless asked, each torchrun rank on its LOCAL_RANK GPU made current) and a non-finite loss
seen by every rank."""
import logging
import sys

import pytest
import torch
import torch.distributed as dist

from helpers.distributed import (
    DeviceError,
    DistEnv,
    all_gather_cat,
    all_gather_objects,
    all_reduce_mean,
    broadcast_object,
    check_device_name,
    fits_on_device,
    init_distributed,
    launcher_ranks,
    nonfinite_ranks,
    rank_device_name,
    resolve_device,
    set_tf32,
    split_evenly,
)
from tests.support.launch import run_two_cpu_ranks


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_accepted_names(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "CPU", "cuda:", "cuda:x", "", "mps", 3])
def test_rejected_names(name):
    with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
        check_device_name(name)


def test_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", local_rank=3) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device(name)


def test_cuda_names_pick_the_local_rank_or_the_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("auto", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:3", local_rank=1) == torch.device("cuda", 3)
    with pytest.raises(DeviceError, match="4 CUDA device"):
        resolve_device("cuda:4")


def test_launcher_ranks_and_single_process_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launcher_ranks() == (0, 1, 0)
    env = init_distributed("cpu")
    assert env == DistEnv() and env.is_main and not env.distributed
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launcher_ranks() == (3, 4, 1)


def test_collectives_are_identities_in_one_process():
    env = DistEnv()
    x = torch.randn(3, 2, requires_grad=True)
    y = all_gather_cat(x, env)
    assert torch.equal(y, x.detach()) and not y.requires_grad
    assert all_reduce_mean({"loss": 2.5}, env) == {"loss": 2.5}


# ------------------------------------------------------------------------------------------------ GPU policy


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with 4 GPUs as far as the resolver can tell (torch.cuda's answers patched; nothing runs on them),
    with the TF32 flags restored afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_tf32_is_off_on_a_gpu_unless_asked(fake_cuda):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # e.g. torch's cuDNN default
    resolve_device("cuda")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    resolve_device("cuda:1", tf32=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    set_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_tf32_flags_are_left_alone_on_the_cpu(monkeypatch):
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", tf32=True) == torch.device("cpu")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


def _launch(monkeypatch, rank: int, world: int) -> list:
    """torchrun's variables for one rank, a process group that is never joined, and the set_device calls."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    calls: list = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    return calls


def test_cuda_n_under_torchrun_maps_every_rank_to_its_local_gpu(fake_cuda, monkeypatch, caplog):
    for rank in (0, 1):
        calls = _launch(monkeypatch, rank, 2)
        with caplog.at_level(logging.WARNING, logger="helpers.distributed"):
            caplog.clear()
            env = init_distributed("cuda:1")
        assert env.device == torch.device("cuda", rank) and env.world_size == 2
        assert calls == [("set_device", torch.device("cuda", rank)), ("init", "nccl")]
        assert ("LOCAL_RANK" in caplog.text) == (rank != 1)  # said where cuda:1 is not the rank's own GPU
    assert rank_device_name("cuda:3", local_rank=0, world_size=1) == "cuda:3"  # one process: as given
    assert rank_device_name("auto", local_rank=1, world_size=2) == "auto"


def test_the_gpu_is_made_current_in_a_single_process_too(fake_cuda, monkeypatch):
    calls = _launch(monkeypatch, 0, 1)
    env = init_distributed("cuda:2")
    assert env.device == torch.device("cuda", 2) and not env.distributed
    assert calls == [("set_device", torch.device("cuda", 2))]  # no process group for one process


def test_fits_on_device_leaves_half_the_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))
    assert fits_on_device(4 << 30, "cuda:0") and not fits_on_device((4 << 30) + 1, "cuda:0")
    assert not fits_on_device(1, "cpu")  # nothing is copied to the CPU


# ------------------------------------------------------------------------------------------------ non-finite loss


def test_nonfinite_ranks_in_one_process():
    env = DistEnv()
    assert nonfinite_ranks(torch.tensor(1.5), env) == []
    assert nonfinite_ranks(torch.tensor(float("nan")), env) == [0]
    assert nonfinite_ranks(torch.tensor([1.0, float("inf")]), env) == [0]


_TWO_RANKS = """
import sys, torch
from helpers.distributed import init_distributed, nonfinite_ranks, cleanup_distributed
env = init_distributed("cpu")
loss = torch.tensor(float("nan") if env.rank == 1 else 0.25)
bad = nonfinite_ranks(loss, env)
cleanup_distributed(env)
sys.exit(0 if bad == [1] else 3)
"""


def test_a_nan_on_one_rank_is_seen_by_every_rank():
    """Rank 1's loss is NaN: both ranks learn it from the same collective (gloo), so both stop at that step
    instead of rank 0 waiting in DDP's all-reduce for a rank that raised."""
    run_two_cpu_ranks([sys.executable, "-c", _TWO_RANKS], timeout=120)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_init_distributed_on_cuda_makes_the_gpu_current(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        last = torch.cuda.device_count() - 1
        env = init_distributed(f"cuda:{last}")
        assert env.device == torch.device("cuda", last) and torch.cuda.current_device() == last
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        x = torch.randn(256, 256, device=env.device)  # float32 on the GPU is float32: no TF32 rounding
        torch.testing.assert_close((x @ x).cpu(), x.cpu() @ x.cpu(), rtol=1e-5, atol=1e-4)
    finally:
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    # a rank of a larger job simulated without a process group is alone: its own object comes back
    rank1 = DistEnv(rank=1, world_size=2)
    assert all_gather_objects({"a": 1}, rank1) == [{"a": 1}] and broadcast_object([3], rank1) == [3]


@pytest.mark.parametrize("sizes, world_size", [([1] * 7, 2), ([1] * 10, 3), ([5, 1, 1, 1, 1, 1], 2),
                                               ([3, 0, 4, 2, 2, 9, 1], 4), ([1, 1], 5), ([0, 0, 0], 2), ([], 3)])
def test_split_evenly_gives_contiguous_blocks_of_about_equal_weight(sizes, world_size):
    blocks = split_evenly(sizes, world_size)
    assert len(blocks) == world_size
    assert [i for block in blocks for i in block] == list(range(len(sizes)))  # contiguous, in order, each once
    total, largest = sum(sizes), max(sizes, default=0)
    for block in blocks:  # no block heavier than its share by more than one item
        assert sum(sizes[i] for i in block) <= total / world_size + largest
    assert split_evenly(sizes, world_size) == blocks  # a pure function: every rank computes the same plan


def test_split_evenly_examples_and_errors():
    assert split_evenly([1] * 7, 2) == [[0, 1, 2], [3, 4, 5, 6]]  # sizes that do not divide
    assert split_evenly([2, 2, 2, 1], 2) == [[0, 1], [2, 3]]  # 4 vs 3 images
    assert split_evenly([1], 3) == [[], [0], []]  # fewer items than ranks: the others get nothing
    assert split_evenly([1, 1], 1) == [[0, 1]]
    with pytest.raises(ValueError, match="world_size"):
        split_evenly([1], 0)
    with pytest.raises(ValueError, match=">= 0"):
        split_evenly([1, -1], 2)
