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
from torch import nn

from common.errors import InvalidValueError
from models.checkpoint import CheckpointError, load_official_checkpoint
from models.cvnet import CVNetGlobal, CVNetRerank
from models.superglobal import SuperGlobal, SuperGlobalRerank
from models.timm_global import TIMM_ARCH_PREFIX, FeatureMapGlobal, TimmGlobal, load_timm_global
from models.weights import OFFICIAL_WEIGHTS_HINT

log = logging.getLogger(__name__)

#: The kinds of model, and the class of each: the one name a kind has everywhere (configs, caches, messages).
#: A timm model is named ``timm:<timm model name>`` when it is built; its kind is ``timm_global``.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "cvnet_global": CVNetGlobal,
    "superglobal": SuperGlobal,
    "cvnet_rerank": CVNetRerank,
    "timm_global": TimmGlobal,
}
#: Other names accepted for a kind: the short names of the retrieval CLI and the class names saved in indexes.
MODEL_ALIASES = {"cvnet": "cvnet_global", "CVNetGlobal": "cvnet_global", "SuperGlobal": "superglobal",
                 "CVNetRerank": "cvnet_rerank"}
#: The kinds that return global descriptors.
GLOBAL_KINDS = ("cvnet_global", "superglobal", "timm_global")
#: The global kinds built from the CVNet release's weights (one file feeds both).
CVNET_GLOBAL_KINDS = ("cvnet_global", "superglobal")

DATABASE_BACKENDS = ("tensor", "faiss", "pinecone")


def model_kind(name: str) -> str:
    """The kind (a key of :data:`MODEL_CLASSES`) of a model name: a kind, an alias or ``timm:<name>``."""
    if name.startswith(TIMM_ARCH_PREFIX) and len(name) > len(TIMM_ARCH_PREFIX):
        return "timm_global"
    kind = MODEL_ALIASES.get(name, name)
    if kind not in MODEL_CLASSES or kind == "timm_global":
        names = sorted(k for k in MODEL_CLASSES if k != "timm_global") + sorted(MODEL_ALIASES)
        raise InvalidValueError(f"model must be one of {names} or {TIMM_ARCH_PREFIX}<timm model name>, got {name!r}")
    return kind


def kind_of(model: nn.Module, *, among: tuple[str, ...] = tuple(MODEL_CLASSES)) -> str:
    """The kind of a built model (the inverse of :data:`MODEL_CLASSES`); a TypeError unless it is one of
    ``among`` (e.g. :data:`GLOBAL_KINDS`)."""
    for kind in among:
        if type(model) is MODEL_CLASSES[kind]:
            return kind
    raise TypeError(f"expected a model of class {', '.join(MODEL_CLASSES[k].__name__ for k in among)}, got "
                    f"{type(model).__name__}")


def model_name(model: nn.Module) -> str:
    """What messages call a model: ``SuperGlobal ResNet-50``, ``TimmGlobal timm:resnet18``."""
    if isinstance(model, TimmGlobal):
        return f"{type(model).__name__} {TIMM_ARCH_PREFIX}{model.model_name}"
    return f"{type(model).__name__} ResNet-{model.depth}"


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
    if model_kind(kind) == "timm_global":
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
        raise InvalidValueError(f"backbone copy: source lacks {missing[:5]}")
    target.backbone.load_state_dict({k: src[k] for k in dst}, strict=True)
    target.input_convention = source.input_convention


def build_superglobal_reranker(*, M: int = 400, K: int = 9, beta: float = 0.15) -> SuperGlobalRerank:
    """SuperGlobal's training-free re-ranking (no weights)."""
    return SuperGlobalRerank(M=int(M), K=int(K), beta=float(beta))


# --------------------------------------------------------------------------------------------------------------
# Vector databases
# --------------------------------------------------------------------------------------------------------------


def faiss_device_options(device: torch.device | str | None) -> dict[str, Any]:
    """:class:`FaissVectorDB` options for ``device``: none for None (its defaults: a GPU when its faiss build sees
    one), ``use_gpu=False`` for the CPU, ``gpu_device=N`` for ``cuda:N`` (``cuda``: GPU 0; the GPU is used when
    faiss can, with a warning when it cannot)."""
    if device is None:
        return {}
    device = torch.device(device)
    if device.type != "cuda":
        return {"use_gpu": False}
    return {"gpu_device": device.index or 0}


def make_database(
    backend: str,
    dim: int,
    *,
    device: torch.device | str | None = None,
    index: str = "flat",
    host: str | None = None,
    index_name: str | None = None,
    namespace: str = "",
    api_key: str | None = None,
    **kwargs: Any,
) -> Any:
    """An empty local database (``"tensor"``: :class:`TensorVectorDB` on ``device``, default CPU; ``"faiss"``:
    :class:`FaissVectorDB` with ``index``, searching on ``device`` as :func:`faiss_device_options` says) or a
    Pinecone namespace (``"pinecone"``; API key from ``api_key`` or ``PINECONE_API_KEY``, host / index name from
    the arguments or ``PINECONE_HOST`` / ``PINECONE_INDEX``). ``kwargs`` go to the back-end's constructor (and
    win over what ``device`` implies). The back-ends are imported here, on use."""
    if backend == "tensor":
        from helpers.vector_db.tensor import TensorVectorDB

        return TensorVectorDB(dim, device=device if device is not None else "cpu", **kwargs)
    if backend == "faiss":
        from helpers.vector_db.faiss import FaissVectorDB

        return FaissVectorDB(dim, index=index, **{**faiss_device_options(device), **kwargs})
    if backend == "pinecone":
        from helpers.vector_db.pinecone import PineconeVectorDB

        return PineconeVectorDB(dim, index_name=index_name, host=host, api_key=api_key, namespace=namespace,
                                **kwargs)
    raise InvalidValueError(f"database backend must be one of {', '.join(DATABASE_BACKENDS)}, got {backend!r}")


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


def load_database(backend: str, path: str | os.PathLike, *, device: torch.device | str | None = None) -> Any:
    """A local database saved with ``save`` (``tensor`` or ``faiss``), placed for ``device`` as
    :func:`make_database` places a new one (None: the CPU, or faiss' default)."""
    if backend == "tensor":
        from helpers.vector_db.tensor import TensorVectorDB

        return TensorVectorDB.load(Path(path), device=device if device is not None else "cpu")
    if backend == "faiss":
        from helpers.vector_db.faiss import FaissVectorDB

        return FaissVectorDB.load(Path(path), **faiss_device_options(device))
    raise InvalidValueError(f"only local databases (tensor, faiss) are loaded from files, got {backend!r}")


def global_dim(model: nn.Module) -> int:
    """The descriptor dimension D of a global model (CVNetGlobal's fc, a FeatureMapGlobal's output)."""
    if isinstance(model, FeatureMapGlobal):
        return int(model.dim)
    return int(model.head.fc.out_features)


