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

from models.checkpoint import load_official_checkpoint
from models.cvnet import CVNetGlobal, CVNetRerank
from models.superglobal import SuperGlobal, SuperGlobalRerank

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
