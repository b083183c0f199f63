"""The set-up both training scripts share, and the form of what they train: :func:`open_run` starts the session
and the run directory and gives a :class:`TrainingRun` (the loop's settings, AMP, the ranks' wrapper, the
optimisation); a script's :class:`TrainingTask` (one step, its state, its weights) then runs in :func:`run_loop`."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from common.errors import InvalidValueError
from helpers.distributed import DistEnv
from helpers.training.loop import (
    WEIGHTS_NAME,
    LoopConfig,
    LoopResult,
    finish_run,
    resolve_total_steps,
    run_loop,
    start_run,
    training_session,
)
from helpers.training.optim import Optimization, amp_enabled, layer_decay_groups, no_weight_decay_names


class TrainingTask(Protocol):
    """What a training script gives the loop: one optimizer step, the task's resumable state, and its weights."""

    def step(self, batch: Any, step: int) -> Mapping[str, float]:
        """One optimizer step on ``batch`` (a collated batch on the CPU); returns its scalar metrics."""

    def state_dict(self) -> dict[str, Any]:
        """Everything the task needs to resume (model, optimizer, ...), tensors and builtins only."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""

    def save_weights(self, step: int) -> None:
        """Write ``last.pyth`` (main rank, after each checkpoint)."""


@dataclass
class TrainingRun:
    """One training run once :func:`open_run` has set it up: this process's place in it (``env``), the checked
    config, ``run.out_dir`` (ready), the loop's settings, AMP (``train.amp``), and whether it continues a run."""

    cfg: Mapping[str, Any]
    env: DistEnv
    out_dir: Path
    loop: LoopConfig
    amp: bool
    resume: bool

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def seed(self) -> int:
        """``run.seed``."""
        return self.loop.seed

    @property
    def weights_path(self) -> Path:
        """Where the task writes its weights (``last.pyth``)."""
        return self.out_dir / WEIGHTS_NAME

    def total_steps(self, n_items: int) -> int:
        """``train.steps``, or ``train.epochs`` epochs over ``n_items`` training items."""
        return resolve_total_steps(self.loop, n_items, self.env.world_size)

    def across_ranks(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel when the run has several ranks, else ``module`` itself."""
        if not self.env.distributed:
            return module
        device = self.env.device
        return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def optimization(self, module: nn.Module, total_steps: int, *, model: nn.Module | None = None) -> Optimization:
        """The optimizer (``optim``) of ``module``'s trainable parameters, its schedule (``schedule``) over
        ``total_steps``, AMP and ``train.grad_clip``. With ``optim.layer_decay``, the parameters of ``model``
        (the part of ``module`` that has layers) get layer-wise decayed learning rates
        (:func:`~helpers.training.optim.layer_decay_groups`)."""
        ocfg = self.cfg["optim"]
        params: list[Any] = [p for p in module.parameters() if p.requires_grad]
        if ocfg.get("layer_decay") is not None:
            if model is None:
                raise InvalidValueError("optim.layer_decay: this training has no layered model; set it to null")
            params = layer_decay_groups(module, model, lr=float(ocfg["lr"]), decay=float(ocfg["layer_decay"]),
                                        weight_decay=float(ocfg.get("weight_decay", 0.0)),
                                        no_weight_decay=no_weight_decay_names(model))
        return Optimization(params, optim_cfg=ocfg, schedule_cfg=self.cfg["schedule"], total_steps=total_steps,
                            amp=self.amp, grad_clip=self.cfg["train"].get("grad_clip"))

    def train(self, dataset: Dataset, task: TrainingTask, *, extra_log: Mapping[str, Any],
              run_info: Mapping[str, Any] | None = None,
              sampler: Callable[[int], Sampler] | None = None) -> LoopResult:
        """:func:`run_loop` over ``dataset`` with ``task``'s step, state and weights (``extra_log``: the task's
        fields of the metrics' start record; ``run_info``: see :func:`read_run_info`; ``sampler``: this rank's
        data order for a number of steps per epoch, the loop's shuffled order when None)."""
        return run_loop(dataset=dataset, env=self.env, cfg=self.loop, step_fn=task.step, get_state=task.state_dict,
                        set_state=task.load_state_dict, on_checkpoint=task.save_weights, resume=self.resume,
                        extra_log=extra_log, run_info=run_info, sampler=sampler)

    def finish(self, *, stage: str, result: LoopResult, trained: nn.Module,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """:func:`finish_run`: the ranks' agreement on ``trained``, ``summary.json``; returns the summary."""
        return finish_run(stage=stage, result=result, env=self.env, trained=trained, out_dir=self.out_dir,
                          extra=extra)


@contextmanager
def open_run(cfg: Mapping[str, Any], *, desc: str, resume: bool = False, overwrite: bool = False,
             progress: bool = True, extra_files: Sequence[str] = ()) -> Iterator[TrainingRun]:
    """The set-up both training scripts share: the session (:func:`training_session`), ``run.out_dir`` made ready
    with the resolved config (:func:`start_run`; ``extra_files`` as there), the loop's settings (``desc``: the
    progress bar's name) and AMP. The session ends with the block."""
    with training_session(cfg["train"]) as env:
        out_dir = start_run(cfg, env, resume=resume, overwrite=overwrite, extra_files=extra_files)
        loop = LoopConfig.from_config(cfg, progress=progress, desc=desc)
        amp = amp_enabled(cfg["train"].get("amp", "auto"), env.device)
        yield TrainingRun(cfg=cfg, env=env, out_dir=out_dir, loop=loop, amp=amp, resume=resume)
