"""The interface every vector database of this project speaks, and the validation they share.

A vector database stores L2-normalised descriptors (the global descriptors of CVNet / SuperGlobal) under
non-negative int64 ids and answers exact or approximate maximum-inner-product queries. SuperGlobal's
re-ranking (``models.superglobal.SuperGlobalRerank``) needs, per query, the top-M ids, their scores *and*
their vectors: :meth:`AbstractVectorDB.search_with_vectors`.

Conventions shared by all back-ends:

- ids are non-negative int64; a back-end that needs strings (Pinecone) converts inside.
- ``add`` is an upsert: an id already stored is replaced, never duplicated. Ids repeated within one call are
  an error. Without ids, the next free integers are used: ``max(stored id) + 1`` onwards (0 when empty); past
  ``2**63 - 1`` that is a ``ValueError`` asking for explicit ids.
- vectors and queries must be finite and L2-normalised: the policy is to *reject*, never to normalise
  silently. A row whose norm differs from 1 by more than ``norm_tolerance`` is a ``ValueError`` naming it.
  Every check runs before anything is written, so a failing call leaves the database untouched.
- inputs may be numpy arrays or torch tensors (any float dtype, any device); outputs are always torch
  tensors: scores float32, ids int64, vectors float32, on :attr:`AbstractVectorDB.device`.
- ``search`` returns ``(scores (q, k), ids (q, k))`` best first by inner product. When a query has fewer than
  ``k`` results (fewer than ``k`` vectors stored, or an approximate index that visited fewer), the tail is
  padded with score ``-inf`` and id ``-1`` (and, in ``search_with_vectors``, a zero vector). A ``k`` past the
  stored count whose padded result would exceed :data:`MAX_PADDED` entries is a ``ValueError`` (the retrieval
  API caps k at the database size instead).
"""
from __future__ import annotations

import abc
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.errors import InvalidValueError, shorten

logger = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray | Sequence[Sequence[float]]
IdsLike = Tensor | np.ndarray | Sequence[int]
Metadata = dict[str, Any]

PAD_ID = -1
MAX_ID = 2**63 - 1  # ids are int64
PAD_SCORE = float("-inf")
DEFAULT_NORM_TOLERANCE = 1e-3
#: The most entries of a search result (queries x k) padded past the stored vectors without asking.
MAX_PADDED = 1 << 26
#: Rows checked at a time (finiteness, unit norm): the checks' temporaries stay small whatever the input's size
#: (a float64 copy of a whole 1M x 2048 input would be 16 GB).
CHECK_ROWS = 1 << 14
_MAX_NAMED = 10  # how many offending rows / ids an error message lists before eliding the rest


class CorruptIndexError(InvalidValueError):
    """A saved database that is truncated, corrupted, or not in the expected format."""


def _describe(items: Sequence[int] | np.ndarray) -> str:
    items = [int(i) for i in items]
    shown = ", ".join(str(i) for i in items[:_MAX_NAMED])
    more = f", ... ({len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else ""
    return f"[{shown}{more}]"


def unknown_ids_error(missing: Sequence[int] | np.ndarray) -> KeyError:
    """The ``KeyError`` every back-end raises for ids it does not hold (names them)."""
    return KeyError(f"{len(missing)} id(s) not in the database: {_describe(missing)}")


def as_float_matrix(x: ArrayLike, *, dim: int, name: str = "vectors") -> Tensor:
    """Any (n, d) array or tensor -> float32 tensor (on the input's device), checking shape and finiteness."""
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.dim() != 2:
        raise InvalidValueError(f"{name} must be a 2-D (n, {dim}) array, got shape {tuple(t.shape)}")
    if t.shape[1] != dim:
        raise InvalidValueError(f"{name} must have dimension {dim}, got {t.shape[1]} (shape {tuple(t.shape)})")
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise InvalidValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.detach().to(torch.float32)
    bad = torch.cat([~torch.isfinite(t[s : s + CHECK_ROWS]).all(dim=1) for s in range(0, t.shape[0], CHECK_ROWS)]
                    or [torch.zeros(0, dtype=torch.bool, device=t.device)])
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().cpu().numpy()
        raise InvalidValueError(f"{name} contain NaN or Inf in row(s) {_describe(rows)}")
    return t


def check_unit_norm(x: Tensor, *, tolerance: float, name: str = "vectors") -> None:
    """Reject rows of ``x`` (n, d) whose L2 norm is not 1 within ``tolerance`` (no silent normalisation)."""
    if x.shape[0] == 0 or math.isinf(tolerance):
        return
    # float64 so that the check itself is not the source of error at d = 2048; CHECK_ROWS rows at a time
    deviation = torch.cat([(torch.linalg.vector_norm(x[s : s + CHECK_ROWS].to(torch.float64), dim=1) - 1.0).abs()
                           for s in range(0, x.shape[0], CHECK_ROWS)])
    bad = deviation > tolerance
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().cpu().numpy()
        worst = float(deviation.max())
        raise InvalidValueError(
            f"{name} must be L2-normalised (|norm - 1| <= {tolerance}); row(s) {_describe(rows)} are not "
            f"(largest deviation {worst:.3g}). Normalise them first, e.g. torch.nn.functional.normalize(x, dim=1)."
        )


def as_id_vector(ids: IdsLike, *, name: str = "ids") -> Tensor:
    """Any 1-D integer sequence -> int64 CPU tensor of non-negative ids."""
    if isinstance(ids, Tensor):
        t = ids.detach().cpu()
    else:
        arr = np.asarray(ids)
        if arr.dtype == object:
            raise InvalidValueError(f"{name} must be integers, got {arr.dtype}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise InvalidValueError(f"{name} do not fit in int64")
        t = torch.as_tensor(arr.astype(np.int64) if arr.dtype.kind == "u" else arr)
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise InvalidValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        if t.numel() == 0:
            return torch.empty(0, dtype=torch.int64)
        raise InvalidValueError(f"{name} must be integers, got dtype {t.dtype}")
    t = t.to(torch.int64)
    negative = t < 0
    if bool(negative.any()):
        raise InvalidValueError(f"{name} must be non-negative, got {_describe(t[negative].numpy())}")
    return t.contiguous()


def check_unique(ids: Tensor, *, name: str = "ids") -> None:
    """Reject an id that appears twice in one call (an upsert cannot tell which row should win)."""
    uniq, counts = torch.unique(ids, return_counts=True)
    dup = uniq[counts > 1]
    if dup.numel():
        raise InvalidValueError(f"{name} repeat within one call: {_describe(dup.numpy())}")


def check_metadata(metadata: Sequence[Metadata | None] | None, n: int) -> list[Metadata | None] | None:
    """One JSON-serialisable dict (or None) per vector; checked up front so that a bad one writes nothing."""
    if metadata is None:
        return None
    if isinstance(metadata, dict) or not isinstance(metadata, Sequence):
        raise InvalidValueError("metadata must be a sequence with one dict (or None) per vector")
    metadata = list(metadata)
    if len(metadata) != n:
        raise InvalidValueError(f"metadata has {len(metadata)} entries for {n} vectors")
    for row, entry in enumerate(metadata):
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise InvalidValueError(f"metadata[{row}] must be a dict or None, got {type(entry).__name__}")
        try:
            json.dumps(entry, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidValueError(f"metadata[{row}] is not JSON-serialisable: {exc}") from exc
    return metadata


def pad_results(scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Pad (q, k') results to (q, k) with score -inf and id -1, the convention of every back-end."""
    q, have = ids.shape
    if have >= k:
        return scores[:, :k], ids[:, :k]
    pad_s = scores.new_full((q, k - have), PAD_SCORE)
    pad_i = ids.new_full((q, k - have), PAD_ID)
    return torch.cat([scores, pad_s], dim=1), torch.cat([ids, pad_i], dim=1)


class LocalMetadata:
    """id -> metadata dict for the local back-ends; an upsert without metadata clears the old entry."""

    def __init__(self) -> None:
        self._by_id: dict[int, Metadata] = {}

    def set(self, ids: Tensor, metadata: list[Metadata | None] | None) -> None:
        for row, i in enumerate(ids.tolist()):
            entry = None if metadata is None else metadata[row]
            if entry is None:
                self._by_id.pop(i, None)
            else:
                self._by_id[i] = dict(entry)

    def get(self, ids: Tensor) -> list[Metadata | None]:
        return [self._by_id.get(i) for i in ids.tolist()]

    def drop(self, ids: Tensor) -> None:
        for i in ids.tolist():
            self._by_id.pop(i, None)

    def to_json(self) -> str:
        return json.dumps({str(i): m for i, m in sorted(self._by_id.items())}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LocalMetadata:
        out = cls()
        out._by_id = {int(i): m for i, m in json.loads(text).items()}
        return out


class AbstractVectorDB(abc.ABC):
    """A store of L2-normalised vectors (n, d) under int64 ids, searched by inner product.

    Subclasses implement the storage maths in the ``_``-prefixed hooks; this class owns input conversion,
    validation (shape, finiteness, unit norm, ids), id assignment, and result padding.
    """

    def __init__(self, dim: int, *, norm_tolerance: float = DEFAULT_NORM_TOLERANCE) -> None:
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise InvalidValueError(f"dim must be a positive integer, got {shorten(dim)}")
        if not norm_tolerance >= 0:
            raise InvalidValueError(f"norm_tolerance must be >= 0, got {shorten(norm_tolerance)}")
        self._dim = int(dim)
        self.norm_tolerance = float(norm_tolerance)

    # ------------------------------------------------------------------ public API
    @property
    def dim(self) -> int:
        """Dimension d of the stored vectors."""
        return self._dim

    @property
    def device(self) -> torch.device:
        """Where returned tensors live (CPU unless a back-end stores on an accelerator)."""
        return torch.device("cpu")

    def __len__(self) -> int:
        return self._count()

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, (int, np.integer)) or isinstance(item, bool) or item < 0:
            return False
        return self._missing(torch.tensor([int(item)], dtype=torch.int64)).numel() == 0

    def add(
        self,
        vectors: ArrayLike,
        ids: IdsLike | None = None,
        metadata: Sequence[Metadata | None] | None = None,
    ) -> Tensor:
        """Upsert vectors (n, d), optionally under ``ids`` (n,) with one metadata dict each.

        Returns the ids (n,) int64 actually used. An existing id is replaced; ids default to the next free
        integers. Raises ``ValueError`` (and writes nothing) on a wrong shape, NaN/Inf, a non-normalised row,
        negative or repeated ids, or metadata of the wrong length.
        """
        x = self._validate_vectors(vectors, name="vectors")
        n = x.shape[0]
        if ids is None:
            start = self._next_free_id() if n else 0
            if start + n - 1 > MAX_ID:
                raise InvalidValueError(
                    f"no automatic ids left: the next free id is {start} and {n} are needed, but ids stop at "
                    f"2**63 - 1 = {MAX_ID} (int64). Pass explicit ids to add(), e.g. the free ones below the "
                    "largest stored id.")
            id_t = torch.arange(n, dtype=torch.int64) + start  # (arange's end may be 2**63 itself)
        else:
            id_t = as_id_vector(ids)
            if id_t.numel() != n:
                raise InvalidValueError(f"got {id_t.numel()} ids for {n} vectors")
            check_unique(id_t)
        meta = check_metadata(metadata, n)
        if n:
            self._upsert(x, id_t, meta)
        return id_t

    def search(self, queries: ArrayLike, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` by inner product: (scores (q, k) float32, ids (q, k) int64), best first.

        Padded with score ``-inf`` / id ``-1`` where fewer than ``k`` results exist.
        """
        xq = self._validate_vectors(queries, name="queries")
        k = self._check_padding(self._check_k(k), xq.shape[0])
        if xq.shape[0] == 0:
            return (torch.empty(0, k, dtype=torch.float32, device=self.device),
                    torch.empty(0, k, dtype=torch.int64, device=self.device))
        scores, ids = self._search(xq, k)
        return pad_results(scores, ids, k)

    def search_with_vectors(self, queries: ArrayLike, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-``k`` with the candidates' vectors: (scores (q, k), ids (q, k), vectors (q, k, d)).

        What SuperGlobal re-ranking consumes (its top-M). Padded entries get a zero vector. The default is
        ``search`` then ``get`` of the distinct ids; back-ends with a cheaper path override
        :meth:`_search_with_vectors`.
        """
        xq = self._validate_vectors(queries, name="queries")
        k = self._check_padding(self._check_k(k), xq.shape[0])
        if xq.shape[0] == 0:
            return (torch.empty(0, k, dtype=torch.float32, device=self.device),
                    torch.empty(0, k, dtype=torch.int64, device=self.device),
                    torch.empty(0, k, self.dim, dtype=torch.float32, device=self.device))
        scores, ids, vectors = self._search_with_vectors(xq, k)
        if vectors.shape[1] < k:
            vectors = torch.cat([vectors, vectors.new_zeros(xq.shape[0], k - vectors.shape[1], self.dim)], dim=1)
        return (*pad_results(scores, ids, k), vectors[:, :k])

    def _search_with_vectors(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Validated queries -> (scores (q, k'), ids (q, k'), vectors (q, k', d) float32), k' <= k, unpadded."""
        scores, ids = self._search(queries, k)
        return scores, ids, self._gather_vectors(ids)

    def get(self, ids: IdsLike) -> Tensor:
        """Stored vectors (n, d) float32 of ``ids`` (n,), in that order. Unknown ids: ``KeyError`` naming them."""
        id_t = as_id_vector(ids)
        if id_t.numel() == 0:
            return torch.empty(0, self.dim, dtype=torch.float32, device=self.device)
        return self._get(id_t)

    def get_metadata(self, ids: IdsLike) -> list[Metadata | None]:
        """The metadata dict (or None) stored with each id. Unknown ids: ``KeyError`` naming them."""
        id_t = as_id_vector(ids)
        if id_t.numel() == 0:
            return []
        return self._get_metadata(id_t)

    def delete(self, ids: IdsLike, *, missing_ok: bool = False) -> None:
        """Remove ``ids``. An id not stored is a ``KeyError`` (nothing deleted) unless ``missing_ok``."""
        id_t = torch.unique(as_id_vector(ids))
        if id_t.numel() == 0:
            return
        missing = self._missing(id_t)
        if missing.numel():
            if not missing_ok:
                raise unknown_ids_error(missing.numpy())
            id_t = id_t[~torch.isin(id_t, missing)]
            if id_t.numel() == 0:
                return
        self._delete(id_t)

    def clear(self) -> None:
        """Remove every stored vector."""
        ids = self._stored_ids()
        if ids.numel():
            self._delete(torch.unique(ids.cpu()))

    def ids(self) -> Tensor:
        """All stored ids (n,) int64, sorted ascending."""
        return torch.sort(self._stored_ids()).values

    def save(self, path: str | os.PathLike) -> None:
        """Write the database to ``path`` atomically (local back-ends only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved to a file")

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> AbstractVectorDB:
        """Read a database written by :meth:`save`, verifying it (local back-ends only)."""
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from a file")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, n={len(self)})"

    # ------------------------------------------------------------------ shared helpers
    def _validate_vectors(self, x: ArrayLike, *, name: str) -> Tensor:
        t = as_float_matrix(x, dim=self.dim, name=name)
        check_unit_norm(t, tolerance=self.norm_tolerance, name=name)
        return t

    @staticmethod
    def _check_k(k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidValueError(f"k must be a positive integer, got {shorten(k)}")
        return int(k)

    def _check_padding(self, k: int, n_queries: int) -> int:
        """``k``, unless the (q, k) result would be padded past :data:`MAX_PADDED` entries beyond what is stored
        (``k=10**12`` would allocate terabytes of padding): then a ValueError giving the largest useful k."""
        if n_queries * k > MAX_PADDED:
            count = self._count()
            if k > count:
                raise InvalidValueError(f"k={k} asks for more results than the {count} stored vectors: the "
                                        f"padded ({n_queries}, {k}) result would not fit in memory; ask for k <= "
                                        f"{max(count, 1)}")
        return k

    def _gather_vectors(self, ids: Tensor) -> Tensor:
        """(q, k) ids with -1 padding -> (q, k, d) vectors, fetching each distinct id once."""
        flat = ids.reshape(-1).cpu()
        valid = flat >= 0
        out = torch.zeros(flat.numel(), self.dim, dtype=torch.float32, device=self.device)
        if bool(valid.any()):
            uniq, inverse = torch.unique(flat[valid], return_inverse=True)
            vecs = self.get(uniq).to(self.device)
            out[valid.to(self.device)] = vecs[inverse.to(self.device)]
        return out.reshape(*ids.shape, self.dim)

    def _next_free_id(self) -> int:
        stored = self._stored_ids()
        return int(stored.max()) + 1 if stored.numel() else 0

    def _missing(self, ids: Tensor) -> Tensor:
        """The subset of ``ids`` (int64 CPU) that is not stored."""
        return ids[~torch.isin(ids, self._stored_ids().cpu())]

    # ------------------------------------------------------------------ back-end hooks
    @abc.abstractmethod
    def _count(self) -> int:
        """Number of stored vectors."""

    @abc.abstractmethod
    def _upsert(self, vectors: Tensor, ids: Tensor, metadata: list[Metadata | None] | None) -> None:
        """Store validated float32 ``vectors`` (n, d) under distinct int64 CPU ``ids`` (n,), replacing any."""

    @abc.abstractmethod
    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(scores (q, k'), ids (q, k')) best first for validated float32 queries, k' <= k (base pads)."""

    @abc.abstractmethod
    def _get(self, ids: Tensor) -> Tensor:
        """(n, d) float32 vectors of int64 CPU ``ids``; raise :func:`unknown_ids_error` for unknown ones."""

    @abc.abstractmethod
    def _get_metadata(self, ids: Tensor) -> list[Metadata | None]:
        """Metadata of int64 CPU ``ids``; raise :func:`unknown_ids_error` for unknown ones."""

    @abc.abstractmethod
    def _delete(self, ids: Tensor) -> None:
        """Remove distinct, stored int64 CPU ``ids``."""

    @abc.abstractmethod
    def _stored_ids(self) -> Tensor:
        """All stored ids (n,) int64, any order."""
