"""The models training starts from: CVNet-Global or a timm backbone for ``train_backbone.py``, CVNet-Rerank on a
frozen backbone checkpoint for ``train_rerank.py``, and the complete official-layout checkpoint it writes."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.convention import OFFICIAL_CONVENTION, TORCHVISION_CONVENTION
from common.errors import InvalidValueError, MissingFileError
from helpers.builders import TIMM_ARCH_PREFIX, build_model
from helpers.config import ConfigError
from models.checkpoint import CheckpointError, load_official_checkpoint, official_state_dict, read_checkpoint
from models.cvnet import CVNetGlobal, CVNetRerank
from models.timm_global import TimmGlobal, is_timm_checkpoint, load_timm_global

log = logging.getLogger(__name__)

#: The official-layout keys of CVNet-Rerank's trainable head (the rest of a checkpoint is the backbone).
RERANK_HEAD_PREFIXES = ("conv2ds.", "cv_learner.")
#: ``model.arch`` of train_backbone.py: CVNet-Global's ResNet, or ``timm:<model name>`` (:class:`TimmGlobal`).
RESNET_ARCH = "resnet"


def timm_model_name(arch: str) -> str | None:
    """The timm model name of a ``model.arch`` value (``"timm:resnet50"`` -> ``"resnet50"``), None for
    ``"resnet"``; a ConfigError for anything else."""
    if arch == RESNET_ARCH:
        return None
    if arch.startswith(TIMM_ARCH_PREFIX) and len(arch) > len(TIMM_ARCH_PREFIX):
        return arch[len(TIMM_ARCH_PREFIX):]
    raise ConfigError(f"model.arch must be {RESNET_ARCH!r} or 'timm:<timm model name>', got {arch!r}")


def build_training_backbone(*, depth: int, reduction_dim: int | None, key_momentum: float,
                            imagenet_weights: bool | str = "auto", init_checkpoint: str | os.PathLike | None = None,
                            zero_init_residual: bool = False, arch: str = RESNET_ARCH, pooling: str = "gem",
                            pretrained_file: str | os.PathLike | None = None, head: str = "linear",
                            head_dropout: float = 0.1) -> nn.Module:
    """The global model to train (train mode, on the CPU): ``arch="resnet"`` is CVNet-Global (its own momentum
    key encoder inside), ``arch="timm:<name>"`` a :class:`TimmGlobal` (see :func:`build_training_timm`; ``head``
    and ``head_dropout`` are its).

    CVNet-Global is initialised from the first that applies:

    - ``init_checkpoint``: an official-layout checkpoint (its own input convention);
    - ``imagenet_weights`` true, or ``"auto"`` when torchvision's ImageNet weights are in the torch hub cache:
      those weights (RGB input convention); ``"auto"`` falls back to random when they are absent;
    - random weights (the releases' BGR convention), the bottlenecks zero-initialised if ``zero_init_residual``.

    Random weights come from the global RNG (seed it first: every rank must draw the same).
    """
    choice = str(imagenet_weights).lower()
    if choice not in ("auto", "true", "false"):
        raise InvalidValueError(f"model.imagenet_weights must be true, false or auto, got {imagenet_weights!r}")
    name = timm_model_name(arch)
    if name is not None:
        model = build_training_timm(name, pooling=pooling, dim=reduction_dim, imagenet_weights=choice,
                                    pretrained_file=pretrained_file, init_checkpoint=init_checkpoint, head=head,
                                    head_dropout=head_dropout)
        freeze_unused_parameters(model, timm_probe_input(model))
        return model
    if pooling != "gem" or pretrained_file is not None or reduction_dim is None or head != "linear":
        raise ConfigError("model.arch=resnet is CVNet-Global (GeM, fc to model.reduction_dim, ImageNet weights "
                          "through model.imagenet_weights): model.pooling=gem, model.pretrained_file=null, "
                          "model.head=linear and a model.reduction_dim are required; the other values are for "
                          "model.arch=timm:<name>")
    options = {"reduction_dim": int(reduction_dim), "momentum": float(key_momentum)}
    build = dict(depth=int(depth), seed=None, warn_random=False, eval_mode=False)
    if init_checkpoint:
        model = build_model("cvnet_global", weights=init_checkpoint, options=options, **build)
        log.info("initialised from %s (input convention %s)", init_checkpoint,
                 model.input_convention.channel_order)
        return model
    if choice != "false":
        try:
            model = build_model("cvnet_global", options={**options, "imagenet_weights": True,
                                                         "input_convention": TORCHVISION_CONVENTION}, **build)
            log.info("initialised from torchvision's ImageNet weights (RGB input convention)")
            return model
        except RuntimeError as err:
            if choice == "true":
                raise
            log.warning("%s\n-> training from random initialisation instead (model.imagenet_weights=auto)", err)
    log.info("random initialisation (BGR input convention of the official releases)")
    model = build_model("cvnet_global", options={**options, "input_convention": OFFICIAL_CONVENTION}, **build)
    if zero_init_residual:
        zero_init_residual_(model)
    return model


def build_training_timm(name: str, *, pooling: str = "gem", dim: int | None = None, imagenet_weights: str = "auto",
                        pretrained_file: str | os.PathLike | None = None,
                        init_checkpoint: str | os.PathLike | None = None, head: str = "linear",
                        head_dropout: float = 0.1) -> TimmGlobal:
    """A :class:`TimmGlobal` to train (train mode, CPU; ``dim``: its projection, None for none; ``head``: linear
    or the reference CLIP system's embedding head), from the first
    that applies: ``init_checkpoint`` (a :func:`timm_global_checkpoint` file of the same model), the local
    ``pretrained_file``, timm's own download when ``imagenet_weights`` is ``"true"``, else random weights from
    the global RNG (``"auto"`` never downloads). The input convention is timm's for the model (RGB)."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"model.arch=timm:{name}: timm {timm.__version__} has no model {name!r} "
                          f"(python -c \"import timm; print(timm.list_models('*{name.split('_')[0]}*'))\" lists "
                          "the names)")
    if init_checkpoint:
        model = load_timm_global(init_checkpoint)
        held = (model.model_name, model.pooling, None if model.projection is None else model.dim, model.head)
        if held != (name, pooling, dim, head):
            raise ConfigError(f"model.init_checkpoint {init_checkpoint} holds timm:{held[0]} (pooling {held[1]}, "
                              f"dim {held[2]}, head {held[3]}), not the configured timm:{name} (pooling {pooling}, "
                              f"dim {dim}, head {head})")
        log.info("initialised from %s", init_checkpoint)
        return model.train()
    pretrained = imagenet_weights == "true" or pretrained_file is not None
    model = TimmGlobal(name, pretrained=pretrained, pooling=pooling, dim=dim, head=head, head_dropout=head_dropout,
                       pretrained_file=pretrained_file)
    log.info("timm:%s, %s: %s (input convention RGB, mean %s)", name, pooling,
             f"pretrained weights from {pretrained_file or 'timm'}" if pretrained else "random initialisation",
             model.input_convention.mean)
    return model.train()


def timm_probe_input(model: TimmGlobal, batch: int = 2) -> Tensor:
    """A constant batch (batch, 3, H, W) of the timm model's own input size (its pretrained config; 224 x 224
    where it names none), the size every timm model accepts."""
    cfg = getattr(model.body.model, "pretrained_cfg", {}) or {}
    _, h, w = cfg.get("input_size", (3, 224, 224))
    return torch.ones(batch, 3, h, w)


def freeze_unused_parameters(model: nn.Module, example: Tensor) -> list[str]:
    """Freeze (``requires_grad=False``) the trainable parameters ``model(example)`` does not use, and return their
    names. A timm model keeps parameters for the head it is built without (ConvNeXt's ``head.norm``, a ViT's
    ``fc_norm``, MobileNetV3's ``conv_head``): never reached by ``forward_features``, they get no gradient, and
    DistributedDataParallel (``find_unused_parameters=False``) stops at its second step waiting for theirs. Found
    by one forward and backward pass in eval mode (no dropout, no drop path; BatchNorm statistics untouched);
    the weights and the RNG are left as they were."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model(example).float().sum().backward()
        unused = [n for n, p in trainable if p.grad is None]
    finally:
        for _, p in trainable:
            p.grad = None
        model.train(was_training)
    for n, p in trainable:
        if n in unused:
            p.requires_grad_(False)
    if unused:
        log.info("frozen %d parameter(s) the model's forward never uses: %s", len(unused), ", ".join(unused))
    return unused


@torch.no_grad()
def zero_init_residual_(model: CVNetGlobal) -> None:
    """Zero the last BN scale of every bottleneck (Goyal et al. 2017): each block starts as the identity, which
    speeds up training from random initialisation. The key encoder is reset to match."""
    for name, module in model.backbone.named_modules():
        if name.endswith(".bn3") and isinstance(module, nn.BatchNorm2d):
            module.weight.zero_()
    model.reset_key_encoder()


def read_backbone_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """An official-layout checkpoint file as ``{"model_state": ..., metadata}`` (weights_only), with a message
    saying how to get one when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"backbone checkpoint not found: {path}. Train it first (`python train_backbone.py` for the built-in "
            "demo, or with your config), or point backbone.checkpoint=<file> at an official-layout CVNet "
            "checkpoint such as CVPR2022_CVNet_R50.pyth (see README, 'Official weights').")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if is_timm_checkpoint(ckpt):
        raise CheckpointError(f"{path} holds a {ckpt.get('arch')} backbone: CVNet-Rerank needs CVNet-Global's "
                              "ResNet (its stage-3 maps); train one with train_backbone.py model.arch=resnet")
    if "model_state" not in ckpt:
        ckpt = {"model_state": ckpt}
    return ckpt


def checkpoint_geometry(ckpt: Mapping[str, Any]) -> tuple[int, int]:
    """(ResNet depth, global descriptor dimension) of an official-layout checkpoint dict."""
    state = ckpt["model_state"]
    prefix = "encoder_q." if any(k.startswith("encoder_q.") for k in state) else "globalmodel."
    blocks = {k.split(".")[2] for k in state if k.startswith(prefix + "s3.")}
    depth = int(ckpt.get("depth") or (101 if len(blocks) > 6 else 50))
    dim = int(state[prefix + "head.fc.weight"].shape[0])
    return depth, dim


def _without_rerank_head(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(RERANK_HEAD_PREFIXES)}


def build_training_rerank(backbone: Mapping[str, Any], *, depth: int, head_init: str = "random") -> CVNetRerank:
    """CVNet-Rerank to train (train mode, CPU) on a frozen backbone: stages 1-3 (and the input convention) from
    the official-layout checkpoint dict ``backbone``, stages frozen; the head (``conv2ds``, ``cv_learner``)
    ``"random"`` (drawn from the global RNG: seed it first) or the ``"checkpoint"``'s own."""
    if head_init not in ("random", "checkpoint"):
        raise InvalidValueError(f"model.head_init must be random or checkpoint, got {head_init!r}")
    if head_init == "checkpoint":
        if not any(k.startswith(RERANK_HEAD_PREFIXES) for k in backbone["model_state"]):
            raise InvalidValueError("model.head_init=checkpoint but the backbone checkpoint has no conv2ds/cv_learner")
        rerank = build_model("cvnet_rerank", depth=depth, weights=backbone, seed=None, eval_mode=False)
    else:
        rerank = build_model("cvnet_rerank", depth=depth, seed=None, warn_random=False, eval_mode=False)
        # the checkpoint's stages around this model's own random head: a strict load of the whole
        load_official_checkpoint(rerank, {**{k: v for k, v in backbone.items() if k != "model_state"},
                                          "model_state": complete_rerank_checkpoint(backbone, rerank)})
    for p in rerank.backbone.parameters():
        p.requires_grad_(False)
    return rerank


def complete_rerank_checkpoint(backbone: Mapping[str, Any], rerank: CVNetRerank) -> dict[str, Tensor]:
    """The full official layout: the backbone checkpoint's ``encoder_q.*`` (stages 1-4, global head) and the
    trained ``conv2ds.*`` / ``cv_learner.*`` of ``rerank``, so every model of this project loads it."""
    state = _without_rerank_head(backbone["model_state"])
    state.update({k: v for k, v in official_state_dict(rerank).items() if k.startswith(RERANK_HEAD_PREFIXES)})
    return state
