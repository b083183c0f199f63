"""Optimisation: the learning-rate schedule (warm-up by steps or by ratio, then cosine / linear / constant), the
optimizer with layer-wise learning-rate decay when asked, and one optimizer step (AMP scaling, gradient clipping,
schedule) as both training scripts take it."""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from common.errors import InvalidValueError
from models.cvnet import CVNetGlobal
from models.timm_global import TimmGlobal


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


def warmup_steps(cfg: Mapping[str, Any], total_steps: int) -> int:
    """The warm-up of ``schedule`` ``cfg``: ``warmup_ratio`` of ``total_steps`` (rounded) when set, else
    ``warmup_steps``; an error when both are set."""
    ratio, steps = cfg.get("warmup_ratio"), int(cfg.get("warmup_steps", 0))
    if ratio is None:
        return steps
    if steps:
        raise InvalidValueError(f"schedule.warmup_steps={steps} and schedule.warmup_ratio={ratio}: set one of them "
                                "(warmup_steps=0 or warmup_ratio=null)")
    if not 0.0 <= float(ratio) <= 1.0:
        raise InvalidValueError(f"schedule.warmup_ratio must be in [0, 1], got {ratio}")
    return int(round(float(ratio) * total_steps))


#: CVNet-Global's ResNet, stem to stages (torchvision's names inside ``backbone``); the rest is the head
_CVNET_STAGE = re.compile(r"backbone\.(?:(conv1|bn1)|layer([1-4]))\.")


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """The depth layer of each of ``model``'s parameters for layer-wise learning-rate decay, 0 at the input, and
    the number of layers. A :class:`TimmGlobal`: the groups of its timm model's ``group_matcher`` (coarse: a ViT's
    patch embedding, then one layer per block, the final norm with the last; a ResNet's stem, then one layer per
    stage), its pooling and head on a layer of their own above (a ViT then gets BEiT's numbering: embedding 0,
    block i at i + 1, head at depth + 1). :class:`CVNetGlobal`: stem 0, stages 1-4, head (GeM, fc) 5."""
    names = [name for name, _ in model.named_parameters()]
    if isinstance(model, TimmGlobal):
        from timm.models import group_parameters

        inner = model.body.model
        groups = group_parameters(inner, inner.group_matcher(coarse=True), reverse=True)
        ids = {"body.model." + name: int(layer) for name, layer in groups.items()}
        top = max(ids.values()) + 1
        return {name: ids.get(name, top) for name in names}, top + 1
    if isinstance(model, CVNetGlobal):
        ids = {}
        for name in names:
            stage = _CVNET_STAGE.match(name)
            ids[name] = 5 if stage is None else (0 if stage.group(1) else int(stage.group(2)))
        return ids, 6
    raise InvalidValueError(f"optim.layer_decay needs a timm model or CVNet-Global, not {type(model).__name__}")


def layer_decay_groups(module: nn.Module, model: nn.Module, *, lr: float, decay: float, weight_decay: float,
                       no_weight_decay: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Parameter groups of ``module``'s trainable parameters with layer-wise learning-rate decay (BEiT, Bao et al.
    2022; the MAE fine-tuning recipe): a parameter of ``model`` (a part of ``module``) at layer i of L
    (:func:`layer_ids`) gets ``lr * decay ** (L - 1 - i)``, any other parameter of ``module`` (a classifier)
    ``lr``. Weight decay as BEiT and timm give it: none for one-dimensional parameters (biases, norms, GeM's p)
    and for ``no_weight_decay`` names of ``model``, ``weight_decay`` for the rest. Each group carries ``layer``
    and ``lr_scale``; groups in order of layer, then decay before none."""
    ids, num_layers = layer_ids(model)
    layer_of = {id(p): ids[name] for name, p in model.named_parameters()}
    skip = {id(p) for name, p in model.named_parameters() if name in set(no_weight_decay)}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for p in module.parameters():
        if not p.requires_grad:
            continue
        layer = layer_of.get(id(p), num_layers - 1)
        decayed = p.ndim > 1 and id(p) not in skip
        if (layer, decayed) not in groups:
            scale = float(decay) ** (num_layers - 1 - layer)
            groups[layer, decayed] = {"params": [], "lr": float(lr) * scale, "lr_scale": scale, "layer": layer,
                                      "weight_decay": float(weight_decay) if decayed else 0.0}
        groups[layer, decayed]["params"].append(p)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """``model``'s parameters that take no weight decay by their model's word (a timm ViT's position embedding
    and class token, through timm's ``no_weight_decay()``), with their names in ``model``."""
    if isinstance(model, TimmGlobal) and hasattr(model.body.model, "no_weight_decay"):
        return {"body.model." + name for name in model.body.model.no_weight_decay()}
    return set()


def build_optimizer(params: Sequence[nn.Parameter] | Sequence[dict], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``cfg``: name (sgd | adam | adamw), lr, momentum, weight_decay, nesterov, betas (``params``: parameters,
    or groups whose own ``lr`` / ``weight_decay`` win)."""
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
    """Per-step LambdaLR over :func:`lr_factor` (every group's own learning rate times the factor); ``cfg``:
    name, warmup_steps or warmup_ratio (:func:`warmup_steps`), final_ratio."""
    fn = _StepSchedule(total_steps=total_steps, warmup_steps=warmup_steps(cfg, total_steps),
                       schedule=str(cfg.get("name", "cosine")), final_ratio=float(cfg.get("final_ratio", 0.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def amp_enabled(setting: Any, device: torch.device) -> bool:
    """``train.amp`` (auto | true | false): float16 autocast + GradScaler, only ever on CUDA."""
    return str(setting).lower() in ("auto", "true") and device.type == "cuda"


class Optimization:
    """The optimizer, its per-step schedule, the AMP grad scaler and gradient clipping of one training run.

    ``params``: the parameters, or parameter groups (:func:`layer_decay_groups`). ``step(loss)`` is one optimizer
    step; ``state_dict()`` holds ``optimizer``, ``scheduler`` and ``scaler`` (a training checkpoint stores them
    beside the model's state).
    """

    def __init__(self, params: Iterable[nn.Parameter] | Sequence[dict[str, Any]], *, optim_cfg: Mapping[str, Any],
                 schedule_cfg: Mapping[str, Any], total_steps: int, amp: bool = False,
                 grad_clip: float | None = None) -> None:
        params = list(params)
        grouped = bool(params) and isinstance(params[0], dict)
        self.params = [p for group in params for p in group["params"]] if grouped else params
        self.optimizer = build_optimizer(params, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, schedule_cfg, total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)
        self.amp = amp
        self.grad_clip = grad_clip

    def step(self, loss: Tensor) -> tuple[float, float]:
        """Backward ``loss`` () into fresh gradients, clip their norm (``grad_clip``), step the optimizer and
        then the schedule. Returns (the learning rate this step used, the largest of the groups', the gradient
        norm before clipping, or nan without clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = float("nan")
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, float(self.grad_clip)))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = max(group["lr"] for group in self.optimizer.param_groups)
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
