"""The retrieval front door: index your own images and query them, with optional re-ranking. No training needed.

    model = build_model("superglobal", depth=50, weights="weights/CVPR2022_CVNet_R50.pyth")   # helpers.builders
    retriever = Retriever(model, TensorVectorDB(2048), reranker=SuperGlobalRerank(),
                          weights="weights/CVPR2022_CVNet_R50.pyth")
    retriever.index(["photos/a.jpg", "photos/b.jpg"])          # -> ids tensor([0, 1])
    for hit in retriever.query("photos/query.jpg", k=10):       # best first
        print(hit.id, hit.score, hit.path)
    retriever.save("my_index")                                  # database + retriever.json (written last)
    retriever = Retriever.load("my_index")                      # rebuilds the model and the re-ranker

:func:`build_index` and :func:`query_index` are what ``python retrieve.py build`` / ``query`` run.

Images are uint8 (H, W, 3) arrays in **BGR** order (OpenCV's, as both releases read them) or paths, read with
:func:`datasets.transforms.read_image`. An RGB array is accepted only with an explicit ``channel_order="RGB"``.
Each image is downscaled (INTER_AREA) so that its longer side is at most ``max_side`` (the revisited
benchmarks are at most 1024 a side), and a short side below ``min_side`` is enlarged so that every scale of the
multi-scale descriptor still leaves a stage-4 map large enough for Regional-GeM's 5 x 5 reflection padding;
the enlargement never takes the long side past ``max_side`` (see :func:`fit_sides`).
The model's input convention (channel order, mean, std) is read from ``model.input_convention``.

A save (:meth:`Retriever.save`) is atomic as a whole: every file of it has a name of its own (``database-<id>.pt``,
...), and ``retriever.json``, written last, names them with their sha256. A crash at any point leaves the old
save or the new one loadable, and :meth:`Retriever.load` re-reads ``retriever.json`` when a concurrent save
replaced the files it named, so concurrent readers never fail. Writers to one folder take turns (a lock file).

The work is done by the evaluation's engine: descriptors by :func:`helpers.extraction.extract_global_descriptors`
(the prepared images wrapped in :class:`helpers.extraction.ImageArrays`), CVNet maps by
:class:`helpers.extraction.ReducedMapStore`, pair scores by :class:`helpers.reranking.CVNetPairScorer`.

Re-ranking (optional):

- :class:`models.superglobal.SuperGlobalRerank` runs over the database (any :class:`AbstractVectorDB`).
- :class:`models.cvnet.CVNetRerank` re-scores the top ``rerank_top_k`` global candidates with
  ``global cosine + mix * CVNet score`` (CVNet's final similarity, mix 0.5), re-sorted among themselves; the
  rest of the global ranking follows. Database feature maps are recomputed from the image path stored in each
  entry's metadata (``"path"``), with an in-memory LRU cache of the reduced maps keyed by id.

Post-processing (optional, ``post=`` a :class:`helpers.postprocess.PostProcessing`): α-DBA, α-QE and k-reciprocal
re-ranking of each query's global shortlist (its top ``post.shortlist`` candidates with their stored vectors),
applied first; the re-ranker, if any, then works over the post-processed order (see :meth:`Retriever.query_batch`).
:func:`reranker_for_index` builds the re-ranker of a saved index (what ``retrieve.py query`` and ``demo.py`` use).

Flip test-time augmentation (``flip=True``) describes every image, indexed or queried, as
``L2(desc(x) + desc(flip x))``; the index records it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from common.constants import CVNET_RERANK_TOP_K, CVNET_SCORE_WEIGHT, CVNET_TEST_SCALES
from common.convention import InputConvention
from common.io import atomic_torch_save, atomic_write, file_sha256
from common.timing import timed
from datasets.folder import IMAGE_EXTENSIONS
from datasets.transforms import crop_query, downscale_to_max_side, enlarge_within, read_image, to_tensor
from helpers.builders import (
    GLOBAL_KINDS,
    OFFICIAL_WEIGHTS_HINT,
    TIMM_ARCH_PREFIX,
    backend_name,
    build_model,
    build_superglobal_reranker,
    global_dim,
    kind_of,
    load_database,
    make_database,
    model_kind,
    timm_global_checkpoint,
)
from helpers.distributed import resolve_device
from helpers.extraction import (
    MIN_SIDE,
    ImageArrays,
    ReducedMapStore,
    extract_global_descriptors,
    fast_runner,
    state_dict_hash,
)
from helpers.postprocess import PostProcessing, post_scores
from helpers.reranking import CVNetPairScorer, apply_cvnet_rerank
from helpers.vector_db.base import AbstractVectorDB, CorruptIndexError, as_id_vector, check_metadata, check_unique
from models.checkpoint import OFFICIAL_CONVENTION, save_official_checkpoint
from models.cvnet import CVNetRerank
from models.superglobal import SuperGlobalRerank
from models.timm_global import TimmGlobal

logger = logging.getLogger(__name__)

#: Short side below which an image is enlarged (see :data:`helpers.extraction.MIN_SIDE`: Regional-GeM's padding).
DEFAULT_MIN_SIDE = MIN_SIDE
DEFAULT_MAX_SIDE = 1024
PATH_KEY = "path"
CONFIG_FILE = "retriever.json"
FORMAT_NAME = "helpers.retrieval.Retriever"
FORMAT_VERSION = 1
_DATABASE_SUFFIX = {"tensor": ".pt", "faiss": ".faiss"}
_ADD_EVERY = 256  # descriptors accumulated before one database write (bounds memory and lost work)
RERANKERS = ("none", "superglobal", "cvnet")
#: :func:`global_kind` of a :class:`models.TimmGlobal`.
TIMM_KIND = "timm"


class _Recorded:
    """The default of ``Retriever.load(reranker=...)``: the re-ranker the save recorded (None is "no re-ranker")."""

    def __repr__(self) -> str:
        return "RECORDED"


RECORDED: Any = _Recorded()
_LOCK_FILE = ".retriever.lock"
_LOAD_ATTEMPTS = 50  # re-reads of retriever.json while concurrent saves keep replacing the files it names
#: The files a save writes (``<part>-<save id>.<ext>``), those of saves before per-save names, and the temporary
#: files of an interrupted write of either: what a later save may remove once its retriever.json names others.
_SAVE_FILE = re.compile(r"^(database|model|reranker)-[0-9a-f]+-[0-9a-f]{8}\.(pt|faiss|pth)$")
_LEGACY_FILES = ("database.pt", "database.faiss", "database.faiss.json")
_TEMP_FILE = re.compile(r"^\.(database|model|reranker|retriever)[-.].*\.tmp$")


@dataclass(frozen=True)
class Hit:
    """One result of a query.

    ``score`` is what the ranking used at that position: the global cosine without re-ranking, SuperGlobal's
    (s1 + s2) / 2 or ``global + mix * CVNet score`` for re-ranked positions. ``global_score`` is always the
    cosine of the global descriptors (about 1 for an exact duplicate).
    """

    id: int
    score: float
    metadata: dict[str, Any] | None = None
    global_score: float | None = None

    @property
    def path(self) -> str | None:
        """The indexed image file, when it was indexed from a path."""
        return None if self.metadata is None else self.metadata.get(PATH_KEY)


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def load_bgr(image: str | os.PathLike | np.ndarray, *, channel_order: str = "BGR") -> np.ndarray:
    """A path (read with OpenCV) or a uint8 (H, W, 3) array in ``channel_order`` -> uint8 (H, W, 3) BGR."""
    if channel_order not in ("BGR", "RGB"):
        raise ValueError(f"channel_order must be 'BGR' or 'RGB', got {channel_order!r}")
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected an image path or a uint8 (H, W, 3) numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a colour image of shape (H, W, 3), got {image.shape} "
                         "(convert grey images with cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of shape {image.shape}")
    return np.ascontiguousarray(image[:, :, ::-1]) if channel_order == "RGB" else image


def prepare_image(
    img: np.ndarray,
    *,
    max_side: int | None,
    min_side: int | None,
    bbox: Sequence[float] | None = None,
) -> np.ndarray:
    """Downscale to ``max_side``, crop the query box (given in the original image's pixels), enlarge to
    ``min_side`` without passing ``max_side`` (:func:`datasets.transforms.enlarge_within`). The crop follows the
    downscale so that a query is seen at the scale of the database images."""
    img, factor = downscale_to_max_side(img, max_side)
    if bbox is not None:
        box = np.asarray(bbox, dtype=np.float64).reshape(-1)
        if box.shape != (4,) or not np.isfinite(box).all():
            raise ValueError(f"bbox must be 4 finite numbers (x1, y1, x2, y2), got {bbox!r}")
        img = crop_query(img, box * factor)
    return enlarge_within(img, min_side=min_side, max_side=max_side)


def list_images(
    root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS, exclude: str | os.PathLike | None = None
) -> list[Path]:
    """Image files under ``root`` (recursive, extension case-insensitive, sorted), skipping anything under
    ``exclude`` (the index folder, when it lies inside the image folder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)
    skip = Path(exclude).resolve() if exclude is not None else None
    files = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in exts:
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        files.append(path)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(exts)}) found under {root}")
    return files


class StoredImages(Dataset):
    """The database's images by id, for :class:`ReducedMapStore`: item ``id`` is ``[(3, H, W)]``, the image read
    back from the path stored in the entry's metadata, prepared as at indexing time (scale 1.0).

    :meth:`load_paths` reads the paths of many ids in one metadata request (a remote database answers it once)
    and names an id that has none; an id not loaded that way is looked up on its own.
    """

    def __init__(self, database: AbstractVectorDB, *, convention: Any, max_side: int | None,
                 min_side: int | None) -> None:
        self.database, self.convention = database, convention
        self.max_side, self.min_side = max_side, min_side
        self._paths: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.database)

    @property
    def names(self) -> Mapping[int, str]:
        """id -> image file, for the ids read so far (what errors call the images)."""
        return self._paths

    def load_paths(self, ids: Iterable[int]) -> None:
        """Read the stored paths of ``ids`` (replacing those read before, which may be stale by now)."""
        ids = list(dict.fromkeys(int(i) for i in ids))
        self._paths = {}
        if ids:
            self._add_paths(ids)

    def _add_paths(self, ids: list[int]) -> None:
        for i, entry in zip(ids, self.database.get_metadata(ids)):
            path = None if entry is None else entry.get(PATH_KEY)
            if not path:
                raise ValueError(
                    f"database id {i} has no stored image path (it was indexed from an array): CVNet "
                    "re-ranking recomputes database feature maps from the image files. Index paths instead, "
                    "or re-rank with SuperGlobalRerank, which needs only the stored descriptors.")
            self._paths[i] = path

    def __getitem__(self, i: int) -> list[Tensor]:
        i = int(i)
        if i not in self._paths:
            self._add_paths([i])
        img = prepare_image(read_image(self._paths[i]), max_side=self.max_side, min_side=self.min_side)
        return [to_tensor(img, self.convention)]


# --------------------------------------------------------------------------------------------------------------
# Models: configuration, fingerprint
# --------------------------------------------------------------------------------------------------------------


def descriptor_dim(model: nn.Module) -> int:
    """Dimension d of a global model's descriptors (see :func:`helpers.builders.global_dim`)."""
    return global_dim(model)


def global_kind(model: nn.Module) -> str:
    """``"superglobal"``, ``"cvnet_global"`` (see :func:`helpers.builders.kind_of`) or ``"timm"`` (a
    :class:`models.TimmGlobal`, built by ``build_model("timm:<name>")``); anything else is a TypeError."""
    if isinstance(model, TimmGlobal):
        return TIMM_KIND
    try:
        kind = kind_of(model)
    except TypeError:
        kind = None
    if kind not in GLOBAL_KINDS:
        raise TypeError(f"model must be a models.SuperGlobal, models.CVNetGlobal or models.TimmGlobal, got "
                        f"{type(model).__name__}")
    return kind


def model_config(model: nn.Module) -> dict[str, Any]:
    """What rebuilds the architecture: class, depth, options and input convention (weights not included)."""
    kind = global_kind(model)
    convention = getattr(model, "input_convention", OFFICIAL_CONVENTION)
    if kind == TIMM_KIND:
        options = {"model_name": model.model_name, "pooling": model.pooling,
                   "dim": None if model.projection is None else int(model.dim)}
        return {"class": type(model).__name__, "depth": None, "options": options,
                "input_convention": convention.to_dict()}
    options: dict[str, Any] = {"reduction_dim": descriptor_dim(model)}
    if kind == "superglobal":
        options.update(gemp=model.gemp, rgem=model.rgem, sgem=model.sgem, relup=model.relup,
                       scales=list(model.scales), antialias=model.antialias)
    return {"class": type(model).__name__, "depth": int(model.depth), "options": options,
            "input_convention": convention.to_dict()}


def model_name(model: nn.Module) -> str:
    """What messages call a global model: ``SuperGlobal ResNet-50``, ``TimmGlobal timm:resnet18``."""
    if isinstance(model, TimmGlobal):
        return f"{type(model).__name__} {TIMM_ARCH_PREFIX}{model.model_name}"
    return f"{type(model).__name__} ResNet-{model.depth}"


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the weights the inference path uses (see :func:`helpers.extraction.state_dict_hash`), so that
    an index is never queried with other weights than it was built with."""
    return state_dict_hash(model)


# --------------------------------------------------------------------------------------------------------------
# Retriever
# --------------------------------------------------------------------------------------------------------------


class Retriever:
    """Index images into a vector database and query it, with optional SuperGlobal or CVNet re-ranking.

    Args:
        model: a :class:`models.SuperGlobal` or :class:`models.CVNetGlobal` (its ``input_convention`` is used);
            moved to ``device`` and put in eval mode. Descriptors are computed by the engine's fast copy of it
            (BatchNorm folded, made at first use), so its weights must not change afterwards.
        database: any :class:`helpers.vector_db.base.AbstractVectorDB` of the model's descriptor dimension.
        reranker: None, a :class:`models.SuperGlobalRerank` or a :class:`models.CVNetRerank`.
        rerank_top_k: global candidates CVNet re-scores (100 in the paper).
        mix: weight of the CVNet score in ``global + mix * score`` (0.5 in the paper).
        device: where the networks run.
        batch_size: images of equal size described together; CVNet pairs scored together.
        max_side: longer image side after downscaling (None: never downscale).
        min_side: short side below which an image is enlarged (None: never).
        scales: CVNet-Global's multi-scale test scales (SuperGlobal's live in the model).
        map_cache_size: database images whose reduced CVNet maps are kept in memory (LRU; about 5 MB each at
            1024 x 768).
        weights, seed: where the model's weights came from (a checkpoint path, or the seed of a random
            initialisation); recorded by :meth:`save` so that :meth:`load` can rebuild the model, and named by
            errors. With neither, :meth:`save` writes the weights themselves into the index folder.
        rerank_weights, rerank_seed: the same for a CVNet re-ranker.
        post: the default post-processing of queries (:class:`helpers.postprocess.PostProcessing`, or its
            fields as a dict; None: none); :meth:`query` may override it.
        flip: flip test-time augmentation of every descriptor, indexed and queried alike
            (:func:`helpers.extraction.extract_global_descriptors`).
    """

    def __init__(
        self,
        model: nn.Module,
        database: AbstractVectorDB,
        *,
        reranker: nn.Module | None = None,
        rerank_top_k: int = CVNET_RERANK_TOP_K,
        mix: float = CVNET_SCORE_WEIGHT,
        device: torch.device | str = "cpu",
        batch_size: int = 4,
        max_side: int | None = DEFAULT_MAX_SIDE,
        min_side: int | None = DEFAULT_MIN_SIDE,
        scales: Sequence[float] = CVNET_TEST_SCALES,
        map_cache_size: int = 128,
        weights: str | os.PathLike | None = None,
        seed: int | None = None,
        rerank_weights: str | os.PathLike | None = None,
        rerank_seed: int | None = None,
        post: PostProcessing | Mapping[str, Any] | None = None,
        flip: bool = False,
    ) -> None:
        self.kind = global_kind(model)
        if not isinstance(database, AbstractVectorDB):
            raise TypeError(f"database must be an AbstractVectorDB, got {type(database).__name__}")
        dim = descriptor_dim(model)
        if database.dim != dim:
            raise ValueError(f"the database holds {database.dim}-d vectors but {type(model).__name__} gives "
                             f"{dim}-d descriptors: use a database built for this model")
        if reranker is not None and not isinstance(reranker, (SuperGlobalRerank, CVNetRerank)):
            raise TypeError(f"reranker must be None, SuperGlobalRerank or CVNetRerank, got {type(reranker).__name__}")
        if rerank_top_k < 1 or batch_size < 1 or map_cache_size < 0:
            raise ValueError(f"need rerank_top_k >= 1, batch_size >= 1, map_cache_size >= 0; got {rerank_top_k}, "
                             f"{batch_size}, {map_cache_size}")
        if not math.isfinite(mix):
            raise ValueError(f"mix must be finite, got {mix}")
        if max_side is not None and min_side is not None and max_side < min_side:
            raise ValueError(f"max_side ({max_side}) must be >= min_side ({min_side})")
        if isinstance(reranker, CVNetRerank) and reranker.input_convention != model.input_convention:
            logger.warning("the global model and the CVNet re-ranker have different input conventions (%s vs %s)",
                           model.input_convention, reranker.input_convention)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.database = database
        self.reranker = None if reranker is None else reranker.to(self.device).eval()
        self.rerank_top_k = int(rerank_top_k)
        self.mix = float(mix)
        self.batch_size = int(batch_size)
        self.max_side = max_side
        self.min_side = min_side
        self.scales = tuple(float(s) for s in scales)
        self.map_cache_size = int(map_cache_size)
        self.weights = None if weights is None else os.fspath(weights)
        self.seed = seed
        self.rerank_weights = None if rerank_weights is None else os.fspath(rerank_weights)
        self.rerank_seed = rerank_seed
        self.post = _post_settings(post)
        self.flip = bool(flip)
        self._runner: nn.Module | None = None
        self._db_maps: ReducedMapStore | None = None

    @property
    def dim(self) -> int:
        """Descriptor dimension d."""
        return self.database.dim

    def __len__(self) -> int:
        return len(self.database)

    def settings(self) -> dict[str, Any]:
        """The constructor settings :meth:`save` records (model, database and re-ranker excluded)."""
        return {"rerank_top_k": self.rerank_top_k, "mix": self.mix, "batch_size": self.batch_size,
                "max_side": self.max_side, "min_side": self.min_side, "scales": list(self.scales),
                "map_cache_size": self.map_cache_size, "flip": self.flip,
                "post": None if self.post is None else dataclasses.asdict(self.post)}

    def set_reranker(self, reranker: nn.Module | None, *, weights: str | os.PathLike | None = None,
                     seed: int | None = None) -> None:
        """Use ``reranker`` (None, a SuperGlobalRerank or a CVNetRerank; moved to the device) from now on;
        ``weights`` / ``seed``: where a CVNet re-ranker's weights came from (what errors and :meth:`save` name)."""
        if reranker is not None and not isinstance(reranker, (SuperGlobalRerank, CVNetRerank)):
            raise TypeError(f"reranker must be None, SuperGlobalRerank or CVNetRerank, got {type(reranker).__name__}")
        self.reranker = None if reranker is None else reranker.to(self.device).eval()
        self.rerank_weights = None if weights is None else os.fspath(weights)
        self.rerank_seed = seed

    # ------------------------------------------------------------------ descriptors
    def _prepare(self, image: Any, bbox: Sequence[float] | None, channel_order: str) -> np.ndarray:
        return prepare_image(load_bgr(image, channel_order=channel_order), max_side=self.max_side,
                             min_side=self.min_side, bbox=bbox)

    @staticmethod
    def _weights_source(weights: str | None, seed: int | None) -> str:
        if weights is not None:
            return weights
        return f"random (seed {seed})" if seed is not None else "in-memory model (no file or seed recorded)"

    def _describe_prepared(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> Tensor:
        if not images:
            return torch.empty(0, self.dim)
        if self._runner is None:  # the engine's fast copy of the model, made once rather than per batch
            self._runner = fast_runner(self.model)
        # SuperGlobal resizes to its scales inside the model (Scale-GeM); CVNet-Global is fed one image per scale
        scales = (1.0,) if self.kind == "superglobal" else self.scales
        dataset = ImageArrays(images, scales=scales, convention=self.model.input_convention, names=names)
        return extract_global_descriptors(model=self.model, dataset=dataset, device=self.device,
                                          batch_size=self.batch_size, progress=False, runner=self._runner,
                                          weights_source=self._weights_source(self.weights, self.seed),
                                          flip=self.flip)

    def describe(
        self,
        images: Sequence[str | os.PathLike | np.ndarray],
        *,
        bboxes: Sequence[Sequence[float] | None] | None = None,
        channel_order: str = "BGR",
    ) -> Tensor:
        """Global descriptors (n, d) float32 (CPU, L2-normalised) of images or paths, optionally cropped to
        ``bboxes`` (x1, y1, x2, y2 in original pixels; None for no crop)."""
        bboxes = _per_item(bboxes, len(images), "bboxes")
        return self._describe_prepared([self._prepare(img, box, channel_order) for img, box in zip(images, bboxes)],
                                       [_image_name(img, r) for r, img in enumerate(images)])

    # ------------------------------------------------------------------ indexing
    def index(
        self,
        images: Sequence[str | os.PathLike | np.ndarray],
        ids: Sequence[int] | Tensor | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        *,
        channel_order: str = "BGR",
        on_error: str = "raise",
        progress: bool = True,
    ) -> Tensor:
        """Describe ``images`` (paths or uint8 (H, W, 3) BGR arrays) and add them to the database.

        ``ids`` (n,) default to the database's next free integers; an existing id is replaced (upsert).
        ``metadata``: one dict (or None) per image; for a path, ``{"path": absolute path}`` is added (that is
        what CVNet re-ranking reads the image back from). ``on_error="skip"`` logs and skips an image that
        cannot be read (its id is returned as -1) instead of raising. Descriptors are written every 256 images,
        so after an error the images before that batch stay indexed.
        Returns the ids (n,) int64.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        images = list(images)
        n = len(images)
        id_t = None
        if ids is not None:
            id_t = as_id_vector(ids)
            if id_t.numel() != n:
                raise ValueError(f"got {id_t.numel()} ids for {n} images")
            check_unique(id_t)
        meta = check_metadata(metadata, n) or [None] * n
        out = torch.full((n,), -1, dtype=torch.int64)
        pending: list[int] = []
        pending_desc: list[Tensor] = []
        meta_rows: dict[int, dict[str, Any] | None] = {}

        def flush() -> None:
            if not pending:
                return
            rows = list(pending)
            added = self.database.add(torch.cat(pending_desc), None if id_t is None else id_t[rows],
                                      [meta_rows[r] for r in rows])
            out[rows] = added
            if self._db_maps is not None:  # a replaced image must not be re-ranked with its old maps
                self._db_maps.forget(added.tolist())
            pending.clear()
            pending_desc.clear()

        bar = tqdm(total=n, desc="index", unit="img", disable=not progress)
        try:
            for start in range(0, n, self.batch_size):
                rows, prepared = [], []
                for r in range(start, min(start + self.batch_size, n)):
                    try:
                        prepared.append(self._prepare(images[r], None, channel_order))
                    except (OSError, ValueError) as exc:
                        if on_error == "raise":
                            raise
                        logger.warning("skipping image %d: %s", r, exc)
                        continue
                    rows.append(r)
                    entry = dict(meta[r]) if meta[r] is not None else None
                    if isinstance(images[r], (str, os.PathLike)):
                        entry = {**(entry or {}), PATH_KEY: str(Path(images[r]).resolve())}
                    meta_rows[r] = entry
                if prepared:
                    pending.extend(rows)
                    pending_desc.append(self._describe_prepared(prepared, [_image_name(images[r], r) for r in rows]))
                if len(pending) >= _ADD_EVERY:
                    flush()
                bar.update(min(start + self.batch_size, n) - start)
            flush()
        finally:
            bar.close()
        skipped = int((out < 0).sum())
        if skipped:
            logger.warning("%d of %d images were skipped (unreadable)", skipped, n)
        return out

    # ------------------------------------------------------------------ querying
    def query(
        self,
        image: str | os.PathLike | np.ndarray,
        k: int = 10,
        *,
        bbox: Sequence[float] | None = None,
        channel_order: str = "BGR",
        post: PostProcessing | Mapping[str, Any] | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[Hit]:
        """The ``k`` best database entries for one image or path, best first (see :class:`Hit`).

        ``bbox`` = (x1, y1, x2, y2) crops the query (original pixels), as for the revisited benchmarks' queries.
        ``post``: post-processing for this query (None: the retriever's ``post``; ``PostProcessing()``: none).
        ``timings``: a dict to fill with the seconds each stage took (see :meth:`query_batch`).
        """
        return self.query_batch([image], k, bboxes=[bbox], channel_order=channel_order, post=post,
                                timings=timings)[0]

    def query_batch(
        self,
        images: Sequence[str | os.PathLike | np.ndarray],
        k: int = 10,
        *,
        bboxes: Sequence[Sequence[float] | None] | None = None,
        channel_order: str = "BGR",
        post: PostProcessing | Mapping[str, Any] | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[list[Hit]]:
        """:meth:`query` for several images: one list of hits per image.

        Order of the work: the global search; with post-processing active (α-DBA, α-QE, k-reciprocal), each
        query's top ``post.shortlist`` candidates (with their stored vectors) re-ordered among themselves by
        :func:`helpers.postprocess.post_scores`, the rest following in global order; then the re-ranker, over
        that order: SuperGlobal re-ranks its top ``M``, CVNet re-scores its top ``rerank_top_k`` with
        ``global cosine + mix * CVNet score``. A hit's score is what placed it: the re-ranker's, else the
        post-processed similarity (k-reciprocal: minus its distance), else the global cosine.
        ``timings`` (a dict) gets the seconds of each stage run: ``prepare query`` (read, resize, crop),
        ``describe query``, ``search``, ``post-processing``, ``re-ranking``, ``metadata``, added to what it holds.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if len(self.database) == 0:
            raise ValueError("the database is empty: index some images first")
        post = self.post if post is None else _post_settings(post)
        k = int(k)
        bboxes = _per_item(bboxes, len(images), "bboxes")
        with timed(timings, "prepare query"):
            prepared = [self._prepare(img, box, channel_order) for img, box in zip(images, bboxes)]
        with timed(timings, "describe query"):
            queries = self._describe_prepared(prepared,
                                              [f"query {_image_name(img, r)}" for r, img in enumerate(images)])
        if post is not None and post.active:
            candidates = self._post_rows(queries, k, post, timings)
            if self.reranker is None:
                rows = [(s, i, g) for s, i, g, _ in candidates]
            else:
                with timed(timings, "re-ranking"):
                    if isinstance(self.reranker, SuperGlobalRerank):
                        rows = self._superglobal_over(queries, candidates, k)
                    else:
                        rows = self._cvnet_rows(queries, prepared, k, candidates=candidates)
        elif self.reranker is None:
            with timed(timings, "search"):
                scores, ids = self.database.search(queries, k)
            rows = [(s, i, s) for s, i in zip(scores.cpu(), ids.cpu())]
        elif isinstance(self.reranker, SuperGlobalRerank):
            with timed(timings, "re-ranking"):  # SuperGlobal searches its top M itself
                rows = self._superglobal_rows(queries, k)
        else:
            with timed(timings, "search"):
                scores, ids = (t.cpu() for t in self.database.search(queries, max(k, self.rerank_top_k)))
            with timed(timings, "re-ranking"):
                rows = self._cvnet_rows(queries, prepared, k, searched=(scores, ids))
        with timed(timings, "metadata"):
            return self._hits(rows, k)

    def _post_rows(self, queries: Tensor, k: int, post: PostProcessing, timings: dict[str, float] | None
                   ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per query: (scores, ids, global cosines, vectors) of its top ``max(k, post.shortlist)`` candidates, the
        first ``post.shortlist`` re-ordered by the post-processing (the rest keep the global order)."""
        n = min(max(k, post.shortlist), len(self.database))
        with timed(timings, "search"):
            scores, ids, vectors = (t.cpu() for t in self.database.search_with_vectors(queries, n))
        rows = []
        with timed(timings, "post-processing"):
            for r in range(queries.shape[0]):
                valid = ids[r] >= 0
                s, i, v = scores[r][valid], ids[r][valid], vectors[r][valid].float()
                t = min(post.shortlist, i.numel())
                head = post_scores(queries[r].cpu(), v[:t], post)
                order = torch.argsort(head, descending=True, stable=True)
                keep = torch.cat([order, torch.arange(t, i.numel())])
                rows.append((torch.cat([head[order], s[t:]]), i[keep], s[keep], v[keep]))
        return rows

    def _superglobal_over(self, queries: Tensor, candidates: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]],
                          k: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        """SuperGlobal re-ranking of the top ``M`` of given (post-processed) candidates; the rest follow."""
        rows = []
        for r, (s, i, g, v) in enumerate(candidates):
            m = min(int(self.reranker.M), i.numel())
            q = queries[r : r + 1].to(self.device)
            new_s, new_i = self.reranker.rerank_candidates(q, v[None, :m].to(self.device), i[None, :m].to(self.device))
            new_s, new_i = new_s[0].cpu(), new_i[0].cpu()
            by_id = dict(zip(i.tolist(), g.tolist()))
            globals_ = torch.tensor([by_id[j] for j in new_i.tolist()], dtype=torch.float32)
            rows.append((torch.cat([new_s, s[m:]])[:k], torch.cat([new_i, i[m:]])[:k],
                         torch.cat([globals_, g[m:]])[:k]))
        return rows

    def _superglobal_rows(self, queries: Tensor, k: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        scores, ids = self.reranker.rerank(queries, self.database)
        scores, ids = scores.cpu(), ids.cpu()
        m = ids.shape[1]
        tail_s = tail_i = None
        if k > m and len(self.database) > m:  # positions past the re-ranked M keep the global order
            tail_s, tail_i = (t.cpu() for t in self.database.search(queries, k))
        rows = []
        for r in range(queries.shape[0]):
            s, i = scores[r], ids[r]
            if tail_i is not None:
                rest = ~torch.isin(tail_i[r], i) & (tail_i[r] >= 0)
                s, i = torch.cat([s, tail_s[r][rest]]), torch.cat([i, tail_i[r][rest]])
            s, i = s[:k], i[:k]
            valid = i >= 0
            globals_ = torch.full_like(s, float("nan"))
            if bool(valid.any()):
                globals_[valid] = self.database.get(i[valid]).cpu() @ queries[r]
            rows.append((s, i, globals_))
        return rows

    def _cvnet_rows(self, queries: Tensor, prepared: Sequence[np.ndarray], k: int, *,
                    searched: tuple[Tensor, Tensor] | None = None,
                    candidates: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None) -> list[tuple]:
        """CVNet re-ranking of the global search result ``searched`` (scores, ids), or of post-processed
        ``candidates``: their top ``rerank_top_k`` re-scored with global cosine + mix * CVNet score, the rest
        keeping their order and scores."""
        found, pairs = [], []
        for r in range(queries.shape[0]):
            if candidates is not None:
                post_s, i, g, _ = candidates[r]
                t = min(self.rerank_top_k, i.numel())
                s = torch.cat([g[:t], post_s[t:]])  # CVNet's mix is over the global cosine
                by_id = dict(zip(i.tolist(), g.tolist()))
            else:
                valid = searched[1][r] >= 0
                s, i = searched[0][r][valid], searched[1][r][valid]
                t = min(self.rerank_top_k, i.numel())
                by_id = dict(zip(i.tolist(), s.tolist()))
            found.append((s, i, t, by_id))
            pairs.extend((r, j) for j in i[:t].tolist())
        store = self._map_store()
        store.dataset.load_paths(j for _, j in pairs if not store.in_memory(j))
        query_maps = ReducedMapStore(model=self.reranker, device=self.device, batch_size=self.batch_size,
                                     dataset=ImageArrays(prepared, convention=self.reranker.input_convention),
                                     weights_source=self._weights_source(self.rerank_weights, self.rerank_seed))
        scorer = CVNetPairScorer(model=self.reranker, query_maps=query_maps, db_maps=store,
                                 batch_size=self.batch_size, progress=False)
        pair_scores = torch.from_numpy(scorer(np.asarray(pairs, dtype=np.int64).reshape(-1, 2))).float()
        if self.map_cache_size == 0:
            store.clear()
        rows, start = [], 0
        for s, i, t, by_id in found:
            new_s, new_i = apply_cvnet_rerank(s, i, pair_scores[start : start + t], weight=self.mix)
            start += t
            globals_ = torch.tensor([by_id[j] for j in new_i.tolist()], dtype=torch.float32)
            rows.append((new_s[:k], new_i[:k], globals_[:k]))
        return rows

    def _hits(self, rows: Sequence[tuple[Tensor, Tensor, Tensor]], k: int) -> list[list[Hit]]:
        wanted = torch.unique(torch.cat([i[i >= 0] for _, i, _ in rows]))
        meta = dict(zip(wanted.tolist(), self.database.get_metadata(wanted))) if wanted.numel() else {}
        out = []
        for s, i, g in rows:
            out.append([Hit(id=int(j), score=float(sc), metadata=meta[int(j)], global_score=float(gs))
                        for sc, j, gs in zip(s[:k].tolist(), i[:k].tolist(), g[:k].tolist()) if j >= 0])
        return out

    # ------------------------------------------------------------------ CVNet database maps
    def _map_store(self) -> ReducedMapStore:
        """The reduced CVNet maps of database images by id (LRU, ``map_cache_size``), for the current re-ranker."""
        if not isinstance(self.reranker, CVNetRerank):
            raise ValueError("database maps need a CVNetRerank re-ranker")
        if self._db_maps is None or self._db_maps.model is not self.reranker:
            images = StoredImages(self.database, convention=self.reranker.input_convention,
                                  max_side=self.max_side, min_side=self.min_side)
            # a cache of 0 still holds one query's candidates while they are scored (then it is cleared)
            self._db_maps = ReducedMapStore(model=self.reranker, dataset=images, device=self.device,
                                            max_items=max(1, self.map_cache_size), batch_size=self.batch_size,
                                            weights_source=self._weights_source(self.rerank_weights,
                                                                                self.rerank_seed))
        return self._db_maps

    def database_maps(self, ids: Tensor | Sequence[int]) -> list[list[Tensor]]:
        """Reduced CVNet maps of database ids, recomputed from their stored image paths (LRU-cached by id): per
        id, the list of (1, 256, h_s, w_s) maps, one per correlation scale."""
        store = self._map_store()
        id_list = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        store.dataset.load_paths(i for i in id_list if not store.in_memory(i))
        return [store.get(i) for i in id_list]

    def cached_map_ids(self) -> list[int]:
        """Ids whose CVNet maps are cached, least recently used first."""
        return [] if self._db_maps is None else self._db_maps.cached_indices()

    def clear_cache(self) -> None:
        """Forget the cached CVNet maps (e.g. after image files changed on disk)."""
        if self._db_maps is not None:
            self._db_maps.clear()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike, *, remote: Mapping[str, Any] | None = None) -> Path:
        """Write the retriever into ``directory``: the database (local back-ends: ``database-<save id>.pt`` /
        ``.faiss``), the weights when their origin is unknown (no ``weights`` path, no ``seed``; likewise for a
        CVNet re-ranker), then ``retriever.json``: model config and weights fingerprint, re-ranker (kind and
        settings, or CVNet's weights source), settings, database description, and every file's sha256.

        Atomic as a whole: ``retriever.json`` is written last (the commit) and names files no other save uses;
        the files of the previous save are removed only after it (with temporary files of an interrupted one).
        A crash at any point leaves the old save or the new one loadable. Saves to one folder take turns.
        A remote database (Pinecone) persists by itself: ``remote`` gives the connection settings to record
        (``host``, ``index_name``; the namespace is read from the database). API keys are never written.
        Returns the path of ``retriever.json``.
        """
        try:
            backend = backend_name(self.database)
        except TypeError as exc:
            raise TypeError(f"{exc}: Retriever.save cannot write it; save your database yourself and pass it to "
                            "Retriever.load(database=...)") from None
        remote = dict(remote or {})
        if any("key" in name.lower() for name in remote):
            raise ValueError("remote settings must not hold API keys (they are read from the environment)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with _writer_lock(directory):
            save_id = f"{time.time_ns():x}-{secrets.token_hex(4)}"
            files: dict[str, str] = {}

            def write_file(part: str, suffix: str, write: Callable[[Path], None]) -> str:
                name = f"{part}-{save_id}{suffix}"
                write(directory / name)
                files[name] = file_sha256(directory / name)
                return name

            if backend in _DATABASE_SUFFIX:
                spec: dict[str, Any] = {"backend": backend,
                                        "file": write_file("database", _DATABASE_SUFFIX[backend], self.database.save)}
            else:
                spec = {"backend": backend, "namespace": getattr(self.database, "namespace", ""),
                        "host": remote.get("host"), "index_name": remote.get("index_name")}
            model = {**model_config(self.model), **_weights_record(self.model, self.weights, self.seed, "model",
                                                                   write_file)}
            config = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dim": self.dim,
                      "count": len(self.database), "model": model, "database": spec,
                      "reranker": self._reranker_record(write_file), "settings": self.settings(), "files": files}
            path = directory / CONFIG_FILE

            def write(tmp: str) -> None:
                with open(tmp, "w") as f:
                    json.dump(config, f, indent=1)

            _fsync_directory(directory)  # the files are durable before the commit names them
            atomic_write(path, write)
            _fsync_directory(directory)
            _remove_stale_files(directory, keep=set(files))
        logger.info("saved retriever (%d images, %s) to %s", config["count"], backend, directory)
        return path

    def _reranker_record(self, write_file: Callable[[str, str, Callable[[Path], None]], str]) -> dict | None:
        """What rebuilds the re-ranker: SuperGlobal's M, K, beta; CVNet's architecture and weights source."""
        if self.reranker is None:
            return None
        if isinstance(self.reranker, SuperGlobalRerank):
            r = self.reranker
            return {"kind": "superglobal", "M": int(r.M), "K": int(r.K), "beta": float(r.beta),
                    "query_chunk": int(r.query_chunk)}
        r = self.reranker
        return {"kind": "cvnet", "class": type(r).__name__, "depth": int(r.depth),
                "options": {"scales": list(r.scales)}, "input_convention": r.input_convention.to_dict(),
                **_weights_record(r, self.rerank_weights, self.rerank_seed, "reranker", write_file)}

    @staticmethod
    def read_config(directory: str | os.PathLike) -> dict[str, Any]:
        """The ``retriever.json`` of a saved retriever, checked for format and version."""
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no saved retriever in {directory}: {path} is missing "
                                    "(build one with Retriever.save or `python retrieve.py build`)")
        try:
            with open(path) as f:
                config = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a saved Retriever")
        if config.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has version {config.get('version')}, expected {FORMAT_VERSION}")
        return config

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        model: nn.Module | None = None,
        *,
        database: AbstractVectorDB | None = None,
        reranker: nn.Module | None = RECORDED,
        weights: str | os.PathLike | None = None,
        rerank_weights: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        check_weights: bool = True,
        api_key: str | None = None,
        **settings: Any,
    ) -> Retriever:
        """Open a retriever written by :meth:`save`, checking the sha256 of every file it names.

        ``model``: the global model to use; it must match the recorded class, depth, dimension and input
        convention, and (``check_weights``) the recorded weights fingerprint. Without it the model is rebuilt
        from the recorded checkpoint path (``weights`` overrides a moved file), the weights saved with the index,
        or the recorded random seed. ``reranker``: by default the recorded one (SuperGlobal with its M, K, beta;
        CVNet rebuilt like the model, ``rerank_weights`` overriding a moved file); None for none, or a module.
        ``database``: use this one instead of opening the recorded one. ``settings`` override the recorded
        constructor settings (e.g. ``rerank_top_k=50``). A save running meanwhile is waited out: when a file
        named by ``retriever.json`` disappears because a new save replaced it, the new ``retriever.json`` is read.
        """
        for attempt in range(_LOAD_ATTEMPTS):
            config = cls.read_config(directory)
            try:
                return cls._from_config(directory, config, model=model, database=database, reranker=reranker,
                                        weights=weights, rerank_weights=rerank_weights, device=device,
                                        check_weights=check_weights, api_key=api_key, settings=settings)
            except FileNotFoundError:
                try:
                    replaced = cls.read_config(directory) != config
                except (OSError, ValueError):
                    replaced = False
                if not replaced or attempt == _LOAD_ATTEMPTS - 1:
                    raise
                logger.info("%s: a concurrent save replaced the files being loaded; reading it again", directory)
        raise AssertionError("unreachable")

    @classmethod
    def _from_config(cls, directory: str | os.PathLike, config: Mapping[str, Any], *, model: nn.Module | None,
                     database: AbstractVectorDB | None, reranker: nn.Module | None,
                     weights: str | os.PathLike | None, rerank_weights: str | os.PathLike | None,
                     device: torch.device | str, check_weights: bool, api_key: str | None,
                     settings: Mapping[str, Any]) -> Retriever:
        directory = Path(directory)
        _verify_files(directory, config.get("files") or {})
        recorded = config["model"]
        if model is None:
            model = _build_recorded(recorded, directory, kind=recorded["class"], weights=weights, what="model")
        _check_same_model(model, recorded, check_weights=check_weights, where=directory)
        if database is None:
            spec = config["database"]
            backend = spec.get("backend")
            if backend in _DATABASE_SUFFIX:
                database = load_database(backend, directory / spec["file"])
            elif backend == "pinecone":
                database = make_database("pinecone", config["dim"], index_name=spec.get("index_name"),
                                         host=spec.get("host"), api_key=api_key, namespace=spec.get("namespace", ""))
            else:
                raise ValueError(f"unknown database backend {backend!r} in {directory / CONFIG_FILE}")
        if len(database) != config["count"]:
            logger.warning("%s: the database holds %d vectors, %d when saved", directory, len(database),
                           config["count"])
        rerank_record = config.get("reranker")
        rerank_source: dict[str, Any] = {}
        if reranker is RECORDED:
            reranker = _build_reranker(rerank_record, directory, weights=rerank_weights, check_weights=check_weights)
            if rerank_record is not None and rerank_record.get("kind") == "cvnet" and reranker is not None:
                rerank_source = _source_of(rerank_record, rerank_weights)
        kwargs = {**config["settings"], **settings}
        source = _source_of(recorded, weights)
        return cls(model, database, reranker=reranker, device=device, weights=source.get("weights"),
                   seed=source.get("seed"), rerank_weights=rerank_source.get("weights"),
                   rerank_seed=rerank_source.get("seed"), **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Persistence helpers
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _writer_lock(directory: Path) -> Iterator[None]:
    """Saves to one folder take turns (an exclusive ``flock`` on ``.retriever.lock``; none where there is no
    fcntl): a save must not remove the files of another that has not committed yet. Readers take no lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: saves are still atomic, concurrent writers are on their own
        yield
        return
    with open(directory / _LOCK_FILE, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fsync_directory(directory: Path) -> None:
    """Make the renames inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_files(directory: Path, *, keep: set[str]) -> None:
    """Remove the files of earlier saves (and temporary files of interrupted ones) that ``keep`` does not name."""
    for entry in os.scandir(directory):
        name = entry.name
        if name in keep or not entry.is_file(follow_symlinks=False):
            continue
        if _SAVE_FILE.match(name) or name in _LEGACY_FILES or _TEMP_FILE.match(name):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


def _verify_files(directory: Path, files: Mapping[str, str]) -> None:
    """Every file a save names exists and has the recorded sha256 (``FileNotFoundError`` / ``CorruptIndexError``)."""
    for name, digest in files.items():
        path = directory / name
        try:
            actual = file_sha256(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: the saved retriever in {directory} is incomplete") from None
        if actual != digest:
            raise CorruptIndexError(f"{path}: sha256 mismatch with {directory / CONFIG_FILE}: the file is damaged "
                                    "(rebuild the index)")


def _weights_record(net: nn.Module, weights: str | None, seed: int | None, part: str,
                    write_file: Callable[[str, str, Callable[[Path], None]], str]) -> dict[str, Any]:
    """Where a network's weights come from: a checkpoint path, a seed, or (neither known) a checkpoint written
    into the save, so that a model of unknown origin still loads."""
    record: dict[str, Any] = {"weights": None if weights is None else str(Path(weights).resolve()), "seed": seed,
                              "fingerprint": weights_fingerprint(net), "checkpoint": None}
    if weights is None and seed is None:
        if isinstance(net, TimmGlobal):  # the official key layout fits the project's ResNets only
            save = lambda path: atomic_torch_save(timm_global_checkpoint(net), path)  # noqa: E731
        else:
            save = lambda path: save_official_checkpoint(net, path)  # noqa: E731
        record["checkpoint"] = write_file(part, ".pth", save)
        logger.info("%s weights of unknown origin (no file, no seed): saved them with the index", part)
    return record


def _source_of(record: Mapping[str, Any], weights: str | os.PathLike | None) -> dict[str, Any]:
    """weights / seed a reloaded retriever records for a network (a checkpoint saved with the index is not a
    source: the next save writes it again)."""
    if weights is not None:
        return {"weights": os.fspath(weights), "seed": None}
    if record.get("checkpoint"):
        return {"weights": None, "seed": None}
    return {"weights": record.get("weights"), "seed": record.get("seed")}


def _build_recorded(record: Mapping[str, Any], directory: Path, *, kind: str,
                    weights: str | os.PathLike | None, what: str) -> nn.Module:
    """Rebuild a network from its record: ``weights`` if given, else the checkpoint saved with the index, else
    the recorded checkpoint path, else the recorded random seed."""
    if weights is not None:
        path: Any = weights
    elif record.get("checkpoint"):
        path = directory / record["checkpoint"]
    else:
        path = record.get("weights")
    if path is None and record.get("seed") is None:
        raise ValueError(f"{directory} does not record where its {what}'s weights came from: pass it "
                         f"({'model=' if what == 'model' else 'reranker='})")
    if path is not None and not Path(path).is_file():
        flag = "weights= (--weights)" if what == "model" else "rerank_weights= (--rerank-weights)"
        raise FileNotFoundError(f"the index was built with {what} weights {path}, which is missing: put the file "
                                f"back or pass {flag} with its new location")
    options = record.get("options")
    if record.get("class") == TimmGlobal.__name__:
        options = dict(options or {})
        kind = TIMM_ARCH_PREFIX + options.pop("model_name")
    net = build_model(kind, depth=record["depth"] or 50, weights=path, seed=record.get("seed") or 0,
                      options=options, warn_random=path is None)
    if path is None and record.get("input_convention"):  # random weights: no file to carry the convention
        net.input_convention = InputConvention.from_dict(record["input_convention"])
    return net


def _build_reranker(record: Mapping[str, Any] | None, directory: Path, *, weights: str | os.PathLike | None,
                    check_weights: bool) -> nn.Module | None:
    """The re-ranker a save recorded (None when it had none)."""
    if record is None:
        return None
    if record.get("kind") == "superglobal":
        reranker = build_superglobal_reranker(M=record["M"], K=record["K"], beta=record["beta"])
        reranker.query_chunk = int(record.get("query_chunk", reranker.query_chunk))
        return reranker
    if record.get("kind") != "cvnet":
        raise ValueError(f"unknown re-ranker {record.get('kind')!r} in {directory / CONFIG_FILE}")
    reranker = _build_recorded(record, directory, kind="cvnet_rerank", weights=weights, what="re-ranker")
    if check_weights and record.get("fingerprint") and weights_fingerprint(reranker) != record["fingerprint"]:
        raise ValueError(f"{directory}: the CVNet re-ranker's weights differ from those it was saved with "
                         "(fingerprint mismatch); pass rerank_weights= with the right file, reranker= yourself, "
                         "or check_weights=False if you know better.")
    return reranker


def _check_same_model(model: nn.Module, recorded: Mapping[str, Any], *, check_weights: bool, where: Any) -> None:
    current = model_config(model)
    for key in ("class", "depth", "options", "input_convention"):
        if _normalise(current[key]) != _normalise(recorded[key]):
            raise ValueError(f"{where} was built with a {recorded['class']} (depth {recorded['depth']}) whose {key} "
                             f"is {recorded[key]}; the model given has {current[key]}. Descriptors would not be "
                             "comparable: use the recorded model (or rebuild the index).")
    if check_weights and recorded.get("fingerprint") and weights_fingerprint(model) != recorded["fingerprint"]:
        source = recorded.get("weights") or (f"the checkpoint saved with it, {recorded['checkpoint']}"
                                             if recorded.get("checkpoint") else
                                             f"random weights, seed {recorded.get('seed')}")
        raise ValueError(f"{where} was built with other weights than the model given (fingerprint mismatch): "
                         f"its descriptors are not comparable. Load the weights it was built with ({source}), "
                         "or pass check_weights=False if you know better.")


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _image_name(image: Any, row: int) -> str:
    """What errors call an image: its path, or its position in the call."""
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"image {row} (array)"


def _post_settings(post: PostProcessing | Mapping[str, Any] | None) -> PostProcessing | None:
    """A :class:`PostProcessing` from itself, its fields as a dict (a save's record), or None."""
    if post is None or isinstance(post, PostProcessing):
        return post
    if isinstance(post, Mapping):
        return PostProcessing(**post)
    raise TypeError(f"post must be a helpers.postprocess.PostProcessing, a dict of its fields or None, got "
                    f"{type(post).__name__}")


def _per_item(values: Sequence[Any] | None, n: int, name: str) -> list[Any]:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} images")
    return values


# --------------------------------------------------------------------------------------------------------------
# What `python retrieve.py build` and `query` run
# --------------------------------------------------------------------------------------------------------------


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
) -> Retriever:
    """Index every image under ``images`` into ``index_dir`` (ids 0..n-1 in sorted path order); returns the
    :class:`Retriever`. ``model``: ``"superglobal"``, ``"cvnet"`` (CVNet-Global) or ``"timm:<timm model name>"``
    (a :class:`models.TimmGlobal`; ``weights`` a trained ``timm-global-v1`` file of train_backbone.py). Without
    ``weights`` the model is random (seeded, loudly warned: results meaningless). ``device``: auto, cpu, cuda or
    cuda:N. ``flip``: flip test-time augmentation of every descriptor (recorded: queries get it too).

    ``scales``: the multi-scale factors (default: the model's, 0.7071, 1, 1.4142; ``[1.0]`` is single scale,
    about 3.5 times faster). An unreadable image is an error naming it, unless ``skip_unreadable``. An existing
    index is replaced only with ``overwrite`` (for Pinecone: a namespace that already holds vectors).
    """
    index_dir = Path(index_dir)
    if (index_dir / CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(f"{index_dir} already holds an index: pass --overwrite to replace it")
    files = list_images(images, exclude=index_dir)
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}. {OFFICIAL_WEIGHTS_HINT}")
    torch_device = resolve_device(device)
    kind = global_kind_name(model)
    options = {"scales": list(scales)} if scales is not None and kind == "superglobal" else None
    net = build_model(kind, depth=depth, weights=weights, seed=seed, options=options)
    extra = {"scales": tuple(scales)} if scales is not None and kind != "superglobal" else {}
    database = make_database(backend, descriptor_dim(net), host=host, index_name=index_name, namespace=namespace)
    if len(database):
        if not overwrite:
            raise FileExistsError(f"the {backend} database already holds {len(database)} vectors: pass --overwrite "
                                  "to delete them first, or use another --namespace")
        database.delete(database.ids())
    retriever = Retriever(net, database, device=torch_device, batch_size=batch_size, max_side=max_side,
                          min_side=min_side, weights=weights, seed=None if weights is not None else seed, flip=flip,
                          **extra)
    logger.info("indexing %d images from %s with %s%s", len(files), images, model_name(net),
                " (flip test-time augmentation)" if flip else "")
    ids = retriever.index(files, ids=range(len(files)), on_error="skip" if skip_unreadable else "raise",
                          progress=progress)
    if int((ids >= 0).sum()) == 0:
        raise ValueError(f"none of the {len(files)} images under {images} could be read")
    retriever.save(index_dir, remote={"host": host, "index_name": index_name} if backend == "pinecone" else None)
    return retriever


def global_kind_name(name: str) -> str:
    """A global model's kind from a builder kind or alias (``"superglobal"``, ``"cvnet"``, ``"CVNetGlobal"``, ...);
    ``"timm:<name>"`` stays as it is."""
    if name.startswith(TIMM_ARCH_PREFIX) and len(name) > len(TIMM_ARCH_PREFIX):
        return name
    kind = model_kind(name)
    if kind not in GLOBAL_KINDS:
        raise ValueError(f"a global model is one of {GLOBAL_KINDS} (or 'cvnet'), got {name!r}")
    return kind


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
        raise ValueError(f"{index_dir} was built with a timm model ({TIMM_ARCH_PREFIX}"
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
        raise ValueError(f"rerank must be one of {RERANKERS}, got {kind!r}")
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
    rerank_top_k: int | None = None,
    mix: float | None = None,
    M: int | None = None,
    K: int | None = None,
    beta: float | None = None,
    post: PostProcessing | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[list[Hit], Retriever]:
    """Query a saved index with one image: (hits best first, the retriever).

    ``rerank``: ``"none"``, ``"superglobal"`` or ``"cvnet"``, built by :func:`reranker_for_index` (``M``, ``K``,
    ``beta``; ``rerank_weights``); ``rerank_top_k`` and ``mix`` (None: the index's settings). ``post``: the
    post-processing (None: the index's recorded one, if any). ``weights`` points at the index's checkpoint if it
    moved since the build. ``timings``: filled with each stage's seconds (see :meth:`Retriever.query_batch`).
    """
    reranker = reranker_for_index(index_dir, rerank, weights=weights, rerank_weights=rerank_weights, M=M, K=K,
                                  beta=beta)
    retriever = Retriever.load(index_dir, weights=weights, reranker=None, device=resolve_device(device),
                               **_given(rerank_top_k=rerank_top_k, mix=mix))
    source: tuple[str | None, int | None] = (None, None)
    if rerank == "cvnet":
        source = rerank_source(index_dir, weights=weights, rerank_weights=rerank_weights)
    retriever.set_reranker(reranker, weights=source[0], seed=source[1])  # what errors name its weights by
    return retriever.query(image, k, bbox=bbox, post=post, timings=timings), retriever


def _given(**values: Any) -> dict[str, Any]:
    """The keyword arguments that were given (not None), so that the callee's defaults apply to the rest."""
    return {name: value for name, value in values.items() if value is not None}
