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
from torch.utils.data import DataLoader, Dataset, Sampler
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
    env = init_distributed(str(train_cfg.get("device", "auto")), tf32=bool(train_cfg.get("tf32")))
    try:
        yield env
    finally:
        cleanup_distributed(env)


class RunConflict(ProjectRuntimeError):
    """A run cannot start as asked: ``run.out_dir`` holds another run (``--resume`` or ``--overwrite`` needed),
    there is nothing to resume, or the run to resume was made from other inputs."""


class NonFiniteLossError(ProjectRuntimeError, FloatingPointError):
    """A step's loss is NaN or infinite on some rank: the run stops there (every rank at the same step)."""


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
    sampler: Callable[[int], Sampler] | None = None,
) -> LoopResult:
    """Drive ``step_fn(batch_data, step) -> metrics`` for ``cfg.total_steps`` optimizer steps.

    Handles the data order (resumable, distributed: :class:`ResumableDistributedSampler`, or ``sampler(steps per
    epoch)``, this rank's sampler with the same ``set_epoch`` / ``set_start``), skipped corrupt items, tqdm
    progress (loss and images/s),
    JSONL metrics (main rank), atomic checkpoints every ``cfg.checkpoint_every`` steps and at the end
    (``get_state()`` is the task's state, ``set_state`` restores it on ``resume``), and calls
    ``on_checkpoint(step)`` on the main rank after each checkpoint (e.g. to write official-layout weights).
    ``run_info``: what the run was made from (builtins), saved in every checkpoint for :func:`read_run_info`.
    """
    if cfg.batch_size % env.world_size:
        raise InvalidValueError(f"train.batch_size={cfg.batch_size} must be divisible by the number of ranks "
                                f"({env.world_size})")
    data = SkipCorrupt(dataset)
    plan = _LoopPlan(env=env, cfg=cfg, steps_per_epoch=steps_per_epoch(len(data), cfg.batch_size, env.world_size),
                     total=resolve_total_steps(cfg, len(data), env.world_size), tally=CorruptTally(cfg.max_corrupt))
    step = _restore_train_state(plan, set_state) if resume else 0
    metrics = _open_metrics(plan, resumed_at=step if resume else None, start=extra_log)
    save = _Checkpoints(plan, metrics=metrics, get_state=get_state, on_checkpoint=on_checkpoint, run_info=run_info)
    batches = _BatchStream(data, plan, first_step=step, sampler=sampler)
    progress = _Progress(plan, first_step=step)
    t_start = time.time()
    try:
        step, last = _take_steps(plan, step, batches=batches, step_fn=step_fn, metrics=metrics, save=save,
                                 progress=progress)
    finally:
        progress.close()
    return _end_of_loop(plan, steps=step, last=last, seconds=time.time() - t_start, metrics=metrics)


@dataclass
class _LoopPlan:
    """What the phases of one :func:`run_loop` share: the run's place and settings, the step count, and the
    corrupt-image tally (the one piece that changes as steps go)."""

    env: DistEnv
    cfg: LoopConfig
    steps_per_epoch: int
    total: int
    tally: CorruptTally

    @property
    def state_path(self) -> Path:
        return self.cfg.out_dir / TRAIN_STATE_NAME


def _restore_train_state(plan: _LoopPlan, set_state: Callable[[Mapping[str, Any]], None]) -> int:
    """Load the run's training checkpoint into the task (``set_state``), the tally and the RNGs; returns the step
    to go on from."""
    env, seed = plan.env, plan.cfg.seed
    state = load_train_state(plan.state_path)
    set_state(state["task"])
    step = int(state["step"])
    plan.tally.load_state_dict(state.get("corrupt", {}))
    rngs = state["rng"]
    if len(rngs) == env.world_size:
        restore_rng_state(rngs[env.rank])
    else:
        log.warning("resuming %d-rank state on %d ranks: RNG states re-seeded", len(rngs), env.world_size)
        seed_everything(seed + 1000 * step + env.rank)
    if int(state.get("total_steps", plan.total)) != plan.total:
        log.warning("the checkpoint was made for %s steps, this run has %d", state.get("total_steps"), plan.total)
    if env.is_main:
        log.info("resumed from %s at step %d of %d", plan.state_path, step, plan.total)
    return step


def _open_metrics(plan: _LoopPlan, *, resumed_at: int | None, start: Mapping[str, Any] | None) -> JsonlLog:
    """The metrics file (main rank), opened with a ``start`` record (``start``: the task's own fields) or, when
    resumed at a step, a ``resume`` record after the lines up to that step."""
    metrics = JsonlLog(plan.cfg.out_dir / METRICS_NAME, enabled=plan.env.is_main, resume_step=resumed_at)
    if resumed_at is not None:
        metrics.write({"event": "resume", "step": resumed_at})
    else:
        metrics.write({"event": "start", "step": 0, "total_steps": plan.total, "steps_per_epoch": plan.steps_per_epoch,
                       "world_size": plan.env.world_size, "batch_size": plan.cfg.batch_size, **(start or {})})
    return metrics


@dataclass
class _Checkpoints:
    """``save(step)``: the training checkpoint (every rank's RNG state, the task's state, the tally, the data
    position) written atomically by the main rank, then the task's ``on_checkpoint``; the ranks meet after."""

    plan: _LoopPlan
    metrics: JsonlLog
    get_state: Callable[[], dict[str, Any]]
    on_checkpoint: Callable[[int], None] | None
    run_info: Mapping[str, Any] | None

    def __call__(self, at_step: int) -> None:
        env, cfg, spe = self.plan.env, self.plan.cfg, self.plan.steps_per_epoch
        rngs = all_gather_objects(capture_rng_state(), env)
        task = self.get_state()  # every rank: the task may gather inside
        if env.is_main:
            info = {"run_info": dict(self.run_info)} if self.run_info else {}
            save_train_state(self.plan.state_path, {
                "step": at_step, "total_steps": self.plan.total, "task": task, "rng": rngs,
                "corrupt": self.plan.tally.state_dict(), "world_size": env.world_size,
                "data_order": {"seed": cfg.seed, "epoch": at_step // spe, "position": (at_step % spe) * cfg.batch_size},
                **info})
            if self.on_checkpoint is not None:
                self.on_checkpoint(at_step)
            self.metrics.write({"event": "checkpoint", "step": at_step, "path": str(self.plan.state_path)})
        if env.distributed:
            barrier()


class _BatchStream:
    """This rank's batches from ``first_step`` on, epoch after epoch in the resumable order (``cfg.fixed_batch``:
    the first batch over and over); ``sampler``: see :func:`run_loop`."""

    def __init__(self, data: SkipCorrupt, plan: _LoopPlan, *, first_step: int,
                 sampler: Callable[[int], Sampler] | None = None) -> None:
        self.data, self.plan = data, plan
        env = plan.env
        if sampler is None:
            self.sampler = ResumableDistributedSampler(data, num_replicas=env.world_size, rank=env.rank,
                                                       shuffle=True, seed=plan.cfg.seed)
        else:
            self.sampler = sampler(plan.steps_per_epoch)
        self.epoch, self.start = divmod(first_step, plan.steps_per_epoch)
        self.iterator: Iterator[Batch] | None = None
        self.fixed: Batch | None = None

    def _epoch(self, epoch: int, start_step_in_epoch: int) -> Iterator[Batch]:
        cfg, env = self.plan.cfg, self.plan.env
        per_rank = cfg.batch_size // env.world_size
        self.data.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start_step_in_epoch * per_rank)
        # worker seeds from (seed, epoch, rank), not from the global RNG a resume would shift
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + env.rank)
        loader = DataLoader(self.data, batch_size=per_rank, sampler=self.sampler, num_workers=cfg.num_workers,
                            collate_fn=collate_skip_corrupt, drop_last=True, generator=gen,
                            pin_memory=env.device.type == "cuda", persistent_workers=False)
        yield from loader

    def next(self) -> Batch:
        if self.plan.cfg.fixed_batch:
            if self.fixed is None:
                self.fixed = next(iter(self._epoch(0, 0)))
            return self.fixed
        if self.iterator is None:
            self.iterator = self._epoch(self.epoch, self.start)
        while True:
            try:
                return next(self.iterator)
            except StopIteration:
                self.epoch += 1
                self.iterator = self._epoch(self.epoch, 0)


class _Progress:
    """The tqdm bar (main rank, ``cfg.progress``) with loss, lr and images/s, and the images/s of the current
    logging window."""

    def __init__(self, plan: _LoopPlan, *, first_step: int) -> None:
        self.world_size = plan.env.world_size
        self.bar = tqdm(total=plan.total, initial=first_step, desc=plan.cfg.desc,
                        disable=not (plan.cfg.progress and plan.env.is_main), dynamic_ncols=True)
        self.window_t, self.window_n = time.time(), 0

    def advance(self, images: int, metrics: Mapping[str, float]) -> None:
        self.window_n += images
        self.bar.update(1)
        if metrics:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr")}
                                 | {"img/s": f"{self._rate(time.time() - self.window_t):.1f}"}, refresh=False)

    def _rate(self, seconds: float) -> float:
        return self.window_n * self.world_size / max(seconds, 1e-9)

    def end_window(self) -> float:
        """The images/s of the window that ends here (all ranks); a new window starts."""
        rate = self._rate(time.time() - self.window_t)
        self.window_t, self.window_n = time.time(), 0
        return rate

    def close(self) -> None:
        self.bar.close()


def _step_or_skip(plan: _LoopPlan, batch: Batch, step: int,
                  step_fn: Callable[[Any, int], Mapping[str, float]]) -> dict[str, float]:
    """``step_fn``'s metrics, after the ranks have shared their corrupt items ({}: a rank lost its whole batch,
    and every rank skips this step together, so that the collectives stay matched)."""
    shared = all_gather_objects((batch.corrupt, batch.data is None), plan.env)
    corrupt = [c for lost, _ in shared for c in lost]
    if corrupt:
        plan.tally.add(corrupt)
    if any(empty for _, empty in shared):
        log.warning("step %d skipped: a whole batch was corrupt", step)
        return {}
    return dict(step_fn(batch.data, step))


def _take_steps(plan: _LoopPlan, step: int, *, batches: _BatchStream,
                step_fn: Callable[[Any, int], Mapping[str, float]], metrics: JsonlLog,
                save: Callable[[int], None], progress: _Progress) -> tuple[int, dict[str, float]]:
    """The steps from ``step`` to ``plan.total``, logged every ``log_every`` and checkpointed every
    ``checkpoint_every`` steps and at the end. Returns (the steps done, the last step's metrics)."""
    cfg, total, spe, tally = plan.cfg, plan.total, plan.steps_per_epoch, plan.tally
    last: dict[str, float] = {}
    while step < total:
        batch = batches.next()
        step_metrics = _step_or_skip(plan, batch, step, step_fn)
        step += 1
        progress.advance(batch.size, step_metrics)
        if step_metrics:
            last = step_metrics
        if step % cfg.log_every == 0 or step == total:
            logged = all_reduce_mean(step_metrics, plan.env)
            metrics.write({"step": step, "epoch": (step - 1) // spe, **logged, "images_per_s": progress.end_window(),
                           "corrupt_images": len(tally.paths), "corrupt_skipped": tally.skipped})
        if step % cfg.checkpoint_every == 0 or step == total:
            save(step)
    return step, last


def _end_of_loop(plan: _LoopPlan, *, steps: int, last: dict[str, float], seconds: float,
                 metrics: JsonlLog) -> LoopResult:
    """The ``end`` record, a warning naming the corrupt images skipped, and the loop's result."""
    tally = plan.tally
    metrics.write({"event": "end", "step": steps, "seconds": round(seconds, 2), "corrupt_images": len(tally.paths),
                   "corrupt_skipped": tally.skipped})
    if tally.paths and plan.env.is_main:
        log.warning("%d corrupt training images were skipped (%d items): %s", len(tally.paths), tally.skipped,
                    ", ".join(sorted(tally.paths)[:10]))
    return LoopResult(steps=steps, corrupt_images=len(tally.paths), corrupt_skipped=tally.skipped, last_metrics=last,
                      seconds=seconds)


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


