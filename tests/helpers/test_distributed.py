"""helpers.distributed: one device resolver (auto, cpu, cuda, cuda:N everywhere) and the single-process env."""
import pytest
import torch

from helpers.distributed import (
    DeviceError,
    DistEnv,
    all_gather_cat,
    all_gather_objects,
    all_reduce_mean,
    broadcast_object,
    check_device_name,
    init_distributed,
    launcher_ranks,
    resolve_device,
    split_evenly,
)


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
