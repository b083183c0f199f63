"""The loop pieces both training scripts share: distributed setup, resumable data order, RNG capture, atomic
training checkpoints, corrupt-image accounting, JSONL metrics and the step loop itself.

Crash safety rests on one rule: everything a step consumes is a pure function of saved state. The data of a step
comes from (seed, epoch, position) through :class:`ResumableDistributedSampler` and datasets that draw their
randomness from ``numpy.random.default_rng([seed, epoch, index])``; DataLoader workers get their seeds from a
generator seeded by (seed, epoch), never from the global torch RNG; and every piece of mutable training state
(model, key encoder, queue, optimizer, scheduler, AMP scaler, RNG states, corrupt-image tally, step) goes into one
atomically written file. A run killed at any point and resumed from that file therefore replays exactly the steps
the uninterrupted run would have taken.

Multi-process runs use ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``): gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from tqdm import tqdm

from datasets.folder import CorruptImageError
from common.io import atomic_torch_save, atomic_write
from helpers.distributed import (  # noqa: F401  (re-exported while the loop moves)
    DistEnv,
    all_gather_cat,
    all_gather_objects,
    all_reduce_mean,
    cleanup_distributed,
    init_distributed,
    parameters_checksum,
    resolve_device,
    unwrap,
)

log = logging.getLogger(__name__)

TRAIN_STATE_NAME = "train_state.pth"
METRICS_NAME = "metrics.jsonl"
TRAIN_STATE_FORMAT = "cvnet-train-state-v1"


# --------------------------------------------------------------------------------------------------------------
# Seeds, determinism and RNG state
# --------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_runtime(*, threads: int | None = None, deterministic: bool = False) -> None:
    """CPU thread count and deterministic kernels (exact replays on CPU; slower cuDNN choices on GPU)."""
    if threads:
        torch.set_num_threads(int(threads))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        # cuBLAS needs this for deterministic GEMMs; harmless elsewhere
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and python RNG states as tensors and builtins.

    The form survives ``torch.load(weights_only=True)`` (no numpy arrays, no pickled objects).
    """
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


# --------------------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------------------


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (``set_start``): the resumed order is the original.

    The permutation of an epoch depends only on (seed, epoch); rank r takes positions r, r + W, r + 2W, ... of it,
    so the samples of global step s are positions [s * B, (s + 1) * B) of the permutation whatever the number of
    ranks W (B the global batch).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's share of the current epoch."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


# --------------------------------------------------------------------------------------------------------------
# Learning-rate schedule and optimizer
# --------------------------------------------------------------------------------------------------------------


def lr_factor(step: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              final_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from 1/warmup to 1 over ``warmup_steps``, then ``"cosine"`` decay to ``final_ratio``,
    ``"linear"`` decay to ``final_ratio``, or ``"constant"``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "cosine":
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return final_ratio + (1.0 - final_ratio) * (1.0 - t)
    raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")


class _StepSchedule:
    """A picklable ``LambdaLR`` multiplier (the scheduler's state then holds only its step counter)."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def __call__(self, step: int) -> float:
        return lr_factor(step, **self.kwargs)


def build_optimizer(params: Sequence[nn.Parameter] | Sequence[dict], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``cfg``: name (sgd | adam | adamw), lr, momentum, weight_decay, nesterov, betas."""
    name = str(cfg.get("name", "sgd")).lower()
    lr = float(cfg["lr"])
    wd = float(cfg.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum", 0.9)), weight_decay=wd,
                               nesterov=bool(cfg.get("nesterov", False)))
    betas = tuple(cfg.get("betas", (0.9, 0.999)))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    raise ValueError(f"optim.name must be sgd, adam or adamw, got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any],
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR over :func:`lr_factor`; ``cfg``: name, warmup_steps, final_ratio."""
    fn = _StepSchedule(total_steps=total_steps, warmup_steps=int(cfg.get("warmup_steps", 0)),
                       schedule=str(cfg.get("name", "cosine")), final_ratio=float(cfg.get("final_ratio", 0.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# --------------------------------------------------------------------------------------------------------------
# Corrupt images
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorruptSample:
    """What a dataset item became when its image (or its positive's) could not be decoded."""

    index: int
    path: str
    reason: str


class SkipCorrupt(Dataset):
    """Wrap a dataset: an item raising :class:`datasets.folder.CorruptImageError` becomes a CorruptSample.

    Pair with :func:`collate_skip_corrupt`, which drops those items from the batch and reports them, so that the
    count is exact whatever the number of DataLoader workers. ``set_epoch`` is forwarded.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except CorruptImageError as err:
            return CorruptSample(int(index), err.path, str(err))


@dataclass
class Batch:
    """A collated batch without its corrupt items, and the corrupt items it lost."""

    data: Any
    corrupt: list[CorruptSample]
    size: int


def collate_skip_corrupt(items: list[Any]) -> Batch:
    good = [it for it in items if not isinstance(it, CorruptSample)]
    bad = [it for it in items if isinstance(it, CorruptSample)]
    return Batch(default_collate(good) if good else None, bad, len(good))


class TooManyCorruptImages(RuntimeError):
    """More distinct corrupt images than ``data.max_corrupt``: the run stops."""


class CorruptTally:
    """Distinct corrupt image paths seen so far (and how many items were skipped); enforces the ceiling."""

    def __init__(self, max_corrupt: int | None) -> None:
        self.max_corrupt = max_corrupt
        self.paths: set[str] = set()
        self.skipped = 0

    def add(self, samples: Sequence[CorruptSample]) -> list[str]:
        new = []
        for s in samples:
            self.skipped += 1
            if s.path not in self.paths:
                self.paths.add(s.path)
                new.append(s.path)
                log.warning("skipping corrupt training image %s (%s)", s.path, s.reason)
        if self.max_corrupt is not None and len(self.paths) > self.max_corrupt:
            raise TooManyCorruptImages(
                f"{len(self.paths)} corrupt training images (ceiling data.max_corrupt={self.max_corrupt}); "
                f"first ones: {sorted(self.paths)[:5]}. Re-download or remove them, or raise data.max_corrupt."
            )
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"paths": sorted(self.paths), "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.paths = set(state.get("paths", []))
        self.skipped = int(state.get("skipped", 0))


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and metrics
# --------------------------------------------------------------------------------------------------------------


def save_train_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Atomically write a training checkpoint (tensors and builtins only: it reloads with weights_only=True)."""
    atomic_torch_save({"format": TRAIN_STATE_FORMAT, **state}, path)


def load_train_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint to resume from at {path} (start without --resume)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of this project (format {TRAIN_STATE_FORMAT})")
    return state


class JsonlLog:
    """Append-only JSON-lines metrics file; on resume, lines past the resumed step are dropped first."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by the crash
                if rec.get("step", 0) <= resume_step or rec.get("event") == "resume":
                    kept.append(line)
            self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record), sort_keys=False) + "\n")
            f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of a metrics file."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# --------------------------------------------------------------------------------------------------------------
# The step loop
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoopConfig:
    """What the shared loop needs; see the ``train:`` section of the configs."""

    out_dir: Path
    batch_size: int  # global, over all ranks
    total_steps: int | None = None  # None: epochs * steps_per_epoch
    epochs: int | None = None
    checkpoint_every: int = 500
    log_every: int = 10
    num_workers: int = 4
    seed: int = 0
    max_corrupt: int | None = 100
    fixed_batch: bool = False  # debugging: train on the first batch over and over
    progress: bool = True
    desc: str = "train"


@dataclass
class LoopResult:
    steps: int
    corrupt_images: int
    corrupt_skipped: int
    last_metrics: dict[str, float]
    seconds: float


def steps_per_epoch(n_items: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps in one epoch: every rank drops its last incomplete batch."""
    per_rank = batch_size // world_size
    return math.ceil(n_items / world_size) // per_rank


def resolve_total_steps(cfg: LoopConfig, n_items: int, world_size: int) -> int:
    spe = steps_per_epoch(n_items, cfg.batch_size, world_size)
    if spe < 1:
        raise ValueError(f"{n_items} training items give no complete batch of {cfg.batch_size} "
                         f"over {world_size} rank(s): lower train.batch_size")
    if cfg.total_steps:
        return int(cfg.total_steps)
    if not cfg.epochs:
        raise ValueError("set train.steps or train.epochs")
    return int(cfg.epochs) * spe


def run_loop(
    *,
    dataset: Dataset,
    env: DistEnv,
    cfg: LoopConfig,
    step_fn: Callable[[Any, int], Mapping[str, float]],
    get_state: Callable[[], dict[str, Any]],
    set_state: Callable[[Mapping[str, Any]], None],
    on_checkpoint: Callable[[int], None] | None = None,
    resume: bool = False,
    extra_log: Mapping[str, Any] | None = None,
) -> LoopResult:
    """Drive ``step_fn(batch_data, step) -> metrics`` for ``cfg.total_steps`` optimizer steps.

    Handles the data order (resumable, distributed), skipped corrupt items, tqdm progress (loss and images/s),
    JSONL metrics (main rank), atomic checkpoints every ``cfg.checkpoint_every`` steps and at the end
    (``get_state()`` is the task's state, ``set_state`` restores it on ``resume``), and calls
    ``on_checkpoint(step)`` on the main rank after each checkpoint (e.g. to write official-layout weights).
    """
    if cfg.batch_size % env.world_size:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be divisible by the number of ranks "
                         f"({env.world_size})")
    per_rank = cfg.batch_size // env.world_size
    data = SkipCorrupt(dataset)
    sampler = ResumableDistributedSampler(data, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                          seed=cfg.seed)
    spe = steps_per_epoch(len(data), cfg.batch_size, env.world_size)
    total = resolve_total_steps(cfg, len(data), env.world_size)
    state_path = cfg.out_dir / TRAIN_STATE_NAME
    tally = CorruptTally(cfg.max_corrupt)

    step = 0
    if resume:
        state = load_train_state(state_path)
        set_state(state["task"])
        step = int(state["step"])
        tally.load_state_dict(state.get("corrupt", {}))
        rngs = state["rng"]
        if len(rngs) == env.world_size:
            restore_rng_state(rngs[env.rank])
        else:
            log.warning("resuming %d-rank state on %d ranks: RNG states re-seeded", len(rngs), env.world_size)
            seed_everything(cfg.seed + 1000 * step + env.rank)
        if int(state.get("total_steps", total)) != total:
            log.warning("the checkpoint was made for %s steps, this run has %d", state.get("total_steps"), total)
        if env.is_main:
            log.info("resumed from %s at step %d of %d", state_path, step, total)
    logger = JsonlLog(cfg.out_dir / METRICS_NAME, enabled=env.is_main, resume_step=step if resume else None)
    if resume:
        logger.write({"event": "resume", "step": step})
    else:
        logger.write({"event": "start", "step": 0, "total_steps": total, "steps_per_epoch": spe,
                      "world_size": env.world_size, "batch_size": cfg.batch_size, **(extra_log or {})})

    def save(at_step: int) -> None:
        rngs = all_gather_objects(capture_rng_state(), env)
        task = get_state()  # every rank: the task may gather inside
        if env.is_main:
            save_train_state(state_path, {"step": at_step, "total_steps": total, "task": task, "rng": rngs,
                                          "corrupt": tally.state_dict(), "world_size": env.world_size,
                                          "data_order": {"seed": cfg.seed, "epoch": at_step // spe,
                                                         "position": (at_step % spe) * cfg.batch_size}})
            if on_checkpoint is not None:
                on_checkpoint(at_step)
            logger.write({"event": "checkpoint", "step": at_step, "path": str(state_path)})
        if env.distributed:
            dist.barrier()

    def batches_from(epoch: int, start_step_in_epoch: int) -> Iterator[Batch]:
        data.set_epoch(epoch)
        sampler.set_epoch(epoch)
        sampler.set_start(start_step_in_epoch * per_rank)
        # worker seeds from (seed, epoch, rank), not from the global RNG a resume would shift
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + env.rank)
        loader = DataLoader(data, batch_size=per_rank, sampler=sampler, num_workers=cfg.num_workers,
                            collate_fn=collate_skip_corrupt, drop_last=True, generator=gen,
                            pin_memory=env.device.type == "cuda", persistent_workers=False)
        yield from loader

    bar = tqdm(total=total, initial=step, desc=cfg.desc, disable=not (cfg.progress and env.is_main),
               dynamic_ncols=True)
    t_start = time.time()
    window_t, window_n = time.time(), 0
    last: dict[str, float] = {}
    fixed: Batch | None = None
    iterator: Iterator[Batch] | None = None
    epoch = step // spe
    try:
        while step < total:
            if cfg.fixed_batch:
                if fixed is None:
                    fixed = next(iter(batches_from(0, 0)))
                batch = fixed
            else:
                if iterator is None:
                    iterator = batches_from(epoch, step % spe)
                try:
                    batch = next(iterator)
                except StopIteration:
                    epoch += 1
                    iterator = batches_from(epoch, 0)
                    continue
            shared = all_gather_objects((batch.corrupt, batch.data is None), env)
            corrupt = [c for lost, _ in shared for c in lost]
            if corrupt:
                tally.add(corrupt)
            if any(empty for _, empty in shared):
                # a rank lost its whole batch: every rank skips this step together (collectives stay matched)
                log.warning("step %d skipped: a whole batch was corrupt", step)
                metrics = {}
            else:
                metrics = dict(step_fn(batch.data, step))
            step += 1
            window_n += batch.size
            bar.update(1)
            if metrics:
                last = metrics
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr")}
                                | {"img/s": f"{window_n * env.world_size / max(time.time() - window_t, 1e-9):.1f}"},
                                refresh=False)
            if step % cfg.log_every == 0 or step == total:
                logged = all_reduce_mean(metrics, env)
                elapsed = time.time() - window_t
                logger.write({"step": step, "epoch": (step - 1) // spe, **logged,
                              "images_per_s": window_n * env.world_size / max(elapsed, 1e-9),
                              "corrupt_images": len(tally.paths), "corrupt_skipped": tally.skipped})
                window_t, window_n = time.time(), 0
            if step % cfg.checkpoint_every == 0 or step == total:
                save(step)
    finally:
        bar.close()
    seconds = time.time() - t_start
    logger.write({"event": "end", "step": step, "seconds": round(seconds, 2), "corrupt_images": len(tally.paths),
                  "corrupt_skipped": tally.skipped})
    if tally.paths and env.is_main:
        log.warning("%d corrupt training images were skipped (%d items): %s", len(tally.paths), tally.skipped,
                    ", ".join(sorted(tally.paths)[:10]))
    return LoopResult(steps=step, corrupt_images=len(tally.paths), corrupt_skipped=tally.skipped,
                      last_metrics=last, seconds=seconds)


def dump_summary(path: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    """A small JSON summary next to the run's outputs (written atomically)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(dict(summary), indent=2) + "\n"))


def finish_run(
    *, stage: str, result: LoopResult, env: DistEnv, trained: nn.Module, out_dir: Path,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The end of a training script: check the ranks agree on ``trained``'s parameters, write
    ``summary.json`` and log the outcome (main rank). Returns the summary on every rank."""
    checksums = all_gather_objects(parameters_checksum(trained), env)
    summary = {"stage": stage, "steps": result.steps, "seconds": round(result.seconds, 1),
               "final": result.last_metrics, "corrupt_images": result.corrupt_images,
               "corrupt_skipped": result.corrupt_skipped, "world_size": env.world_size,
               "ranks_in_sync": len(set(checksums)) == 1, **(extra or {}),
               "checkpoint": str(out_dir / "last.pyth")}
    if env.is_main:
        dump_summary(out_dir / "summary.json", summary)
        log.info("done: %d steps in %.0f s, final loss %.4f; %d corrupt images skipped; weights %s",
                 result.steps, result.seconds, result.last_metrics.get("loss", float("nan")),
                 result.corrupt_images, out_dir / "last.pyth")
    return summary


# --------------------------------------------------------------------------------------------------------------
# Training data from a config
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LabelledData:
    """A training set of ``(uint8 BGR image, label)`` items with contiguous labels 0..C-1."""

    dataset: Dataset
    labels: np.ndarray  # (N,) int64
    num_classes: int
    description: str


class _Relabelled(Dataset):
    def __init__(self, dataset: Dataset, mapping: np.ndarray, labels: np.ndarray) -> None:
        self.dataset, self.mapping, self.targets = dataset, mapping, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.dataset[index]
        return image, int(self.targets[index])


def _contiguous(dataset: Dataset, raw: Sequence[int] | np.ndarray, description: str) -> LabelledData:
    raw = np.asarray(raw, dtype=np.int64)
    classes, labels = np.unique(raw, return_inverse=True)
    labels = labels.astype(np.int64).reshape(-1)
    if not np.array_equal(classes, np.arange(len(classes))):
        dataset = _Relabelled(dataset, classes, labels)
    return LabelledData(dataset, labels, len(classes), description)


def build_labelled_dataset(data_cfg: Mapping[str, Any], *, env: DistEnv | None = None,
                           progress: bool = True) -> LabelledData:
    """The training set named by ``data.name``:

    - ``synthetic`` (default): the built-in split ``<root>/<synthetic.name>_train`` (drawn here when absent);
    - ``gldv2``: GLDv2-clean under ``root`` (``exclude_revisited`` + ``exclude_landmarks_file`` for RGLDv2-clean,
      ``min_class_size``);
    - ``folder``: ``root/<class>/<images>``;
    - ``cifar10``: ``root/cifar-10-batches-py`` (never downloaded here).
    """
    env = env or DistEnv()
    name = str(data_cfg.get("name", "synthetic")).lower()
    root = os.fspath(data_cfg.get("root", "data"))
    if name == "synthetic":
        from datasets.augment import LabelledImageList
        from datasets.synthetic import SyntheticConfig, build_synthetic, load_train_split

        synth = dict(data_cfg.get("synthetic") or {})
        sname = str(synth.get("name", "synth"))
        if env.is_main and not (Path(root) / f"{sname}_train" / "train.csv").is_file():
            log.info("drawing the built-in synthetic dataset under %s (no download)", root)
            build_synthetic(root, name=sname, config=SyntheticConfig(**(synth.get("config") or {})),
                            progress=progress)
        if env.distributed:
            dist.barrier()
        paths, labels = load_train_split(root, sname)
        return _contiguous(LabelledImageList(paths, labels), labels,
                           f"built-in synthetic train split {Path(root) / (sname + '_train')}")
    if name == "gldv2":
        from datasets.gldv2 import GoogleLandmarksV2

        g = dict(data_cfg.get("gldv2") or {})
        ds = GoogleLandmarksV2(root, split=str(g.get("split", "train_clean")),
                               exclude_revisited=bool(g.get("exclude_revisited", False)),
                               exclude_landmarks_file=g.get("exclude_landmarks_file"),
                               min_class_size=int(g.get("min_class_size", 1)))
        kind = "RGLDv2-clean" if g.get("exclude_revisited") else "GLDv2-clean"
        return _contiguous(ds, ds.targets, f"{kind} ({g.get('split', 'train_clean')}) under {root}")
    if name == "folder":
        from datasets.folder import ImageFolderDataset

        ds = ImageFolderDataset(root)
        return _contiguous(ds, ds.targets, f"image folder {root}")
    if name == "cifar10":
        from datasets.folder import cifar10

        ds = cifar10(root, train=True)
        return _contiguous(ds, ds.targets, f"CIFAR-10 train under {root}")
    raise ValueError(f"data.name must be synthetic, gldv2, folder or cifar10, got {name!r}")


# --------------------------------------------------------------------------------------------------------------
# The two training scripts' command line
# --------------------------------------------------------------------------------------------------------------


def training_arg_parser(*, description: str, default_config: str | os.PathLike, example: str
                        ) -> argparse.ArgumentParser:
    """``[--config YAML] [--resume] [--no-progress] [dotted overrides ...]``, shared by both training scripts."""
    p = argparse.ArgumentParser(description=description)
    shown = Path(*Path(default_config).parts[-2:])  # configs/<name>.yaml
    p.add_argument("--config", default=str(default_config),
                   help=f"experiment YAML (default: the built-in synthetic demo, {shown})")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/train_state.pth")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    return p


def run_training_cli(train: Callable[..., Any], args: argparse.Namespace, defaults: Mapping[str, Any]) -> int:
    """Load the config (YAML + overrides over ``defaults``) and run ``train(cfg=, resume=, progress=)``; a missing
    file or too many corrupt images is logged and exits with 2 rather than a traceback."""
    from helpers.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides, defaults=defaults)
    try:
        train(cfg=cfg, resume=args.resume, progress=not args.no_progress)
    except (TooManyCorruptImages, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    return 0
