"""The models of an evaluation: which weights file feeds which model (:class:`WeightsPlan`), their sha256 checks,
the models a list of methods needs, built once (:func:`load_models`: all of it, as a :class:`ModelSet`), and each
global model's extraction scales."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from common.constants import CVNET_TEST_SCALES
from common.io import file_sha256
from helpers.builders import (
    CVNET_GLOBAL_KINDS,
    build_model,
    copy_backbone,
)
from helpers.cache_keys import state_dict_hash
from helpers.config import ConfigError
from models import CheckpointError

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random — numbers are meaningless"
#: Seed offsets of the random-weights models (``seed * 1000 + offset``): each model's weights do not depend on
#: which other models a run builds.
SEED_OFFSETS = {"cvnet_global": 1, "superglobal": 2, "cvnet_rerank": 3, "timm_global": 4}
#: The global ranking (a kind of :data:`helpers.builders.GLOBAL_KINDS`) each method starts from.
METHOD_BASE = {"cvnet_global": "cvnet_global", "cvnet_rerank": "cvnet_global", "superglobal": "superglobal",
               "superglobal_rerank": "superglobal", "timm_global": "timm_global"}


@dataclass
class WeightsPlan:
    """Which file feeds which model; ``None`` means random weights (seeded)."""

    global_path: str | None = None
    rerank_path: str | None = None
    rerank_backbone_from_global: bool = False
    source: str = "random"  # "official", "builtin", "timm" or "random"
    description: str = RANDOM_WEIGHTS
    warnings: list[str] = field(default_factory=list)


def plan_weights(model_cfg: Mapping[str, Any], needed: set[str] | None = None) -> WeightsPlan:
    """``model.weights`` (one official-layout file for every model), else the built-in training run's newest
    checkpoints (``model.builtin_checkpoints``: rerank for all models, else backbone for the global models and
    a random re-ranking head), else random weights. A run of the timm model alone (``needed == {'timm_global'}``)
    is planned from ``model.timm.weights``: the ResNet files do not concern it."""
    if needed == {"timm_global"}:
        timm_weights = (model_cfg.get("timm") or {}).get("weights")
        if timm_weights:
            return WeightsPlan(source="timm", description=os.fspath(timm_weights))
        return WeightsPlan(warnings=[f"weights: {RANDOM_WEIGHTS} (model.timm.weights is unset: the timm model "
                                     "has random weights, offline, or pass a train_backbone.py checkpoint)"])
    if model_cfg.get("weights"):
        path = os.fspath(model_cfg["weights"])
        return WeightsPlan(path, path, source="official", description=path)
    builtin = model_cfg.get("builtin_checkpoints") or {}
    rerank, backbone = builtin.get("rerank"), builtin.get("backbone")
    if rerank and os.path.isfile(rerank):
        return WeightsPlan(rerank, rerank, source="builtin",
                           description=f"built-in training run: {rerank} (all models)")
    if backbone and os.path.isfile(backbone):
        return WeightsPlan(backbone, None, rerank_backbone_from_global=True, source="builtin",
                           description=f"built-in training run: {backbone} (global models); "
                                       "CVNet re-ranking head: random",
                           warnings=[f"no re-ranking checkpoint at {rerank}: the CVNet re-ranking head "
                                     f"(conv2ds, cv_learner) is random — its numbers are meaningless"])
    looked = ", ".join(p for p in (rerank, backbone) if p) or "nowhere (model.weights is unset)"
    return WeightsPlan(warnings=[f"weights: {RANDOM_WEIGHTS} (no checkpoint found; looked at {looked}). "
                                 "Train with the built-in training run or pass model.weights=<file>."])


def verify_weights(plan: WeightsPlan, expected: str | None) -> dict[str, str]:
    """{path: sha256} of every weights file ``plan`` uses; with ``expected`` (``model.weights_sha256``), each
    must have that hash, else a :class:`CheckpointError` naming the file and both hashes."""
    files = list(dict.fromkeys(p for p in (plan.global_path, plan.rerank_path) if p))
    if expected and not files:
        raise ConfigError(f"model.weights_sha256 is set, but this run uses no weights file ({plan.description})")
    hashes = {}
    for path in files:
        if not os.path.isfile(path):
            continue  # building the model says it is missing, with where to get the official files
        hashes[path] = file_sha256(path)
        if expected and hashes[path] != expected.lower():
            raise CheckpointError(f"weights file {path} has sha256 {hashes[path]}, but model.weights_sha256 is "
                                  f"{expected.lower()}: it is not the expected file (damaged, replaced or another "
                                  "release). Fetch the file again, or correct model.weights_sha256.")
        logger.info("weights %s: sha256 %s%s", path, hashes[path], " (verified)" if expected else "")
    return hashes


def needed_models(methods: Sequence[str]) -> set[str]:
    """The models ('cvnet_global', 'cvnet_rerank', 'superglobal') the methods need (names checked by the
    schema: helpers.schemas.EVAL_METHODS)."""
    needed = set()
    for m in methods:
        needed.add(METHOD_BASE[m])
        if m == "cvnet_rerank":
            needed.add("cvnet_rerank")
    return needed


def build_models(*, needed: set[str], model_cfg: Mapping[str, Any], plan: WeightsPlan, seed: int,
                 device: torch.device) -> dict[str, nn.Module]:
    """The models in ``needed``, loaded per ``plan``, in eval mode on ``device``. Random weights come from the
    seed ``seed * 1000 + SEED_OFFSETS[kind]``, whatever else is built."""
    depth = int(model_cfg["depth"])
    kw = {"depth": depth, "device": device, "warn_random": False}  # the plan's warnings say it louder
    models: dict[str, nn.Module] = {}
    for kind in CVNET_GLOBAL_KINDS:
        if kind in needed:
            options = dict(model_cfg.get("superglobal") or {}) if kind == "superglobal" else None
            models[kind] = build_model(kind, weights=plan.global_path, seed=seed * 1000 + SEED_OFFSETS[kind],
                                       options=options, **kw)
    if "cvnet_rerank" in needed:
        rerank = build_model("cvnet_rerank", weights=plan.rerank_path,
                             seed=seed * 1000 + SEED_OFFSETS["cvnet_rerank"], **kw)
        if plan.rerank_path is None and plan.rerank_backbone_from_global:
            source = models.get("cvnet_global")
            if source is None:
                source = build_model("cvnet_global", weights=plan.global_path, seed=None, **kw)
            copy_backbone(source=source, target=rerank)
        models["cvnet_rerank"] = rerank
    if "timm_global" in needed:
        timm_cfg = model_cfg.get("timm") or {}
        if not timm_cfg.get("arch"):
            raise ConfigError("methods include timm_global: set model.timm.arch=timm:<name> (and model.timm.weights "
                              "for a trained run)")
        options = None if timm_cfg.get("weights") else {"pooling": timm_cfg["pooling"], "dim": timm_cfg["dim"]}
        models["timm_global"] = build_model(timm_cfg["arch"], weights=timm_cfg.get("weights"),
                                            seed=seed * 1000 + SEED_OFFSETS["timm_global"], options=options,
                                            device=device, warn_random=timm_cfg.get("weights") is None)
    return models


def scales_for(kind: str, model_cfg: Mapping[str, Any]) -> tuple[float, ...]:
    """The dataset's image scales for a global model's extraction."""
    # CVNet: the dataset resizes the uint8 image per scale; SuperGlobal does its Scale-GeM inside the model
    if kind != "cvnet_global":
        return (1.0,)
    return tuple(float(s) for s in model_cfg.get("cvnet_scales", CVNET_TEST_SCALES))


@dataclass
class ModelSet:
    """The models of a run and where their weights came from: the weights ``plan``, the sha256 of each weights file
    (``sha256``), and per kind the model (eval mode), its state hash (``hashes``, the feature cache's key) and what
    its weights are (``sources``, named in the engine's errors: NaN descriptors, too-small images)."""

    plan: WeightsPlan
    sha256: dict[str, str]
    models: dict[str, nn.Module]
    hashes: dict[str, str]
    sources: dict[str, str]


def load_models(*, needed: set[str], model_cfg: Mapping[str, Any], seed: int, device: torch.device,
                building: contextlib.AbstractContextManager[Any] | None = None) -> ModelSet:
    """Plan the weights (:func:`plan_weights`), check their files' sha256 (:func:`verify_weights`), then build the
    models in ``needed`` (:func:`build_models`) inside ``building`` (e.g. a timer's stage: a refused weights file
    builds nothing)."""
    plan = plan_weights(model_cfg, needed)
    sha256 = verify_weights(plan, model_cfg.get("weights_sha256"))
    with building or contextlib.nullcontext():
        models = build_models(needed=needed, model_cfg=model_cfg, plan=plan, seed=seed, device=device)
        hashes = {k: state_dict_hash(m) for k, m in models.items()}
    sources = {k: plan.global_path or f"random (seed {seed * 1000 + SEED_OFFSETS[k]})" for k in models}
    if "timm_global" in models:
        sources["timm_global"] = (model_cfg.get("timm") or {}).get("weights") or \
            f"random (seed {seed * 1000 + SEED_OFFSETS['timm_global']})"
    return ModelSet(plan=plan, sha256=sha256, models=models, hashes=hashes, sources=sources)
