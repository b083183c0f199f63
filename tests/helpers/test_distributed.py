"""helpers.distributed: one device resolver (auto, cpu, cuda, cuda:N everywhere) and the single-process env."""
import pytest
import torch

from helpers.distributed import (
    DeviceError,
    DistEnv,
    all_gather_cat,
    all_reduce_mean,
    check_device_name,
    init_distributed,
    launcher_ranks,
    resolve_device,
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
