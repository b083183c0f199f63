"""One distributed environment and one device resolver for training, evaluation, the CLIs and the benchmarks.

Multi-process runs use ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``): gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.errors import InvalidValueError

log = logging.getLogger(__name__)

#: What every ``device`` setting accepts.
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(InvalidValueError):
    """A device setting that is malformed or names hardware this machine lacks."""


def check_device_name(name: str) -> str:
    """``name`` when it is one of ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (no hardware check); else DeviceError."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise DeviceError(f"device must be one of {DEVICE_CHOICES}, got {name!r}")
    return name


def resolve_device(name: str = "auto", *, local_rank: int = 0, tf32: bool = False) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; ``cuda`` -> ``cuda:<local_rank>``;
    ``cuda:N`` and ``cpu`` as given. Asking for CUDA on a machine without it is a :class:`DeviceError`.

    A CUDA device also sets this process's TF32 policy (:func:`set_tf32`): off unless ``tf32``."""
    check_device_name(name)
    if name == "auto":
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    elif name == "cpu":
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available here (use cpu or auto)")
        device = torch.device(name)
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda":
        set_tf32(tf32)
    return device


def set_tf32(enabled: bool) -> None:
    """The project's TF32 policy, set here and nowhere else: float32 matrix products and cuDNN convolutions on
    Ampere and later GPUs round their inputs to TF32 (10-bit mantissa) only when ``enabled``. Off by default, so
    that float32 on a GPU means float32 (the descriptors agree with the CPU's within 1e-5); torch's own default
    leaves cuDNN convolutions in TF32. ``tf32: true`` (eval), ``train.tf32: true``, ``--tf32`` (the other
    scripts and the benchmarks) turn it on for speed. Both flags are set through the same (legacy) API: mixing
    it with ``fp32_precision`` makes torch refuse to read them."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def fits_on_device(nbytes: int, device: torch.device | str, *, share: float = 0.5) -> bool:
    """Whether ``nbytes`` may be copied to ``device`` (a GPU) at once: at most ``share`` of its free memory. A
    copy that does not fit is left in host memory and read block by block. False for the CPU (nothing to copy)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= share * free


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def rank_device_name(name: str, *, local_rank: int, world_size: int) -> str:
    """The device setting one rank of a torchrun job resolves: ``cuda:N`` names a single GPU, which every rank
    would share (NCCL then fails at the first collective), so under several ranks it becomes ``cuda`` (the
    rank's ``LOCAL_RANK`` GPU), with a warning when N is not that GPU. Every rank maps alike: none refuses
    while the others wait for it. Choose the GPUs of a job with ``CUDA_VISIBLE_DEVICES``."""
    if world_size <= 1 or not name.startswith("cuda:"):
        return name
    if int(name.split(":", 1)[1]) != local_rank:
        log.warning("device=%s under torchrun (%d ranks): each rank uses its LOCAL_RANK GPU, cuda:%d here "
                    "(choose the GPUs with CUDA_VISIBLE_DEVICES)", name, world_size, local_rank)
    return "cuda"


def init_distributed(device: str = "auto", timeout_s: float = 1800.0, *, tf32: bool = False) -> DistEnv:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else a single-process env.

    Backend: NCCL on CUDA, gloo on CPU. ``init_method="env://"`` reads ``MASTER_ADDR`` / ``MASTER_PORT``. Each
    rank takes its ``LOCAL_RANK`` GPU (:func:`rank_device_name`), made the current CUDA device (one process or
    several) so that kernels and NCCL's buffers never land on GPU 0 by default. ``tf32``: see :func:`set_tf32`.
    """
    rank, world_size, local_rank = launcher_ranks()
    check_device_name(device)
    dev = resolve_device(rank_device_name(device, local_rank=local_rank, world_size=world_size),
                         local_rank=local_rank, tf32=tf32)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1:
        if not dist.is_initialized():
            from datetime import timedelta

            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=timeout_s))
        log.info("distributed: rank %d of %d on %s (%s)", rank, world_size, dev, dist.get_backend())
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """torch.distributed barrier when a process group is initialised (torchrun); a no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_cat(tensor: Tensor, env: DistEnv) -> Tensor:
    """Concatenate ``tensor`` (n_r, ...) of every rank along dim 0, in rank order; ranks may differ in n_r.

    Used to feed the momentum queue with the keys of all ranks (every rank then holds the same queue). No
    gradient flows through the result.
    """
    if not env.distributed:
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(env.world_size)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    if longest == 0:
        return tensor
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


def all_reduce_mean(values: Mapping[str, float], env: DistEnv) -> dict[str, float]:
    """Average scalar metrics over ranks (for logging)."""
    if not env.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device(env))
    dist.all_reduce(t)
    return {k: float(v) / env.world_size for k, v in zip(keys, t.tolist())}


def nonfinite_ranks(value: Tensor, env: DistEnv) -> list[int]:
    """The ranks whose ``value`` (e.g. this step's loss) holds a NaN or an infinity, the same list on every rank.

    A collective every rank joins, so that a bad loss stops all of them at the same step: one rank raising alone
    would leave the others waiting in DDP's gradient all-reduce until the process group's timeout."""
    bad = not bool(torch.isfinite(value.detach()).all())
    if not env.distributed:
        return [env.rank] if bad else []
    flags = torch.zeros(env.world_size, dtype=torch.int32, device=_collective_device(env))
    flags[env.rank] = int(bad)
    dist.all_reduce(flags)
    return torch.nonzero(flags).flatten().tolist()


def _group_ready(env: DistEnv) -> bool:
    """Whether ``env`` is one rank of an initialised process group (a rank simulated without one is alone)."""
    return env.distributed and dist.is_available() and dist.is_initialized()


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """The picklable ``obj`` of every rank, in rank order, on every rank; ``[obj]`` outside a process group."""
    if not _group_ready(env):
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv, *, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (what the others pass is ignored); ``obj`` itself outside a
    process group."""
    if not _group_ready(env):
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def split_evenly(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Items ``0..len(sizes)-1`` (item i weighing ``sizes[i]`` >= 0) cut into ``world_size`` contiguous blocks of
    about equal weight, one per rank: item i goes to the rank whose share of the total holds its midpoint, so no
    block is heavier than its share by more than about one item. A rank may get nothing (fewer items than ranks)."""
    if world_size < 1:
        raise InvalidValueError(f"world_size must be >= 1, got {world_size}")
    if any(s < 0 for s in sizes):
        raise InvalidValueError("item sizes must be >= 0")
    total = sum(sizes)
    blocks: list[list[int]] = [[] for _ in range(world_size)]
    start = 0
    for i, size in enumerate(sizes):
        # integer arithmetic: the same blocks on every rank and machine
        rank = 0 if total == 0 else min((2 * start + size) * world_size // (2 * total), world_size - 1)
        blocks[rank].append(i)
        start += size
    return blocks


def _collective_device(env: DistEnv) -> torch.device:
    return env.device if env.device.type == "cuda" else torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def parameters_checksum(model: nn.Module) -> float:
    """Sum of all parameters in float64: equal across ranks when they are in sync.

    Buffers are left out: each rank's last forward pass updates its own BatchNorm statistics (DDP re-broadcasts
    rank 0's at the next forward).
    """
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in unwrap(model).parameters()))
