"""What ``python retrieve.py build`` and ``query`` run: index a folder of images into a saved Retriever, build
the re-ranker a saved index asks for, and query it with one image."""
from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import InvalidValueError, MissingFileError, OutputExistsError, shorten
from common.io import printable_path
from datasets.transforms import check_image_file
from helpers.builders import (
    GLOBAL_KINDS,
    TIMM_ARCH_PREFIX,
    build_model,
    build_superglobal_reranker,
    global_dim,
    make_database,
    model_kind,
    model_name,
)
from helpers.distributed import resolve_device
from helpers.postprocess import PostProcessing
from helpers.retrieval.images import DEFAULT_MAX_SIDE, DEFAULT_MIN_SIDE, list_images
from helpers.retrieval.retriever import Hit, Retriever
from helpers.retrieval.saved import CONFIG_FILE, writer_lock
from helpers.vector_db.base import AbstractVectorDB
from models.timm_global import TimmGlobal
from models.weights import OFFICIAL_WEIGHTS_HINT

logger = logging.getLogger(__name__)

RERANKERS = ("none", "superglobal", "cvnet")


def build_index(
    *,
    images: str | os.PathLike,
    index_dir: str | os.PathLike,
    model: str = "superglobal",
    weights: str | os.PathLike | None = None,
    depth: int = 50,
    backend: str = "tensor",
    max_side: int | None = DEFAULT_MAX_SIDE,
    min_side: int | None = DEFAULT_MIN_SIDE,
    device: str = "cpu",
    tf32: bool = False,
    batch_size: int = 4,
    seed: int = 0,
    scales: Sequence[float] | None = None,
    overwrite: bool = False,
    skip_unreadable: bool = False,
    host: str | None = None,
    index_name: str | None = None,
    namespace: str = "",
    progress: bool = True,
    flip: bool = False,
    max_pixels: int | None = None,
) -> Retriever:
    """Index every image under ``images`` into ``index_dir`` (ids 0..n-1 in sorted path order); returns the
    :class:`Retriever`. ``model``: ``"superglobal"``, ``"cvnet"`` (CVNet-Global) or ``"timm:<timm model name>"``
    (a :class:`models.TimmGlobal`; ``weights`` a trained ``timm-global-v1`` file of train_backbone.py). Without
    ``weights`` the model is random (seeded, loudly warned: results meaningless). ``device``: auto, cpu, cuda or
    cuda:N (``tf32``: :func:`helpers.distributed.set_tf32`). ``flip``: flip test-time augmentation of every
    descriptor (recorded: queries get it too).

    ``scales``: the multi-scale factors (default: the model's, 0.7071, 1, 1.4142; ``[1.0]`` is single scale,
    about 3.5 times faster). An unreadable image (or one over ``max_pixels``, None: the reader's default) is an
    error naming it, unless ``skip_unreadable``. An existing index is replaced only with ``overwrite`` (for
    Pinecone: a namespace that already holds vectors), and only once the new one is saved: a build that fails
    leaves the old index as it was. Builds into one folder are refused while another runs.
    """
    index_dir = Path(index_dir)
    files = list_images(images, exclude=index_dir)
    if weights is not None and not Path(weights).is_file():
        raise MissingFileError(f"weights file not found: {printable_path(weights)}. {OFFICIAL_WEIGHTS_HINT}")
    torch_device = resolve_device(device, tf32=tf32)
    kind = model_kind(model)
    if kind not in GLOBAL_KINDS:
        raise InvalidValueError(f"a global model is one of {GLOBAL_KINDS[:2]}, 'cvnet' or "
                                f"{TIMM_ARCH_PREFIX}<timm model name>, got {shorten(model)}")
    with writer_lock(index_dir, wait=False):  # the check below and the save see the same folder: one build at a time
        if (index_dir / CONFIG_FILE).exists() and not overwrite:
            raise OutputExistsError(f"{printable_path(index_dir)} already holds an index: pass --overwrite to "
                                    "replace it")
        options = {"scales": list(scales)} if scales is not None and kind == "superglobal" else None
        net = build_model(model, depth=depth, weights=weights, seed=seed, options=options)
        extra = {"scales": tuple(scales)} if scales is not None and kind != "superglobal" else {}
        remote = {"host": host, "index_name": index_name} if backend == "pinecone" else None
        database, stale = _fresh_database(backend, global_dim(net), index_dir, overwrite=overwrite, **(remote or {}),
                                          namespace=namespace, device=torch_device)
        try:
            retriever = Retriever(net, database, device=torch_device, batch_size=batch_size, max_side=max_side,
                                  min_side=min_side, weights=weights, seed=None if weights is not None else seed,
                                  flip=flip, max_pixels=max_pixels, **extra)
            logger.info("indexing %d images from %s with %s%s", len(files), printable_path(images), model_name(net),
                        " (flip test-time augmentation)" if flip else "")
            ids = retriever.index(files, ids=range(len(files)), on_error="skip" if skip_unreadable else "raise",
                                  progress=progress)
            if int((ids >= 0).sum()) == 0:
                raise InvalidValueError(f"none of the {len(files)} images under {printable_path(images)} could be "
                                        "read")
            retriever.save(index_dir, remote=remote)
        except BaseException:
            if remote is not None:  # the namespace was empty: take back what this build wrote into it
                _clear(lambda: database, "the vectors of the failed build")
            raise
    for old in stale:  # the new index is saved: only now are the old vectors removed
        _clear(lambda old=old: make_database(backend, database.dim, **remote, namespace=old),
               f"the old vectors of namespace {old!r}")
    return retriever


def _fresh_database(backend: str, dim: int, index_dir: Path, *, overwrite: bool, host: str | None = None,
                    index_name: str | None = None, namespace: str = "", device: torch.device | None = None
                    ) -> tuple[AbstractVectorDB, list[str]]:
    """An empty database for a build, and the Pinecone namespaces to clear once the build is saved.

    Local back-ends: a new one on ``device`` (the old save stays until the new one commits). Pinecone:
    ``namespace`` when it is empty; when it holds vectors (``overwrite`` needed), a fresh namespace beside it, so
    that a build that fails leaves the old vectors where they were. Once saved, the build clears the asked
    namespace (if it held vectors) and the one the replaced index recorded (if another)."""
    if backend != "pinecone":
        return make_database(backend, dim, device=device), []
    database = make_database(backend, dim, host=host, index_name=index_name, namespace=namespace)
    stale = []
    if len(database):
        if not overwrite:
            raise OutputExistsError(f"the Pinecone namespace {namespace!r} already holds {len(database)} vectors: "
                                    "pass --overwrite to replace them, or use another --namespace")
        stale.append(namespace)
        fresh = f"{namespace or 'default'}.rebuild-{secrets.token_hex(4)}"
        logger.info("namespace %r holds %d vectors: building into namespace %r; the old vectors are removed once "
                    "the new index is saved", namespace, len(database), fresh)
        database = make_database(backend, dim, host=host, index_name=index_name, namespace=fresh)
    try:
        recorded = Retriever.read_config(index_dir)["database"]
    except (OSError, ValueError):
        recorded = {}
    same_index = recorded.get("host") == host and recorded.get("index_name") == index_name
    if recorded.get("backend") == "pinecone" and same_index and recorded.get("namespace") not in (
            *stale, database.namespace):
        stale.append(recorded["namespace"])
    return database, stale


def _clear(open_database: Callable[[], AbstractVectorDB], what: str) -> None:
    """Delete every vector of the database ``open_database()`` gives; a failure is a warning (the index that
    matters is saved already, or the error being raised says more)."""
    try:
        open_database().clear()
    except Exception as exc:  # noqa: BLE001 - clean-up only: never hide the build's own outcome
        logger.warning("could not remove %s (%s: %s): delete them yourself", what, type(exc).__name__, exc)



def rerank_source(index_dir: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                  rerank_weights: str | os.PathLike | None = None) -> tuple[str | None, int | None]:
    """Where the CVNet re-ranker of a saved index takes its weights: (checkpoint path, None) from
    ``rerank_weights``, else ``weights`` (the index's checkpoint, moved), else the checkpoint the index was built
    with (an official CVNet checkpoint holds both parts); (None, seed) for an index of random weights (the same
    seed). An index of a timm model has no CVNet part: ``rerank_weights`` is needed (ValueError)."""
    recorded = Retriever.read_config(index_dir)["model"]
    if rerank_weights is not None:
        return os.fspath(rerank_weights), None
    if recorded.get("class") == TimmGlobal.__name__:
        raise InvalidValueError(f"{index_dir} was built with a timm model ({TIMM_ARCH_PREFIX}"
                                f"{(recorded.get('options') or {}).get('model_name')}), whose weights hold no CVNet "
                                "re-ranking head: pass the CVNet checkpoint (rerank_weights=, --rerank-weights)")
    source = weights if weights is not None else recorded.get("weights")
    if source is not None:
        return os.fspath(source), None
    return None, recorded.get("seed") or 0


def reranker_for_index(
    index_dir: str | os.PathLike,
    kind: str,
    *,
    weights: str | os.PathLike | None = None,
    rerank_weights: str | os.PathLike | None = None,
    M: int | None = None,
    K: int | None = None,
    beta: float | None = None,
) -> nn.Module | None:
    """The re-ranker ``kind`` (``"none"`` -> None, ``"superglobal"``, ``"cvnet"``) for the index saved in
    ``index_dir``. SuperGlobal: ``M``, ``K``, ``beta`` (None: SuperGlobal's 400, 9, 0.15). CVNet: its weights
    from :func:`rerank_source` (``rerank_weights``, else the index's own checkpoint, ``weights`` if it moved,
    else random weights of the index's seed) at the index's ResNet depth."""
    if kind not in RERANKERS:
        raise InvalidValueError(f"rerank must be one of {RERANKERS}, got {shorten(kind)}")
    if kind == "none":
        return None
    if kind == "superglobal":
        return build_superglobal_reranker(**_given(M=M, K=K, beta=beta))
    source, seed = rerank_source(index_dir, weights=weights, rerank_weights=rerank_weights)
    depth = Retriever.read_config(index_dir)["model"].get("depth") or 50
    return build_model("cvnet_rerank", depth=depth, weights=source, seed=seed if seed is not None else 0)


def query_index(
    *,
    index_dir: str | os.PathLike,
    image: str | os.PathLike,
    k: int = 10,
    rerank: str = "none",
    bbox: Sequence[float] | None = None,
    weights: str | os.PathLike | None = None,
    rerank_weights: str | os.PathLike | None = None,
    device: str = "cpu",
    tf32: bool = False,
    rerank_top_k: int | None = None,
    mix: float | None = None,
    M: int | None = None,
    K: int | None = None,
    beta: float | None = None,
    post: PostProcessing | None = None,
    timings: dict[str, float] | None = None,
    max_pixels: int | None = None,
) -> tuple[list[Hit], Retriever]:
    """Query a saved index with one image: (hits best first, the retriever).

    ``rerank``: ``"none"``, ``"superglobal"`` or ``"cvnet"``, built by :func:`reranker_for_index` (``M``, ``K``,
    ``beta``; ``rerank_weights``); ``rerank_top_k`` and ``mix`` (None: the index's settings). ``post``: the
    post-processing (None: the index's recorded one, if any). ``weights`` points at the index's checkpoint if it
    moved since the build. ``timings``: filled with each stage's seconds (see :meth:`Retriever.query_batch`).
    ``max_pixels``: the most pixels an image may have (None: the reader's default). A ``k`` past the database
    size gives every entry.
    """
    if isinstance(image, (str, os.PathLike)):  # a missing, damaged or oversized query is said before any model loads
        check_image_file(image, max_pixels=max_pixels)
    reranker = reranker_for_index(index_dir, rerank, weights=weights, rerank_weights=rerank_weights, M=M, K=K,
                                  beta=beta)
    retriever = Retriever.load(index_dir, weights=weights, reranker=None, device=resolve_device(device, tf32=tf32),
                               **_given(rerank_top_k=rerank_top_k, mix=mix, max_pixels=max_pixels))
    source: tuple[str | None, int | None] = (None, None)
    if rerank == "cvnet":
        source = rerank_source(index_dir, weights=weights, rerank_weights=rerank_weights)
    retriever.set_reranker(reranker, weights=source[0], seed=source[1])  # what errors name its weights by
    return retriever.query(image, k, bbox=bbox, post=post, timings=timings), retriever


def _given(**values: Any) -> dict[str, Any]:
    """The keyword arguments that were given (not None), so that the callee's defaults apply to the rest."""
    return {name: value for name, value in values.items() if value is not None}
