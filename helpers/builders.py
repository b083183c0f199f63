"""One model and weights builder and one vector-database factory, used by evaluation, retrieval, training and the
benchmarks.

    model = build_model("superglobal", depth=50, weights="weights/CVPR2022_CVNet_R50.pyth")
    rerank = build_model("cvnet_rerank", depth=50, weights=None, seed=3)     # random weights, loud warning
    db = make_database("faiss", 2048)
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common.convention import OFFICIAL_CONVENTION, TORCHVISION_CONVENTION, InputConvention
from helpers.config import ConfigError
from models.checkpoint import CheckpointError, load_official_checkpoint, official_state_dict, read_checkpoint
from models.cvnet import CVNetGlobal, CVNetRerank
from models.superglobal import SuperGlobal, SuperGlobalRerank
from models.timm_global import FeatureMapGlobal, TimmGlobal

log = logging.getLogger(__name__)

#: What :func:`build_model` builds, and the class of each.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "cvnet_global": CVNetGlobal,
    "superglobal": SuperGlobal,
    "cvnet_rerank": CVNetRerank,
}
#: Other names accepted for a kind: the short names of the retrieval CLI and the class names saved in indexes.
MODEL_ALIASES = {"cvnet": "cvnet_global", "CVNetGlobal": "cvnet_global", "SuperGlobal": "superglobal",
                 "CVNetRerank": "cvnet_rerank"}
#: The kinds that return global descriptors.
GLOBAL_KINDS = ("cvnet_global", "superglobal")

OFFICIAL_WEIGHTS_HINT = (
    "For meaningful results download the official weights CVPR2022_CVNet_R50.pyth (or CVPR2022_CVNet_R101.pyth) "
    "from the CVNet release (https://github.com/sungonce/CVNet, Google Drive links in its README), put the file "
    "under weights/, and pass it as weights= (command line: --weights weights/CVPR2022_CVNet_R50.pyth). "
    "SuperGlobal uses the very same files."
)

DATABASE_BACKENDS = ("tensor", "faiss", "pinecone")


def model_kind(kind: str) -> str:
    """The canonical kind (``cvnet_global``, ``superglobal``, ``cvnet_rerank``) of a kind or alias."""
    kind = MODEL_ALIASES.get(kind, kind)
    if kind not in MODEL_CLASSES:
        raise ValueError(f"model kind must be one of {sorted(MODEL_CLASSES)} (or {sorted(MODEL_ALIASES)}), "
                         f"got {kind!r}")
    return kind


def kind_of(model: nn.Module) -> str:
    """The kind of a built model (the inverse of :data:`MODEL_CLASSES`)."""
    for kind, cls in MODEL_CLASSES.items():
        if type(model) is cls:
            return kind
    raise TypeError(f"expected one of {[c.__name__ for c in MODEL_CLASSES.values()]}, got {type(model).__name__}")


def warn_random_weights(what: str, seed: int | None) -> None:
    """The loud warning every random-weights model gets."""
    log.warning("\n%s\n!! NO WEIGHTS: %s uses RANDOM weights (seed %s). Rankings are MEANINGLESS (for testing "
                "the pipeline only).\n!! %s\n%s", "!" * 100, what, seed, OFFICIAL_WEIGHTS_HINT, "!" * 100)


def build_model(
    kind: str,
    *,
    depth: int = 50,
    weights: str | os.PathLike | Mapping | None = None,
    seed: int | None = 0,
    options: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    warn_random: bool = True,
    eval_mode: bool = True,
) -> nn.Module:
    """A CVNet-Global, SuperGlobal or CVNet-Rerank model.

    ``weights``: an official-layout checkpoint (``CVPR2022_CVNet_R50/R101.pyth`` or this project's training
    output), or its state dict, loaded strictly; it sets the input convention. Without it the weights are
    random, drawn from ``seed`` (the global RNG is left untouched; ``seed=None`` draws from the global RNG),
    with a loud warning unless ``warn_random=False``. ``options``: the class's constructor options (SuperGlobal's
    gemp / rgem / sgem / relup / scales / antialias, ``reduction_dim``, ...).
    """
    if kind.startswith(TIMM_ARCH_PREFIX):
        return _build_timm(kind, weights=weights, seed=seed, options=options, device=device,
                           warn_random=warn_random, eval_mode=eval_mode)
    kind = model_kind(kind)
    cls = MODEL_CLASSES[kind]
    opts = dict(options or {})
    if "scales" in opts:
        opts["scales"] = tuple(float(s) for s in opts["scales"])
    if seed is None:
        model = cls(depth=depth, **opts)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(depth=depth, **opts)
    if weights is not None:
        load_official_checkpoint(model, weights)
    elif warn_random:
        warn_random_weights(f"{cls.__name__} (ResNet-{depth})", seed)
    if device is not None:
        model.to(device)
    return model.eval() if eval_mode else model


def _build_timm(kind: str, *, weights: Any, seed: int | None, options: Mapping[str, Any] | None,
                device: torch.device | str | None, warn_random: bool, eval_mode: bool) -> nn.Module:
    """``timm:<name>``: a trained :func:`timm_global_checkpoint` (``weights``) or a random
    :class:`models.TimmGlobal` (``options``: pooling, dim, pretrained_file)."""
    if weights is not None:
        model = load_timm_global(weights)
        if model.model_name != kind[len(TIMM_ARCH_PREFIX):]:
            raise CheckpointError(f"{weights} holds timm:{model.model_name}, not {kind}")
    else:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = TimmGlobal(kind[len(TIMM_ARCH_PREFIX):], **dict(options or {}))
        if warn_random and not (options or {}).get("pretrained_file"):
            warn_random_weights(f"TimmGlobal ({kind})", seed)
    if device is not None:
        model.to(device)
    return model.eval() if eval_mode else model.train()


def copy_backbone(*, source: nn.Module, target: nn.Module) -> None:
    """Copy the shared ResNet stages of ``source.backbone`` into ``target.backbone`` (every target key must be
    present), and the input convention with them."""
    src = source.backbone.state_dict()
    dst = target.backbone.state_dict()
    missing = [k for k in dst if k not in src]
    if missing:
        raise ValueError(f"backbone copy: source lacks {missing[:5]}")
    target.backbone.load_state_dict({k: src[k] for k in dst}, strict=True)
    target.input_convention = source.input_convention


def build_superglobal_reranker(*, M: int = 400, K: int = 9, beta: float = 0.15) -> SuperGlobalRerank:
    """SuperGlobal's training-free re-ranking (no weights)."""
    return SuperGlobalRerank(M=int(M), K=int(K), beta=float(beta))


# --------------------------------------------------------------------------------------------------------------
# Vector databases
# --------------------------------------------------------------------------------------------------------------


def make_database(
    backend: str,
    dim: int,
    *,
    device: torch.device | str = "cpu",
    index: str = "flat",
    host: str | None = None,
    index_name: str | None = None,
    namespace: str = "",
    api_key: str | None = None,
    **kwargs: Any,
) -> Any:
    """An empty local database (``"tensor"``: :class:`TensorVectorDB` on ``device``; ``"faiss"``:
    :class:`FaissVectorDB` with ``index``) or a Pinecone namespace (``"pinecone"``; API key from ``api_key`` or
    ``PINECONE_API_KEY``, host / index name from the arguments or ``PINECONE_HOST`` / ``PINECONE_INDEX``).
    ``kwargs`` go to the back-end's constructor. The back-ends are imported here, on use."""
    if backend == "tensor":
        from helpers.vector_db.tensor import TensorVectorDB

        return TensorVectorDB(dim, device=device, **kwargs)
    if backend == "faiss":
        from helpers.vector_db.faiss import FaissVectorDB

        return FaissVectorDB(dim, index=index, **kwargs)
    if backend == "pinecone":
        from helpers.vector_db.pinecone import PineconeVectorDB

        return PineconeVectorDB(dim, index_name=index_name, host=host, api_key=api_key, namespace=namespace,
                                **kwargs)
    raise ValueError(f"database backend must be one of {', '.join(DATABASE_BACKENDS)}, got {backend!r}")


def backend_name(database: Any) -> str:
    """``"tensor"``, ``"faiss"`` or ``"pinecone"`` for a database of those classes; else a TypeError."""
    from helpers.vector_db.faiss import FaissVectorDB
    from helpers.vector_db.pinecone import PineconeVectorDB
    from helpers.vector_db.tensor import TensorVectorDB

    for name, cls in (("tensor", TensorVectorDB), ("faiss", FaissVectorDB), ("pinecone", PineconeVectorDB)):
        if isinstance(database, cls):
            return name
    raise TypeError(f"{type(database).__name__} is not one of this project's databases (TensorVectorDB, "
                    "FaissVectorDB, PineconeVectorDB)")


def load_database(backend: str, path: str | os.PathLike) -> Any:
    """A local database saved with ``save`` (``tensor`` or ``faiss``)."""
    if backend == "tensor":
        from helpers.vector_db.tensor import TensorVectorDB

        return TensorVectorDB.load(Path(path))
    if backend == "faiss":
        from helpers.vector_db.faiss import FaissVectorDB

        return FaissVectorDB.load(Path(path))
    raise ValueError(f"only local databases (tensor, faiss) are loaded from files, got {backend!r}")


# --------------------------------------------------------------------------------------------------------------
# Training initialisation
# --------------------------------------------------------------------------------------------------------------

#: The official-layout keys of CVNet-Rerank's trainable head (the rest of a checkpoint is the backbone).
RERANK_HEAD_PREFIXES = ("conv2ds.", "cv_learner.")


#: ``model.arch`` of train_backbone.py: CVNet-Global's ResNet, or ``timm:<model name>`` (:class:`TimmGlobal`).
RESNET_ARCH = "resnet"
TIMM_ARCH_PREFIX = "timm:"
#: The ``format`` of a trained TimmGlobal's weights file (the official CVNet key layout only fits the ResNet).
TIMM_CHECKPOINT_FORMAT = "timm-global-v1"


def timm_model_name(arch: str) -> str | None:
    """The timm model name of a ``model.arch`` value (``"timm:resnet50"`` -> ``"resnet50"``), None for
    ``"resnet"``; a ConfigError for anything else."""
    if arch == RESNET_ARCH:
        return None
    if arch.startswith(TIMM_ARCH_PREFIX) and len(arch) > len(TIMM_ARCH_PREFIX):
        return arch[len(TIMM_ARCH_PREFIX):]
    raise ConfigError(f"model.arch must be {RESNET_ARCH!r} or 'timm:<timm model name>', got {arch!r}")


def global_dim(model: nn.Module) -> int:
    """The descriptor dimension D of a global model (CVNetGlobal's fc, a FeatureMapGlobal's output)."""
    if isinstance(model, FeatureMapGlobal):
        return int(model.dim)
    return int(model.head.fc.out_features)


def build_training_backbone(*, depth: int, reduction_dim: int | None, key_momentum: float,
                            imagenet_weights: bool | str = "auto", init_checkpoint: str | os.PathLike | None = None,
                            zero_init_residual: bool = False, arch: str = RESNET_ARCH, pooling: str = "gem",
                            pretrained_file: str | os.PathLike | None = None) -> nn.Module:
    """The global model to train (train mode, on the CPU): ``arch="resnet"`` is CVNet-Global (its own momentum
    key encoder inside), ``arch="timm:<name>"`` a :class:`TimmGlobal` (see :func:`build_training_timm`).

    CVNet-Global is initialised from the first that applies:

    - ``init_checkpoint``: an official-layout checkpoint (its own input convention);
    - ``imagenet_weights`` true, or ``"auto"`` when torchvision's ImageNet weights are in the torch hub cache:
      those weights (RGB input convention); ``"auto"`` falls back to random when they are absent;
    - random weights (the releases' BGR convention), the bottlenecks zero-initialised if ``zero_init_residual``.

    Random weights come from the global RNG (seed it first: every rank must draw the same).
    """
    choice = str(imagenet_weights).lower()
    if choice not in ("auto", "true", "false"):
        raise ValueError(f"model.imagenet_weights must be true, false or auto, got {imagenet_weights!r}")
    name = timm_model_name(arch)
    if name is not None:
        return build_training_timm(name, pooling=pooling, dim=reduction_dim, imagenet_weights=choice,
                                   pretrained_file=pretrained_file, init_checkpoint=init_checkpoint)
    if pooling != "gem" or pretrained_file is not None or reduction_dim is None:
        raise ConfigError("model.arch=resnet is CVNet-Global (GeM, fc to model.reduction_dim, ImageNet weights "
                          "through model.imagenet_weights): model.pooling=gem, model.pretrained_file=null and a "
                          "model.reduction_dim are required; the other values are for model.arch=timm:<name>")
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
                        init_checkpoint: str | os.PathLike | None = None) -> TimmGlobal:
    """A :class:`TimmGlobal` to train (train mode, CPU; ``dim``: its projection, None for none), from the first
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
        held = (model.model_name, model.pooling, None if model.projection is None else model.dim)
        if held != (name, pooling, dim):
            raise ConfigError(f"model.init_checkpoint {init_checkpoint} holds timm:{held[0]} (pooling {held[1]}, "
                              f"dim {held[2]}), not the configured timm:{name} (pooling {pooling}, dim {dim})")
        log.info("initialised from %s", init_checkpoint)
        return model.train()
    pretrained = imagenet_weights == "true" or pretrained_file is not None
    model = TimmGlobal(name, pretrained=pretrained, pooling=pooling, dim=dim, pretrained_file=pretrained_file)
    log.info("timm:%s, %s: %s (input convention RGB, mean %s)", name, pooling,
             f"pretrained weights from {pretrained_file or 'timm'}" if pretrained else "random initialisation",
             model.input_convention.mean)
    return model.train()


def timm_global_checkpoint(model: TimmGlobal, **extra: Any) -> dict[str, Any]:
    """A trained TimmGlobal's weights file as a dict (tensors and builtins only: weights_only loads it):
    ``format`` (:data:`TIMM_CHECKPOINT_FORMAT`), ``arch`` (``"timm:<name>"``), ``model_name``, ``pooling``,
    ``dim`` (the projection's, None without one), ``reduction_dim`` (the descriptor's D), ``model_state``
    (``model.state_dict()``), ``input_convention``, then ``extra``."""
    return {"format": TIMM_CHECKPOINT_FORMAT, "arch": TIMM_ARCH_PREFIX + model.model_name,
            "model_name": model.model_name, "pooling": model.pooling,
            "dim": None if model.projection is None else int(model.dim), "reduction_dim": int(model.dim),
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "input_convention": model.input_convention.to_dict(), **extra}


def is_timm_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a loaded weights file is a :func:`timm_global_checkpoint`."""
    return isinstance(checkpoint, Mapping) and checkpoint.get("format") == TIMM_CHECKPOINT_FORMAT


def load_timm_global(checkpoint: str | os.PathLike | Mapping[str, Any]) -> TimmGlobal:
    """The TimmGlobal of a :func:`timm_global_checkpoint` (path or dict), loaded strictly, in eval mode (the
    architecture's random initialisation is drawn on a forked RNG: the global one is left untouched)."""
    source = "checkpoint" if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    if not is_timm_checkpoint(checkpoint):
        raise CheckpointError(f"{source} is not a trained timm global model (format {TIMM_CHECKPOINT_FORMAT})")
    with torch.random.fork_rng(devices=[]):
        model = TimmGlobal(checkpoint["model_name"], pooling=checkpoint["pooling"], dim=checkpoint["dim"])
    model.load_state_dict(checkpoint["model_state"], strict=True)
    model.input_convention = InputConvention.from_dict(checkpoint["input_convention"])
    return model.eval()


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
        raise FileNotFoundError(
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
        raise ValueError(f"model.head_init must be random or checkpoint, got {head_init!r}")
    if head_init == "checkpoint":
        if not any(k.startswith(RERANK_HEAD_PREFIXES) for k in backbone["model_state"]):
            raise ValueError("model.head_init=checkpoint but the backbone checkpoint has no conv2ds/cv_learner")
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
