"""Exact search over a torch tensor, on CPU or CUDA, in float32 or float16 storage.

Memory stays bounded whatever the collection size: the database is scanned in chunks of ``chunk_size`` rows
and queries in blocks, so the largest temporary is a (query block, chunk) score matrix (plus, for float16
storage, one chunk converted to float32 so that scores accumulate in float32). The per-chunk top-k lists are
merged as the scan goes (:func:`models.functional.blockwise_topk`), which gives exactly the top-k of the whole
database.

Deletion is a swap-remove: the rows of deleted ids are filled with the last rows of the storage, so storage
stays dense (no mask to skip at search time) at the price of row order, which nothing relies on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from common.errors import InvalidValueError, MissingFileError
from common.io import atomic_torch_save
from helpers.vector_db.base import (
    AbstractVectorDB,
    CorruptIndexError,
    LocalMetadata,
    Metadata,
    unknown_ids_error,
)
from models import functional as MF

logger = logging.getLogger(__name__)

FORMAT_NAME = "helpers.vector_db.TensorVectorDB"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_SCORE_BUDGET = 1 << 26  # elements of the (query block, chunk) score matrix: 256 MB of float32
_LONG_SCAN = 2e10  # multiply-adds of a search worth a progress bar (seconds on a CPU)
_GEMM_BYTES = 1 << 23  # float32 database rows multiplied at a time on the CPU (8 MB: L3-resident)
_UPSERT_ROWS = 1 << 15  # added rows converted and copied at a time (no second copy of a large add on the device)


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.removeprefix("torch."), dtype)
    if dtype not in _DTYPES.values():
        raise InvalidValueError(f"dtype must be torch.float32 or torch.float16, got {dtype!r}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _payload_digest(header: dict[str, Any], vectors: Tensor, ids: Tensor, metadata_json: str) -> str:
    """sha256 over everything a saved file holds, so any flipped or missing byte is caught on load."""
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True).encode())
    for t in (vectors, ids):
        arr = np.ascontiguousarray(t.numpy())
        if arr.size:  # (an empty database has no bytes, and a memoryview of none cannot be cast)
            h.update(memoryview(arr).cast("B"))
    h.update(metadata_json.encode())
    return h.hexdigest()


class TensorVectorDB(AbstractVectorDB):
    """Exact inner-product search over vectors held in one torch tensor (CPU or CUDA, float32 or float16).

    Args:
        dim: descriptor dimension d.
        device: where the vectors live and the search runs; results are returned there.
        dtype: storage dtype, ``torch.float32`` or ``torch.float16`` (half the memory; scores still in float32).
        chunk_size: database rows scored at a time (bounds search memory).
        norm_tolerance: allowed |norm - 1| of added vectors and queries.
        progress: show a progress bar over database chunks on long searches.
    """

    def __init__(
        self,
        dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        chunk_size: int = 65536,
        *,
        norm_tolerance: float = 1e-3,
        progress: bool = True,
    ) -> None:
        super().__init__(dim, norm_tolerance=norm_tolerance)
        self._device = torch.device(device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidValueError(f"device {device!r} requested but CUDA is not available")
        self._dtype = _parse_dtype(dtype)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise InvalidValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.progress = progress
        self._n = 0
        self._vectors = torch.empty(0, self.dim, dtype=self._dtype, device=self._device)
        self._row_ids = torch.empty(0, dtype=torch.int64, device=self._device)
        self._row_of: dict[int, int] = {}
        self._meta = LocalMetadata()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the vectors."""
        return self._dtype

    def __repr__(self) -> str:
        return (f"TensorVectorDB(dim={self.dim}, n={self._n}, device={str(self._device)!r}, "
                f"dtype={_dtype_name(self._dtype)})")

    def reserve(self, capacity: int) -> None:
        """Allocate storage for ``capacity`` vectors now, so that a bulk load through many ``add`` calls never
        regrows it (geometric growth briefly holds the old and the new buffer: up to 2.5x the data)."""
        if not isinstance(capacity, int) or capacity < 0:
            raise InvalidValueError(f"capacity must be a non-negative integer, got {capacity!r}")
        if capacity > self._vectors.shape[0]:
            vectors = torch.empty(capacity, self.dim, dtype=self._dtype, device=self._device)
            row_ids = torch.empty(capacity, dtype=torch.int64, device=self._device)
            vectors[: self._n] = self._vectors[: self._n]
            row_ids[: self._n] = self._row_ids[: self._n]
            self._vectors, self._row_ids = vectors, row_ids

    # ------------------------------------------------------------------ storage maths
    def _count(self) -> int:
        return self._n

    def _reserve(self, capacity: int) -> None:
        """Grow the buffers geometrically so that a stream of small adds costs amortised O(n d)."""
        if capacity <= self._vectors.shape[0]:
            return
        new_cap = max(capacity, self._vectors.shape[0] * 3 // 2, 16)
        vectors = torch.empty(new_cap, self.dim, dtype=self._dtype, device=self._device)
        row_ids = torch.empty(new_cap, dtype=torch.int64, device=self._device)
        vectors[: self._n] = self._vectors[: self._n]
        row_ids[: self._n] = self._row_ids[: self._n]
        self._vectors, self._row_ids = vectors, row_ids

    def _write_rows(self, vectors: Tensor, *, rows: Tensor | None = None, start: int = 0) -> None:
        """Storage rows ``rows`` (k,), or rows ``start`` .. ``start + k``, <- ``vectors`` (k, d) in storage dtype,
        ``_UPSERT_ROWS`` at a time: a large add never holds a second whole copy on the device (beside the storage
        it reserved)."""
        for s in range(0, vectors.shape[0], _UPSERT_ROWS):
            block = vectors[s : s + _UPSERT_ROWS].to(device=self._device, dtype=self._dtype)
            if rows is None:
                self._vectors[start + s : start + s + block.shape[0]] = block
            else:
                self._vectors[rows[s : s + _UPSERT_ROWS].to(self._device)] = block

    def _upsert(self, vectors: Tensor, ids: Tensor, metadata: list[Metadata | None] | None) -> None:
        id_list = ids.tolist()
        rows = [self._row_of.get(i, -1) for i in id_list]
        existing = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
        if bool(existing.any()):
            old_rows = torch.tensor([r for r in rows if r >= 0], dtype=torch.int64)
            self._write_rows(vectors[existing.to(vectors.device)], rows=old_rows)
        fresh = ~existing
        n_new = int(fresh.sum())
        if n_new:
            self._reserve(self._n + n_new)
            self._write_rows(vectors if n_new == len(id_list) else vectors[fresh.to(vectors.device)], start=self._n)
            new_ids = ids[fresh]
            self._row_ids[self._n : self._n + n_new] = new_ids.to(self._device)
            for offset, i in enumerate(new_ids.tolist()):
                self._row_of[i] = self._n + offset
            self._n += n_new
        self._meta.set(ids, metadata)

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        scores, rows = self._search_rows(queries, k)
        return scores, self._row_ids[rows]

    def _search_with_vectors(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        # the rows found are read directly: no id -> row lookups (the generic path's per-id dictionary walk
        # cost 0.5 s for 70 queries x 400 candidates, more than SuperGlobal's re-ranking itself)
        scores, rows = self._search_rows(queries, k)
        return scores, self._row_ids[rows], self._vectors[rows].to(torch.float32)

    def _search_rows(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` (scores (q, k'), storage rows (q, k')), k' = min(k, n), by
        :func:`models.functional.blockwise_topk`: ``chunk_size`` rows a block, as many queries together as keep the
        score matrix under ``_SCORE_BUDGET``; on the CPU ~8 MB of float32 rows multiplied at a time, the size at
        which a float16 block converted to float32 is still in cache when the GEMM reads it (and at which BLAS runs
        a few queries against many rows best)."""
        xq = queries.to(device=self._device, dtype=torch.float32)
        if self._n == 0:
            empty = torch.empty(xq.shape[0], 0, device=self._device)
            return empty, empty.long()
        database = self._vectors[: self._n]
        query_block = max(1, _SCORE_BUDGET // min(self.chunk_size, self._n))
        gemm_rows = None if self._device.type == "cuda" else max(1, _GEMM_BYTES // (4 * self.dim))
        # a bar only where the scan takes seconds, not on every small search
        long_scan = self._n > self.chunk_size and min(xq.shape[0], query_block) * self._n * self.dim >= _LONG_SCAN
        bar = None
        if self.progress and long_scan:
            def bar(blocks: list) -> tqdm:
                return tqdm(blocks, desc="search", unit="chunk", leave=False)
        return MF.blockwise_topk(xq, database, k, block=self.chunk_size, gemm_rows=gemm_rows,
                                 query_block=query_block, progress=bar)

    def _rows(self, ids: Tensor) -> Tensor:
        rows = [self._row_of.get(i, -1) for i in ids.tolist()]
        if -1 in rows:
            raise unknown_ids_error([i for i, r in zip(ids.tolist(), rows) if r < 0])
        return torch.tensor(rows, dtype=torch.int64, device=self._device)

    def _get(self, ids: Tensor) -> Tensor:
        return self._vectors[self._rows(ids)].to(torch.float32)

    def _get_metadata(self, ids: Tensor) -> list[Metadata | None]:
        self._rows(ids)
        return self._meta.get(ids)

    def _missing(self, ids: Tensor) -> Tensor:
        return ids[torch.tensor([i not in self._row_of for i in ids.tolist()], dtype=torch.bool)]

    def _delete(self, ids: Tensor) -> None:
        dead = torch.sort(self._rows(ids)).values
        n, new_n = self._n, self._n - dead.numel()
        alive_tail = torch.ones(n - new_n, dtype=torch.bool, device=self._device)
        alive_tail[dead[dead >= new_n] - new_n] = False
        movers = torch.arange(new_n, n, device=self._device)[alive_tail]
        holes = dead[dead < new_n]  # as many holes below new_n as live rows above it
        self._vectors[holes] = self._vectors[movers]
        self._row_ids[holes] = self._row_ids[movers]
        for i in ids.tolist():
            del self._row_of[i]
        for row, i in zip(holes.tolist(), self._row_ids[holes].tolist()):
            self._row_of[i] = row
        self._n = new_n
        self._meta.drop(ids)
        if self._vectors.shape[0] > 64 and self._n < self._vectors.shape[0] // 4:
            # give memory back after large deletions
            self._vectors = self._vectors[: self._n].clone()
            self._row_ids = self._row_ids[: self._n].clone()

    def _stored_ids(self) -> Tensor:
        return self._row_ids[: self._n].cpu()

    def _next_free_id(self) -> int:
        return int(self._row_ids[: self._n].max()) + 1 if self._n else 0

    # ------------------------------------------------------------------ persistence
    def _header(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dim": self.dim,
                "dtype": _dtype_name(self._dtype), "count": self._n}

    def save(self, path: str | os.PathLike) -> None:
        """Write vectors, ids, dtype, dim, metadata and a sha256 of them to ``path`` atomically
        (``torch.save`` of tensors, strings and numbers only, so it loads with ``weights_only=True``). Only the
        live rows are written: nothing of a deleted vector can be read back from the file."""
        header = self._header()
        # copies of exactly the live rows: torch.save writes a tensor's whole storage, and a slice of the buffer
        # would carry its spare capacity and the rows of deleted ids into the file
        vectors = self._vectors[: self._n].to("cpu", copy=True).contiguous()
        ids = self._row_ids[: self._n].to("cpu", copy=True).contiguous()
        metadata_json = self._meta.to_json()
        payload = {**header, "vectors": vectors, "ids": ids, "metadata": metadata_json,
                   "norm_tolerance": self.norm_tolerance, "chunk_size": self.chunk_size,
                   "sha256": _payload_digest(header, vectors, ids, metadata_json)}
        atomic_torch_save(payload, path)  # a full disk: one line naming the file and the errno
        logger.info("saved %d vectors (dim %d, %s) to %s", self._n, self.dim, header["dtype"], path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        chunk_size: int | None = None,
        progress: bool = True,
    ) -> TensorVectorDB:
        """Read a file written by :meth:`save` onto ``device``; ``dtype`` converts storage (default: as saved).

        Raises ``FileNotFoundError`` if there is no file and :class:`CorruptIndexError` if it is truncated,
        corrupted (checksum mismatch) or inconsistent (shapes, dtype, ids).
        """
        path = Path(path)
        missing = f"no saved TensorVectorDB at {path} (write one with TensorVectorDB.save)"
        if not path.is_file():
            raise MissingFileError(missing)
        try:
            f = open(path, "rb")  # opened once: a file removed meanwhile is missing, never "corrupted"
        except FileNotFoundError:
            raise MissingFileError(missing) from None
        with f:
            try:
                payload = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises several types for a damaged zip/pickle
                raise CorruptIndexError(f"{path} is truncated or corrupted and cannot be read: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
            raise CorruptIndexError(f"{path} is not a saved TensorVectorDB")
        try:
            header = {key: payload[key] for key in ("format", "version", "dim", "dtype", "count")}
            vectors, ids, metadata_json = payload["vectors"], payload["ids"], payload["metadata"]
            digest = payload["sha256"]
        except KeyError as exc:
            raise CorruptIndexError(f"{path} lacks the field {exc}") from exc
        if header["version"] != FORMAT_VERSION:
            raise CorruptIndexError(f"{path} has format version {header['version']}, expected {FORMAT_VERSION}")
        dim, count = header["dim"], header["count"]
        if header["dtype"] not in _DTYPES or vectors.dtype != _DTYPES[header["dtype"]]:
            raise CorruptIndexError(f"{path}: vectors have dtype {vectors.dtype}, header says {header['dtype']}")
        if tuple(vectors.shape) != (count, dim) or tuple(ids.shape) != (count,) or ids.dtype != torch.int64:
            raise CorruptIndexError(
                f"{path}: vectors {tuple(vectors.shape)} / ids {tuple(ids.shape)} {ids.dtype} do not match the "
                f"header (count {count}, dim {dim})")
        if _payload_digest(header, vectors, ids, metadata_json) != digest:
            raise CorruptIndexError(f"{path}: sha256 checksum mismatch, the file is corrupted")
        if count and (int(ids.min()) < 0 or torch.unique(ids).numel() != count):
            raise CorruptIndexError(f"{path}: ids are negative or repeated")
        db = cls(dim, device=device, dtype=dtype or header["dtype"],
                 chunk_size=chunk_size or payload.get("chunk_size", 65536),
                 norm_tolerance=payload.get("norm_tolerance", 1e-3), progress=progress)
        db._vectors = vectors.to(device=db._device, dtype=db._dtype)
        db._row_ids = ids.to(db._device)
        db._row_of = {i: row for row, i in enumerate(ids.tolist())}
        db._n = count
        db._meta = LocalMetadata.from_json(metadata_json)
        logger.info("loaded %d vectors (dim %d) from %s", count, dim, path)
        return db
