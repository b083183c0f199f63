"""Optimisation: the learning-rate schedule, the optimizer, and one optimizer step (AMP scaling, gradient
clipping, schedule) as both training scripts take it."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from common.errors import InvalidValueError


def lr_factor(step: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              final_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from 1/warmup to 1 over ``warmup_steps``, then ``"cosine"`` decay to ``final_ratio``,
    ``"linear"`` decay to ``final_ratio``, or ``"constant"``.
    """
    if total_steps < 1:
        raise InvalidValueError(f"total_steps must be >= 1, got {total_steps}")
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
    raise InvalidValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")


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
    raise InvalidValueError(f"optim.name must be sgd, adam or adamw, got {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any],
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR over :func:`lr_factor`; ``cfg``: name, warmup_steps, final_ratio."""
    fn = _StepSchedule(total_steps=total_steps, warmup_steps=int(cfg.get("warmup_steps", 0)),
                       schedule=str(cfg.get("name", "cosine")), final_ratio=float(cfg.get("final_ratio", 0.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def amp_enabled(setting: Any, device: torch.device) -> bool:
    """``train.amp`` (auto | true | false): float16 autocast + GradScaler, only ever on CUDA."""
    return str(setting).lower() in ("auto", "true") and device.type == "cuda"


class Optimization:
    """The optimizer, its per-step schedule, the AMP grad scaler and gradient clipping of one training run.

    ``step(loss)`` is one optimizer step; ``state_dict()`` holds ``optimizer``, ``scheduler`` and ``scaler``
    (a training checkpoint stores them beside the model's state).
    """

    def __init__(self, params: Iterable[nn.Parameter], *, optim_cfg: Mapping[str, Any],
                 schedule_cfg: Mapping[str, Any], total_steps: int, amp: bool = False,
                 grad_clip: float | None = None) -> None:
        self.params = list(params)
        self.optimizer = build_optimizer(self.params, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, schedule_cfg, total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)
        self.amp = amp
        self.grad_clip = grad_clip

    def step(self, loss: Tensor) -> tuple[float, float]:
        """Backward ``loss`` () into fresh gradients, clip their norm (``grad_clip``), step the optimizer and
        then the schedule. Returns (the learning rate this step used, the gradient norm before clipping, or nan
        without clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = float("nan")
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, float(self.grad_clip)))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return lr, grad_norm

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.amp:
            self.scaler.load_state_dict(state["scaler"])
