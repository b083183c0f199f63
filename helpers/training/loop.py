"""The step loop both training scripts run, and what surrounds it: the session (runtime, process group), the run
directory, JSONL metrics, atomic checkpoints every N steps, and the closing summary.

Multi-process runs use ``torchrun`` (see :mod:`helpers.distributed`): gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.errors import InvalidValueError, ProjectRuntimeError
from common.io import atomic_write
from helpers.config import save_resolved
from helpers.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    init_distributed,
    parameters_checksum,
)
from helpers.training.data import (
    Batch,
    CorruptTally,
    ResumableDistributedSampler,
    SkipCorrupt,
    collate_skip_corrupt,
)
from helpers.training.state import (
    TRAIN_STATE_NAME,
    capture_rng_state,
    configure_runtime,
    load_train_state,
    restore_rng_state,
    save_train_state,
    seed_everything,
)

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
WEIGHTS_NAME = "last.pyth"
SUMMARY_NAME = "summary.json"
CONFIG_NAME = "config.yaml"
#: What every run writes into run.out_dir: ``--overwrite`` deletes these (and a script's own, e.g. mining.pt).
RUN_FILES = (TRAIN_STATE_NAME, WEIGHTS_NAME, METRICS_NAME, SUMMARY_NAME, CONFIG_NAME)
#: Any of these in run.out_dir means a run is there: starting another needs --resume or --overwrite.
RUN_MARKERS = (TRAIN_STATE_NAME, WEIGHTS_NAME, METRICS_NAME)
#: common.io.atomic_write's temporary files: ".<target name>.<mkstemp's 8 random characters>.tmp"
_ORPHAN_TMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


# --------------------------------------------------------------------------------------------------------------
# The run: session and directory
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def training_session(train_cfg: Mapping[str, Any]) -> Iterator[DistEnv]:
    """Threads and determinism (``train.threads``, ``train.deterministic``), then this process's place in the
    run (``train.device``; joins the process group under torchrun), left again at the end."""
    configure_runtime(threads=train_cfg.get("threads"), deterministic=bool(train_cfg.get("deterministic")))
    env = init_distributed(str(train_cfg.get("device", "auto")))
    try:
        yield env
    finally:
        cleanup_distributed(env)


class RunConflict(ProjectRuntimeError):
    """A run cannot start as asked: ``run.out_dir`` holds another run (``--resume`` or ``--overwrite`` needed),
    there is nothing to resume, or the run to resume was made from other inputs."""


def find_orphan_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """The temporary files of killed atomic writes in ``out_dir`` (:func:`common.io.atomic_write` names them
    ``.<target name>.<8 random characters>.tmp`` beside the target), sorted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if _ORPHAN_TMP.fullmatch(p.name) and p.is_file())


def remove_orphan_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete :func:`find_orphan_temporaries` (a checkpoint's can be hundreds of MB), each one logged."""
    removed = []
    for path in find_orphan_temporaries(out_dir):
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        removed.append(path)
        log.warning("removed %s (%.1f MB), the temporary file of a write that was killed", path, size / 2**20)
    return removed


def prepare_run_dir(out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                    extra_files: Sequence[str] = ()) -> Path:
    """Make ``out_dir`` ready for a run, or raise :class:`RunConflict` having touched nothing.

    A directory that holds a run (any of :data:`RUN_MARKERS`) is continued only with ``resume`` and replaced only
    with ``overwrite``, which first deletes that run's own files (:data:`RUN_FILES` and ``extra_files``, nothing
    else). Either way the temporaries of killed writes are removed. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise RunConflict("--resume continues a run and --overwrite deletes it: give one of them")
    existing = [name for name in RUN_MARKERS if (out_dir / name).exists()]
    if resume and not (out_dir / TRAIN_STATE_NAME).is_file():
        hint = ("start over with --overwrite" if existing else "start without --resume")
        raise RunConflict(f"no training checkpoint to resume from at {out_dir / TRAIN_STATE_NAME}: {hint}")
    if existing and not (resume or overwrite):
        raise RunConflict(f"run.out_dir {out_dir} already holds a training run ({', '.join(existing)}): add "
                          "--resume to continue it, or --overwrite to delete it and start over")
    remove_orphan_temporaries(out_dir)
    if overwrite:
        removed = []
        for name in (*RUN_FILES, *extra_files):
            if (out_dir / name).is_file():
                (out_dir / name).unlink()
                removed.append(name)
        if removed:
            log.info("--overwrite: deleted the previous run's %s from %s", ", ".join(removed), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def start_run(cfg: Mapping[str, Any], env: DistEnv, *, resume: bool = False, overwrite: bool = False,
              extra_files: Sequence[str] = ()) -> Path:
    """``run.out_dir``, made ready by :func:`prepare_run_dir` on the main rank (every rank raises its
    :class:`RunConflict`), with the resolved ``config.yaml``; the other ranks log warnings only.
    ``extra_files``: the script's own files in out_dir besides :data:`RUN_FILES` (``--overwrite`` deletes them)."""
    out_dir = Path(cfg["run"]["out_dir"])
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    problem = None
    if env.is_main:
        try:
            prepare_run_dir(out_dir, resume=resume, overwrite=overwrite, extra_files=extra_files)
        except RunConflict as exc:
            problem = str(exc)
    # the main rank decides for all (the others may not see its file system): no rank is left waiting
    problem = all_gather_objects(problem, env)[0]
    if problem is not None:
        raise RunConflict(problem)
    if env.is_main:
        save_resolved(cfg, out_dir, CONFIG_NAME)
    return out_dir


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


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
        """Append one record (flushed at once: a crash loses at most the line being written)."""
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

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, progress: bool = True, desc: str = "train") -> LoopConfig:
        """From a training script's config: ``run`` (out_dir, seed), ``train`` and ``data.max_corrupt``."""
        tcfg = cfg["train"]
        return cls(out_dir=Path(cfg["run"]["out_dir"]), batch_size=int(tcfg["batch_size"]),
                   total_steps=tcfg.get("steps"), epochs=tcfg.get("epochs"),
                   checkpoint_every=int(tcfg["checkpoint_every"]), log_every=int(tcfg["log_every"]),
                   num_workers=int(tcfg["num_workers"]), seed=int(cfg["run"]["seed"]),
                   max_corrupt=cfg["data"].get("max_corrupt"), fixed_batch=bool(tcfg.get("fixed_batch")),
                   progress=progress, desc=desc)


@dataclass
class LoopResult:
    """What :func:`run_loop` did: steps taken, corrupt images met, the last metrics, wall time."""

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
    """``train.steps``, or ``train.epochs`` times the steps of an epoch; an error when no batch fits."""
    spe = steps_per_epoch(n_items, cfg.batch_size, world_size)
    if spe < 1:
        raise InvalidValueError(f"{n_items} training items give no complete batch of {cfg.batch_size} "
                                f"over {world_size} rank(s): lower train.batch_size")
    if cfg.total_steps:
        return int(cfg.total_steps)
    if not cfg.epochs:
        raise InvalidValueError("set train.steps or train.epochs")
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
    run_info: Mapping[str, Any] | None = None,
) -> LoopResult:
    """Drive ``step_fn(batch_data, step) -> metrics`` for ``cfg.total_steps`` optimizer steps.

    Handles the data order (resumable, distributed), skipped corrupt items, tqdm progress (loss and images/s),
    JSONL metrics (main rank), atomic checkpoints every ``cfg.checkpoint_every`` steps and at the end
    (``get_state()`` is the task's state, ``set_state`` restores it on ``resume``), and calls
    ``on_checkpoint(step)`` on the main rank after each checkpoint (e.g. to write official-layout weights).
    ``run_info``: what the run was made from (builtins), saved in every checkpoint for :func:`read_run_info`.
    """
    if cfg.batch_size % env.world_size:
        raise InvalidValueError(f"train.batch_size={cfg.batch_size} must be divisible by the number of ranks "
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
            info = {"run_info": dict(run_info)} if run_info else {}
            save_train_state(state_path, {"step": at_step, "total_steps": total, "task": task, "rng": rngs,
                                          "corrupt": tally.state_dict(), "world_size": env.world_size,
                                          "data_order": {"seed": cfg.seed, "epoch": at_step // spe,
                                                         "position": (at_step % spe) * cfg.batch_size},
                                          **info})
            if on_checkpoint is not None:
                on_checkpoint(at_step)
            logger.write({"event": "checkpoint", "step": at_step, "path": str(state_path)})
        if env.distributed:
            barrier()

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


def read_run_info(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``run_info`` that :func:`run_loop` saved with the run's last checkpoint ({} when it saved none)."""
    return dict(load_train_state(Path(out_dir) / TRAIN_STATE_NAME).get("run_info") or {})


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
               "checkpoint": str(out_dir / WEIGHTS_NAME)}
    if env.is_main:
        dump_summary(out_dir / SUMMARY_NAME, summary)
        log.info("done: %d steps in %.0f s, final loss %.4f; %d corrupt images skipped; weights %s",
                 result.steps, result.seconds, result.last_metrics.get("loss", float("nan")),
                 result.corrupt_images, out_dir / WEIGHTS_NAME)
    return summary

