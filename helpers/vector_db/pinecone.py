"""Pinecone back-end: a remote serverless or pod index, reached through the official ``pinecone`` SDK (v10), as an
:class:`AbstractVectorDB` (:class:`PineconeVectorDB`, which holds the request limits, retries and connection rules).
``pinecone`` is optional and imported when a database connects, never at module import (``pip install pinecone``;
never the deprecated ``pinecone-client``, which breaks ``import pinecone``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from common.errors import InvalidValueError, MissingDependencyError, ProjectRuntimeError, shorten
from helpers.vector_db.base import AbstractVectorDB, Metadata, unknown_ids_error
from helpers.vector_db.tensor import TensorVectorDB

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_RECORDS_PER_UPSERT = 1000
MAX_UPSERT_BYTES = 2 * 1024 * 1024
MAX_IDS_PER_REQUEST = 1000  # fetch and delete
MAX_QUERY_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_TOP_K = 10_000
UPSERT_SAFETY = 0.8  # fraction of the 2 MB request limit a batch may fill (headers, JSON framing)
DECIMALS = 9  # values are sent rounded to this many decimals: <= 13 JSON bytes each, off by <= 5e-10
_BYTES_PER_VALUE = 13  # "-0.123456789,"
_BYTES_PER_RECORD = 64  # {"id":"...","values":[],"metadata":} framing
_BYTES_PER_FETCHED_VALUE = 20  # a returned float32 printed as a float: up to ~20 bytes
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


class PineconeWriteError(ProjectRuntimeError):
    """A write (upsert or delete) that failed for good; ``failed_ids`` (int64 tensor) lists every id it
    did not apply. Everything else in the call was applied."""

    def __init__(self, message: str, failed_ids: Sequence[int]) -> None:
        self.failed_ids = torch.tensor(sorted(int(i) for i in failed_ids), dtype=torch.int64)
        super().__init__(message)


class PineconeServiceError(ProjectRuntimeError):
    """Pinecone refused a request for good (a wrong API key, an index or host that is not there, a request it
    rejects) or could not be reached: one line naming the host and the HTTP status, never the API key."""


def service_error(exc: BaseException, what: str, *, where: str, api_key: str | None = None
                  ) -> PineconeServiceError | None:
    """The one-line :class:`PineconeServiceError` for an SDK or connection failure of request ``what`` to
    ``where`` (the host or index name), or None for anything else (a bug keeps its traceback). The API key
    is cut out of whatever the SDK's message holds."""
    name = type(exc).__name__
    status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
    from_sdk = type(exc).__module__.split(".")[0] in ("pinecone", "urllib3")
    if not (from_sdk or isinstance(exc, (ConnectionError, TimeoutError))):
        return None
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = lines[0] if lines else name
    if api_key:
        detail = detail.replace(api_key, "<API key>")
    detail = detail if len(detail) <= 200 else detail[:200] + "..."
    if status in (401, 403):
        return PineconeServiceError(f"Pinecone refused the API key for {where} (HTTP {status}, {what}): check "
                                    "PINECONE_API_KEY (or api_key=) for this project's key")
    if isinstance(status, int):
        hint = ": check --host / --index-name (PINECONE_HOST, PINECONE_INDEX)" if status == 404 else ""
        return PineconeServiceError(f"Pinecone answered HTTP {status} to {what} at {where}{hint} ({detail})")
    if "Connection" in name or "Timeout" in name or "Protocol" in name or isinstance(exc, (ConnectionError,
                                                                                            TimeoutError)):
        return PineconeServiceError(f"cannot reach Pinecone at {where} ({what} failed: {name}: {detail}): check "
                                    "the host (--host, PINECONE_HOST) and the network")
    return PineconeServiceError(f"Pinecone failed on {what} at {where}: {name}: {detail}")


class _ShortWrite(RuntimeError):
    """The server acknowledged fewer records than it was sent: retried like a transient error."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failed Pinecone call is worth retrying: throttling, a server error, a dropped connection,
    a timeout. Duck-typed on the SDK's exceptions so that it survives SDK versions."""
    if isinstance(exc, (_ShortWrite, TimeoutError, ConnectionError)):
        return True
    status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
    if isinstance(status, int):
        return status in _TRANSIENT_STATUS or status >= 500
    return type(exc).__name__ in {"PineconeConnectionError", "PineconeTimeoutError", "ProtocolError"}


def id_to_str(i: int) -> str:
    """int64 id -> Pinecone record id."""
    return str(int(i))


def str_to_id(s: str) -> int:
    """Pinecone record id -> int64; only the canonical decimal form that :func:`id_to_str` writes."""
    if not (s.isascii() and s.isdigit()) or (len(s) > 1 and s[0] == "0") or int(s) > np.iinfo(np.int64).max:
        raise InvalidValueError(f"record id {shorten(s)} is not an int64 id written by PineconeVectorDB "
                                "(use a namespace of its own)")
    return int(s)


def record_bytes(dim: int, metadata: Metadata | None = None) -> int:
    """Upper bound of one upsert record's JSON size in bytes (values rounded to ``DECIMALS``)."""
    extra = len(json.dumps(metadata, separators=(",", ":"))) if metadata else 0
    return dim * _BYTES_PER_VALUE + _BYTES_PER_RECORD + extra


def default_batch_size(dim: int) -> int:
    """Records per upsert request at dimension ``dim`` without metadata: floor(0.8 * 2 MB / record size),
    at most 1,000 (e.g. 61 at d = 2048)."""
    return max(1, min(MAX_RECORDS_PER_UPSERT, int(MAX_UPSERT_BYTES * UPSERT_SAFETY) // record_bytes(dim)))


def plan_batches(sizes: Sequence[int], *, max_records: int, max_bytes: int) -> list[range]:
    """Split records of the given byte sizes, in order, into consecutive batches under both limits."""
    batches, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_records or total + size > max_bytes):
            batches.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        batches.append(range(start, len(sizes)))
    return batches


def _chunks(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


class PineconeVectorDB(AbstractVectorDB):
    """A Pinecone namespace seen as an :class:`AbstractVectorDB` (inner product; create the index with the
    ``dotproduct`` metric, or ``cosine``, which agrees on unit vectors).

    What it adds over the SDK, for retrieval at scale:

    - int64 ids, stored as their decimal strings (``7`` <-> ``"7"``); an id in the namespace that is not such a
      string is reported, not guessed at.
    - writes that stay inside Pinecone's request limits: at most 1,000 records and 2 MB per upsert (batches are
      sized from each record's JSON length; values are sent rounded to 9 decimals, which moves none by more than
      5e-10 and bounds each at 13 bytes of JSON), at most 1,000 ids per fetch or delete.
    - retries: the SDK already retries each HTTP request a few times; on top of that every batch is retried with
      exponential backoff (``backoff * 2 ** attempt``, jittered) on transient errors (HTTP 408/429/5xx, connection
      errors, timeouts). A batch that still fails raises :class:`PineconeWriteError` naming exactly the ids not
      written; nothing is lost silently. With ``verify=True`` every upsert response must report its whole batch
      and the namespace count (``describe_index_stats``, eventually consistent, polled) must account for the ids.
    - queries issued concurrently from a thread pool, one request per query vector, never asking for values:
      a query response is capped at 4 MB, so ``search_with_vectors`` for SuperGlobal's top-400 reads the
      candidates' vectors from a local cache of what this process upserted (``cache_vectors=True``) and fetches
      the rest in chunks.

    Connection settings come from the arguments or the environment (``PINECONE_API_KEY``, ``PINECONE_HOST``,
    ``PINECONE_INDEX``). A host is used as given; give the scheme (``http://127.0.0.1:5080`` for a local
    emulator), as a bare host is taken as https. Passing the host skips the control-plane lookup of the name.

    Args:
        dim: descriptor dimension d (checked against the index).
        index_name: index name (or env ``PINECONE_INDEX``); costs one control-plane lookup.
        host: index host (or env ``PINECONE_HOST``), e.g. ``https://my-index-abc.svc.pinecone.io``.
        api_key: API key (or env ``PINECONE_API_KEY``).
        namespace: namespace holding this database ("" = the default one).
        batch_size: cap on records per upsert (default: as many as fit in 0.8 x 2 MB, at most 1,000).
        max_retries: retries of a failing batch / query after the SDK's own, on transient errors.
        backoff: first retry delay in seconds, doubled at each retry.
        verify: check upsert acknowledgements and the namespace count after each ``add``.
        cache_vectors: keep the vectors this process upserted in memory (float32) so that ``get`` and
            ``search_with_vectors`` need no fetch for them. Stale if another process rewrites those ids.
        max_workers: concurrent requests (queries, batches, fetches).
        timeout: seconds per HTTP attempt.
        index: an SDK data-plane ``Index`` already opened (then ``api_key``/``host``/``index_name`` are unused).
        norm_tolerance: allowed |norm - 1| of added vectors and queries.
        progress: progress bars over long batched writes.
    """

    def __init__(
        self,
        dim: int,
        index_name: str | None = None,
        host: str | None = None,
        api_key: str | None = None,
        namespace: str = "",
        batch_size: int | None = None,
        max_retries: int = 5,
        backoff: float = 0.5,
        verify: bool = True,
        cache_vectors: bool = True,
        *,
        max_workers: int = 8,
        timeout: float = 30.0,
        index: Any = None,
        norm_tolerance: float = 1e-3,
        progress: bool = True,
    ) -> None:
        super().__init__(dim, norm_tolerance=norm_tolerance)
        if batch_size is not None and not 1 <= batch_size <= MAX_RECORDS_PER_UPSERT:
            raise InvalidValueError(f"batch_size must be in [1, {MAX_RECORDS_PER_UPSERT}], got {batch_size}")
        if max_retries < 0 or backoff < 0 or max_workers < 1:
            raise InvalidValueError("need max_retries >= 0, backoff >= 0 and max_workers >= 1")
        self.namespace = namespace
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.backoff = backoff
        self.verify = verify
        self.max_workers = max_workers
        self.progress = progress
        self._rng = random.Random()
        self._where = host or os.environ.get("PINECONE_HOST") or index_name or os.environ.get("PINECONE_INDEX") \
            or "the given index"
        self._api_key = api_key or os.environ.get("PINECONE_API_KEY")
        self._cache = TensorVectorDB(dim, norm_tolerance=math.inf, progress=False) if cache_vectors else None
        self._next_id: int | None = None
        self._index = index if index is not None else self._connect(index_name, host, api_key, timeout)
        stats_dim = getattr(self._call(self._index.describe_index_stats, "describe_index_stats"), "dimension", None)
        if stats_dim and stats_dim != dim:
            raise InvalidValueError(f"the Pinecone index has dimension {stats_dim}, this database was built for {dim}")

    @staticmethod
    def _connect(index_name: str | None, host: str | None, api_key: str | None, timeout: float) -> Any:
        api_key = api_key or os.environ.get("PINECONE_API_KEY")
        host = host or os.environ.get("PINECONE_HOST")
        index_name = index_name or os.environ.get("PINECONE_INDEX")
        if not api_key:
            raise InvalidValueError("no Pinecone API key: pass api_key=... or set PINECONE_API_KEY")
        if not (host or index_name):
            raise InvalidValueError("no Pinecone index: pass host=... (or set PINECONE_HOST), or index_name=... "
                                    "(or set PINECONE_INDEX)")
        try:
            from pinecone import Pinecone
        except ImportError as exc:
            raise MissingDependencyError("PineconeVectorDB needs the Pinecone SDK: `pip install pinecone` "
                                         "(not the deprecated pinecone-client)") from exc
        try:
            client = Pinecone(api_key=api_key, timeout=timeout)
            open_index = getattr(client, "index", None) or client.Index  # v10 name, then the older one
            return open_index(name=index_name or "", host=host or "")
        except Exception as exc:
            error = service_error(exc, "opening the index", where=host or index_name, api_key=api_key)
            if error is None:
                raise
            raise error from None

    def close(self) -> None:
        """Release the SDK's HTTP connections."""
        close = getattr(self._index, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> PineconeVectorDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PineconeVectorDB(dim={self.dim}, namespace={self.namespace!r})"

    # ------------------------------------------------------------------ request plumbing
    def _call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` retried with jittered exponential backoff on transient errors."""
        for attempt in range(self.max_retries + 1):
            try:
                return fn()
            except Exception as exc:
                if attempt == self.max_retries or not is_transient(exc):
                    error = service_error(exc, what, where=self._where, api_key=self._api_key)
                    if error is None:
                        raise
                    raise error from None
                delay = self.backoff * 2**attempt * self._rng.uniform(0.5, 1.0)
                logger.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(exc).__name__, exc,
                               attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _parallel(self, fn: Callable[[int], T], n: int, *, desc: str) -> list[tuple[T | None, Exception | None]]:
        """Run ``fn(i)`` for i < n on the thread pool; per task its result or its exception."""
        out: list[tuple[T | None, Exception | None]] = [(None, None)] * n
        if n == 0:
            return out
        with ThreadPoolExecutor(max_workers=min(self.max_workers, n)) as pool:
            futures = {pool.submit(fn, i): i for i in range(n)}
            done = as_completed(futures)
            for fut in tqdm(done, total=n, desc=desc, leave=False, disable=not self.progress or n < 8):
                i = futures[fut]
                try:
                    out[i] = (fut.result(), None)
                except Exception as exc:
                    out[i] = (None, exc)
        return out

    def _namespace_count(self) -> int:
        stats = self._call(self._index.describe_index_stats, "describe_index_stats")
        namespaces = getattr(stats, "namespaces", None) or {}
        # the default namespace is reported as "__default__" by current servers, "" by older ones
        keys = (self.namespace,) if self.namespace else ("__default__", "")
        for key in keys:
            summary = namespaces.get(key)
            if summary is not None:
                count = getattr(summary, "vector_count", None)
                return int(count if count is not None else summary["vector_count"])
        return 0

    def _fetch(self, ids: Tensor) -> dict[int, Any]:
        """id -> SDK record for the ids that exist, fetched in size-bounded chunks, concurrently."""
        id_list = ids.tolist()
        per_chunk = max(1, min(MAX_IDS_PER_REQUEST, MAX_QUERY_RESPONSE_BYTES // (self.dim * _BYTES_PER_FETCHED_VALUE)))
        chunks = _chunks(len(id_list), per_chunk)

        def fetch(c: int) -> dict[str, Any]:
            wanted = [id_to_str(id_list[j]) for j in chunks[c]]
            resp = self._call(lambda: self._index.fetch(ids=wanted, namespace=self.namespace), "fetch")
            return dict(resp.vectors)

        found: dict[int, Any] = {}
        for result, exc in self._parallel(fetch, len(chunks), desc="fetch"):
            if exc is not None:
                raise exc
            found.update({str_to_id(k): v for k, v in result.items()})
        return found

    # ------------------------------------------------------------------ storage maths
    def _count(self) -> int:
        return self._namespace_count()

    def _upsert(self, vectors: Tensor, ids: Tensor, metadata: list[Metadata | None] | None) -> None:
        # what is sent (and cached) is the float32 of the 9-decimal value, the same thing the server stores
        values = np.round(vectors.cpu().numpy().astype(np.float64), DECIMALS)
        sent = torch.from_numpy(values.astype(np.float32))
        id_list = ids.tolist()
        sizes = [record_bytes(self.dim, None if metadata is None else metadata[r]) for r in range(len(id_list))]
        batches = plan_batches(sizes, max_records=self.batch_size or MAX_RECORDS_PER_UPSERT,
                               max_bytes=int(MAX_UPSERT_BYTES * UPSERT_SAFETY))
        count_before = self._namespace_count() if self.verify else 0

        def upsert(b: int) -> None:
            rows = batches[b]
            records = []
            for r in rows:
                record: dict[str, Any] = {"id": id_to_str(id_list[r]), "values": values[r].tolist()}
                if metadata is not None and metadata[r] is not None:
                    record["metadata"] = metadata[r]
                records.append(record)

            def send() -> None:
                resp = self._index.upsert(vectors=records, namespace=self.namespace)
                written = getattr(resp, "upserted_count", None)
                if self.verify and written is not None and written != len(records):
                    raise _ShortWrite(f"server acknowledged {written} of {len(records)} records")

            self._call(send, f"upsert of {len(records)} records")

        results = self._parallel(upsert, len(batches), desc="upsert")
        failed: list[int] = []
        for b, (_, exc) in enumerate(results):
            rows = batches[b]
            if exc is None:
                if self._cache is not None:
                    row_t = torch.as_tensor(list(rows))
                    self._cache.add(sent[row_t], ids[row_t],
                                    None if metadata is None else [metadata[r] for r in rows])
            else:
                logger.error("upsert batch of %d records failed for good: %s", len(rows), exc)
                failed.extend(id_list[r] for r in rows)
        top = max(id_list) + 1
        self._next_id = top if self._next_id is None else max(self._next_id, top)
        if failed:
            first = next(exc for _, exc in results if exc is not None)
            raise PineconeWriteError(
                f"{len(failed)} of {len(id_list)} vectors were not written to Pinecone after "
                f"{self.max_retries} retries ({type(first).__name__}: {first}); ids not written: "
                f"{sorted(failed)}", failed)
        if self.verify:
            self._verify_count(count_before, ids)

    def _verify_count(self, count_before: int, ids: Tensor) -> None:
        """The namespace must now hold between max(before, n) and before + n vectors (counts lag writes, so
        poll); if it stays short, find and name the ids that are absent."""
        lower, upper = max(count_before, ids.numel()), count_before + ids.numel()
        count = self._namespace_count()
        for attempt in range(self.max_retries):
            if count >= lower:
                break
            time.sleep(self.backoff * 2**attempt)
            count = self._namespace_count()
        if count > upper:
            logger.warning("namespace %r holds %d vectors, more than the %d expected: another writer?",
                           self.namespace, count, upper)
        if count < lower:
            absent = sorted(set(ids.tolist()) - set(self._fetch(ids)))
            if absent:
                if self._cache is not None:  # what the server lacks must not be answered from memory
                    self._cache.delete(absent, missing_ok=True)
                raise PineconeWriteError(f"Pinecone acknowledged the upsert but does not hold {len(absent)} ids: "
                                         f"{absent}", absent)
            logger.warning("namespace count %d is below the %d expected but every id can be fetched", count, lower)

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if k > MAX_TOP_K:
            raise InvalidValueError(f"Pinecone returns at most top_k={MAX_TOP_K}, got k={k}")
        xq = np.round(queries.cpu().numpy().astype(np.float64), DECIMALS)

        def query(r: int) -> list[tuple[int, float]]:
            vector = xq[r].tolist()  # the SDK wants a list, not an array
            resp = self._call(lambda: self._index.query(vector=vector, top_k=k, namespace=self.namespace,
                                                        include_values=False, include_metadata=False), "query")
            return [(str_to_id(m.id), float(m.score)) for m in resp.matches]

        scores = torch.full((xq.shape[0], k), float("-inf"), dtype=torch.float32)
        ids = torch.full((xq.shape[0], k), -1, dtype=torch.int64)
        for r, (matches, exc) in enumerate(self._parallel(query, xq.shape[0], desc="query")):
            if exc is not None:
                raise exc
            matches = sorted(matches, key=lambda m: -m[1])[:k]
            if matches:
                ids[r, : len(matches)] = torch.tensor([m[0] for m in matches], dtype=torch.int64)
                scores[r, : len(matches)] = torch.tensor([m[1] for m in matches], dtype=torch.float32)
        return scores, ids

    def search_with_vectors(self, queries: Any, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-``k`` with vectors (q, k, d). The queries never ask for values (a response is capped at 4 MB);
        vectors come from the local cache, and the others are fetched once each, in chunks."""
        return super().search_with_vectors(queries, k)

    def _split_cached(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        if self._cache is None:
            return ids[:0], ids
        remote = self._cache._missing(ids)
        return ids[~torch.isin(ids, remote)], remote

    def _get(self, ids: Tensor) -> Tensor:
        out = torch.empty(ids.numel(), self.dim, dtype=torch.float32)
        local, remote = self._split_cached(torch.unique(ids))
        rows: dict[int, Tensor] = {}
        if local.numel():
            rows.update(zip(local.tolist(), self._cache.get(local)))
        if remote.numel():
            found = self._fetch(remote)
            missing = [i for i in remote.tolist() if i not in found]
            if missing:
                raise unknown_ids_error(missing)
            rows.update({i: torch.tensor(found[i].values, dtype=torch.float32) for i in remote.tolist()})
        for j, i in enumerate(ids.tolist()):
            out[j] = rows[i]
        return out

    def _get_metadata(self, ids: Tensor) -> list[Metadata | None]:
        local, remote = self._split_cached(torch.unique(ids))
        meta: dict[int, Metadata | None] = {}
        if local.numel():
            meta.update(zip(local.tolist(), self._cache.get_metadata(local)))
        if remote.numel():
            found = self._fetch(remote)
            missing = [i for i in remote.tolist() if i not in found]
            if missing:
                raise unknown_ids_error(missing)
            meta.update({i: (dict(found[i].metadata) if found[i].metadata else None) for i in remote.tolist()})
        return [meta[i] for i in ids.tolist()]

    def _missing(self, ids: Tensor) -> Tensor:
        _, remote = self._split_cached(ids)
        if remote.numel() == 0:
            return remote
        found = self._fetch(remote)
        return remote[torch.tensor([i not in found for i in remote.tolist()], dtype=torch.bool)]

    def _delete(self, ids: Tensor) -> None:
        id_list = ids.tolist()
        chunks = _chunks(len(id_list), MAX_IDS_PER_REQUEST)

        def delete(c: int) -> None:
            wanted = [id_to_str(id_list[j]) for j in chunks[c]]
            self._call(lambda: self._index.delete(ids=wanted, namespace=self.namespace), "delete")

        results = self._parallel(delete, len(chunks), desc="delete")
        failed = [id_list[j] for c, (_, exc) in enumerate(results) if exc is not None for j in chunks[c]]
        done = torch.tensor(sorted(set(id_list) - set(failed)), dtype=torch.int64)
        if self._cache is not None and done.numel():
            self._cache.delete(done, missing_ok=True)
        if failed:
            first = next(exc for _, exc in results if exc is not None)
            raise PineconeWriteError(f"{len(failed)} ids were not deleted from Pinecone "
                                     f"({type(first).__name__}: {first}): {sorted(failed)}", failed)

    def clear(self) -> None:
        """Remove every vector of the namespace (one ``delete_all`` request: no listing needed)."""
        self._call(lambda: self._index.delete(delete_all=True, namespace=self.namespace), "delete of the namespace")
        if self._cache is not None:
            self._cache.clear()
        self._next_id = None

    def _stored_ids(self) -> Tensor:
        """Every id of the namespace, listed page by page (serverless indexes only)."""
        lister = getattr(self._index, "list_paginated", None)
        if lister is None:
            raise NotImplementedError("this Pinecone SDK cannot list ids (needs Index.list_paginated)")
        out: list[int] = []
        token: str | None = None
        while True:
            page = self._call(lambda t=token: lister(namespace=self.namespace, pagination_token=t), "list")
            out.extend(str_to_id(v if isinstance(v, str) else v.id) for v in (page.vectors or []))
            token = page.pagination.next if page.pagination is not None else None
            if not token:
                return torch.tensor(out, dtype=torch.int64)

    def _next_free_id(self) -> int:
        """One past the largest id seen: listed from the namespace once, then tracked locally. For a large
        remote namespace pass explicit ids to ``add`` instead (listing costs a request per 100 ids)."""
        if self._next_id is None:
            stored = self._stored_ids()
            self._next_id = int(stored.max()) + 1 if stored.numel() else 0
        return self._next_id

    # ------------------------------------------------------------------ persistence
    def save(self, path: Any) -> None:
        raise NotImplementedError(
            "a Pinecone index lives on the server and persists by itself; to keep a local copy, copy it into "
            "a TensorVectorDB (db.get(db.ids()), with the ids) and save that")

    @classmethod
    def load(cls, path: Any, **kwargs: Any) -> PineconeVectorDB:
        raise NotImplementedError(
            "a Pinecone index lives on the server: reconnect with PineconeVectorDB(dim, host=..., namespace=...)")
