"""Faiss back-end: exact (``IndexFlatIP`` under ``IndexIDMap2``), graph-based approximate (``IndexHNSWFlat``
under ``IndexIDMap2``) or compressed (``IndexIVFPQ``), all by inner product.

``faiss`` is optional: it is imported when a :class:`FaissVectorDB` is built, never at module import. This
module is ``helpers.vector_db.faiss``; ``import faiss`` inside it is an absolute import and reaches the
installed faiss package, not this file.

- ``index="flat"``: exact search, same results as :class:`helpers.vector_db.tensor.TensorVectorDB`; ``get``
  returns the stored vectors exactly.
- ``index="hnsw"``: approximate search on a hierarchical navigable small-world graph (``hnsw_m`` links per
  node, ``ef_construction`` / ``ef_search`` candidate lists when building / searching; a search uses
  ``max(ef_search, k)``). The vectors are stored uncompressed, so ``get`` returns them exactly (memory: the
  float32 vectors plus about ``2 * hnsw_m`` int32 links a vector). faiss cannot remove nodes from the graph: a
  delete (or the upsert of a stored id) marks the old node dead; searches skip dead nodes (they still route
  through them) and the graph is rebuilt from the live vectors once the dead outnumber the live, and before
  every save, so a save never holds a deleted vector. CPU only (faiss has no GPU HNSW).
- ``index="ivfpq"``: for collections past memory (1M x 2048 float32 is 8 GB; with ``m=64, nbits=8`` the
  codes take 64 bytes a vector). It must be trained before vectors are added: call :meth:`FaissVectorDB.train`
  with a representative sample, or let the first ``add`` train on its own vectors when it holds at least
  ``max(nlist, 2 ** nbits)`` of them (otherwise that ``add`` raises, writing nothing). ``nprobe`` (inverted lists
  visited per query) trades recall for speed; a query may get fewer than ``k`` hits, padded as usual.
  ``get`` works through a hashtable direct map but returns the *product-quantised reconstruction*, not the
  vector that was added; keep the originals elsewhere (e.g. a float16 TensorVectorDB) where exact vectors
  matter, as for SuperGlobal's re-ranking.
- GPU: with ``use_gpu="auto"`` and a faiss build that sees GPUs, searches run on a GPU replica of the index on
  GPU ``gpu_device``; the CPU index stays the reference for add, delete, get and save. Adds (and deletes, where
  the GPU index supports them) are applied to the replica as well, so it is copied to the GPU once, not after
  every change. IVF-PQ is cloned with float16 lookup tables (``m=64, nbits=8`` needs 64 KB of shared memory in
  float32, more than a GPU block gets). A GPU search with ``k`` > 2048 (faiss' GPU limit) runs on the CPU index
  instead. ``"auto"`` says in a warning when it stays on the CPU although torch sees a GPU (a faiss-cpu build).
- A save is one file, replaced atomically: the faiss index (``faiss.write_index``'s bytes, so ``faiss.read_index``
  reads the file as it is), then a JSON trailer (parameters, per-id metadata, the index bytes' sha256), its
  length (8 bytes, little-endian) and a magic. A crash leaves the old file or the new one, and a reader reads
  one open file, so it never mixes two saves. Saves of the older layout (index file + ``.json`` sidecar) load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from common.errors import InvalidValueError, MissingDependencyError, MissingFileError, ProjectRuntimeError
from common.io import atomic_write, file_sha256
from helpers.vector_db.base import (
    AbstractVectorDB,
    ArrayLike,
    CorruptIndexError,
    LocalMetadata,
    Metadata,
    unknown_ids_error,
)

logger = logging.getLogger(__name__)

FORMAT_NAME = "helpers.vector_db.FaissVectorDB"
FORMAT_VERSION = 1
_MAGIC = b"FVDB\x00v1\n"  # the last 8 bytes of a one-file save
_TAIL = struct.Struct("<Q8s")  # trailer length, magic
_GPU_MAX_K = 2048
_WELL_TRAINED = 39  # faiss' own advice: at least 39 training points per centroid
_KINDS = ("flat", "hnsw", "ivfpq")
_REBUILD_CHUNK = 65536  # live vectors copied at a time when the HNSW graph is rebuilt


def import_faiss() -> Any:
    """The installed faiss module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            "FaissVectorDB needs faiss: `pip install faiss-cpu` (or a faiss-gpu build for GPU search)"
        ) from exc
    if not hasattr(faiss, "IndexFlatIP"):  # something named faiss shadows the real package
        raise MissingDependencyError(f"`import faiss` found {getattr(faiss, '__file__', faiss)!r}, which is not faiss")
    return faiss


def _sidecar(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.json")


class FaissVectorDB(AbstractVectorDB):
    """Inner-product search with faiss: exact (``"flat"``), HNSW graph (``"hnsw"``) or IVF-PQ (``"ivfpq"``).

    Args:
        dim: descriptor dimension d.
        index: ``"flat"`` (exact), ``"hnsw"`` (approximate graph search, exact stored vectors) or ``"ivfpq"``
            (inverted file with product quantisation).
        nlist: IVF-PQ inverted lists (coarse centroids).
        m: IVF-PQ sub-quantisers; must divide ``dim``.
        nbits: bits per sub-quantiser code.
        nprobe: IVF-PQ lists visited per query.
        hnsw_m: HNSW links per node (more: better recall, more memory, slower build).
        ef_construction: HNSW candidate list while inserting (more: a better graph, a slower build).
        ef_search: HNSW candidate list while searching (more: better recall, slower search); at least ``k``.
        use_gpu: ``"auto"`` (GPU search when faiss sees a GPU), ``True`` (require one) or ``False``.
        gpu_device: which GPU (``helpers.builders.make_database`` takes it from a ``cuda:N`` device).
        norm_tolerance: allowed |norm - 1| of added vectors and queries.
    """

    def __init__(
        self,
        dim: int,
        index: Literal["flat", "hnsw", "ivfpq"] = "flat",
        nlist: int = 1024,
        m: int = 64,
        nbits: int = 8,
        nprobe: int = 16,
        use_gpu: bool | Literal["auto"] = "auto",
        *,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        gpu_device: int = 0,
        norm_tolerance: float = 1e-3,
    ) -> None:
        super().__init__(dim, norm_tolerance=norm_tolerance)
        faiss = import_faiss()
        if index not in _KINDS:
            raise InvalidValueError(f"index must be 'flat', 'hnsw' or 'ivfpq', got {index!r}")
        if use_gpu not in ("auto", True, False):
            raise InvalidValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
        self.kind = index
        self.nlist, self.m, self.nbits = int(nlist), int(m), int(nbits)
        self.hnsw_m, self.ef_construction = int(hnsw_m), int(ef_construction)
        if index == "ivfpq":
            if self.nlist < 1 or self.m < 1 or not 1 <= self.nbits <= 16:
                raise InvalidValueError(f"need nlist >= 1, m >= 1, 1 <= nbits <= 16; got {nlist}, {m}, {nbits}")
            if dim % self.m:
                raise InvalidValueError(f"m={m} sub-quantisers must divide dim={dim}")
        if index == "hnsw":
            if self.hnsw_m < 2 or self.ef_construction < 1:
                raise InvalidValueError(f"need hnsw_m >= 2 and ef_construction >= 1; got {hnsw_m}, {ef_construction}")
            if use_gpu is True:
                raise InvalidValueError("faiss has no GPU HNSW index: use index='flat' or 'ivfpq' on a GPU, or "
                                        "use_gpu=False")
            use_gpu = False
        self._index = self._build_index(faiss)
        self._known: set[int] = set()
        # HNSW only: dead[i] marks node i (a position in the index) as deleted or replaced; id_map caches the
        # index's position -> id table (None: to be re-read)
        self._dead = np.zeros(0, dtype=bool)
        self._id_map: np.ndarray | None = None
        self._meta = LocalMetadata()
        self._gpu_res: Any = None
        self._gpu_index: Any = None
        self.gpu_device = gpu_device
        self.use_gpu = self._resolve_gpu(faiss, use_gpu)
        self._gpu_required = use_gpu is True
        self.nprobe = nprobe
        self.ef_search = ef_search

    # ------------------------------------------------------------------ construction
    def _build_index(self, faiss: Any) -> Any:
        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self.kind == "hnsw":
            graph = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = self.ef_construction
            index = faiss.IndexIDMap2(graph)
            index.own_fields = True
            graph.this.disown()  # the id map now frees the graph
            return index
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.m, self.nbits, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()  # the IVF index now frees its quantizer
        # a hashtable direct map: reconstruct (get) by arbitrary id, and remove_ids keeps working
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index

    def _resolve_gpu(self, faiss: Any, use_gpu: bool | str) -> bool:
        n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu is True and n_gpus == 0:
            raise ProjectRuntimeError("use_gpu=True but this faiss build sees no GPU (faiss-cpu?); use use_gpu='auto'")
        if use_gpu == "auto" and n_gpus == 0 and torch.cuda.is_available():
            logger.warning("faiss searches on the CPU: this faiss build sees no GPU although torch sees %d (install a "
                           "faiss-gpu build for GPU search)", torch.cuda.device_count())
        return bool(use_gpu) and n_gpus > 0

    @property
    def nprobe(self) -> int:
        """IVF-PQ inverted lists visited per query (ignored by the flat index)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise InvalidValueError(f"nprobe must be a positive integer, got {value!r}")
        self._nprobe = value
        if self.kind == "ivfpq":
            self._index.nprobe = value
        self._gpu_index = None  # the replica picks the new value up when rebuilt

    @property
    def ef_search(self) -> int:
        """HNSW candidate list per search (a search uses ``max(ef_search, k)``; ignored by the other indexes)."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise InvalidValueError(f"ef_search must be a positive integer, got {value!r}")
        self._ef_search = value

    def _graph(self) -> Any:
        """The ``IndexHNSWFlat`` inside the id map (HNSW only)."""
        return import_faiss().downcast_index(self._index.index)

    @property
    def is_trained(self) -> bool:
        """Whether vectors can be added (always true for the flat index)."""
        return bool(self._index.is_trained)

    @property
    def min_train_size(self) -> int:
        """Fewest training vectors faiss accepts: one per coarse centroid and one per PQ code."""
        return max(self.nlist, 2**self.nbits) if self.kind == "ivfpq" else 0

    def __repr__(self) -> str:
        extra = {"flat": "", "ivfpq": f", nlist={self.nlist}, m={self.m}, nbits={self.nbits}, nprobe={self.nprobe}",
                 "hnsw": f", hnsw_m={self.hnsw_m}, ef_construction={self.ef_construction}, "
                         f"ef_search={self.ef_search}"}[self.kind]
        return f"FaissVectorDB(dim={self.dim}, n={len(self)}, index={self.kind!r}{extra}, gpu={self.use_gpu})"

    # ------------------------------------------------------------------ training
    def train(self, vectors: ArrayLike) -> None:
        """Train the IVF-PQ coarse quantiser and product quantiser on (n, d) normalised vectors.

        A no-op for the flat index. Refused once vectors are stored (their codes would go stale).
        """
        x = self._validate_vectors(vectors, name="training vectors")
        self._train(x.cpu().numpy())

    def _train(self, x: np.ndarray) -> None:
        if self.kind != "ivfpq":
            logger.info("the %s index needs no training; ignoring %d vectors", self.kind, x.shape[0])
            return
        if self._index.ntotal:
            raise ProjectRuntimeError("cannot retrain an IVF-PQ index that holds vectors; delete them or build a new "
                                      "one")
        if x.shape[0] < self.min_train_size:
            raise InvalidValueError(
                f"IVF-PQ training needs at least {self.min_train_size} vectors (max(nlist={self.nlist}, "
                f"2**nbits={2**self.nbits})), got {x.shape[0]}")
        if x.shape[0] < _WELL_TRAINED * self.min_train_size:
            logger.warning("training IVF-PQ on %d vectors; faiss advises at least %d", x.shape[0],
                           _WELL_TRAINED * self.min_train_size)
        if self._index.is_trained:
            self._index.reset()
        self._index.train(np.ascontiguousarray(x, dtype=np.float32))
        self._gpu_index = None
        logger.info("trained IVF-PQ (nlist %d, m %d, nbits %d) on %d vectors", self.nlist, self.m, self.nbits,
                    x.shape[0])

    # ------------------------------------------------------------------ storage maths
    def _selector(self, ids: np.ndarray) -> Any:
        faiss = import_faiss()
        # IVF's hashtable direct map only removes from an explicit id array; IDMap2 wants a hashed batch
        if self.kind == "ivfpq":
            return faiss.IDSelectorArray(ids)
        return faiss.IDSelectorBatch(ids)

    def _remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        removed = self._index.remove_ids(self._selector(ids))
        if removed != ids.shape[0]:
            raise ProjectRuntimeError(f"faiss removed {removed} vectors where {ids.shape[0]} were expected")

    def _count(self) -> int:
        return len(self._known) if self.kind == "hnsw" else int(self._index.ntotal)

    # ------------------------------------------------------------------ HNSW: dead nodes
    def _positions(self) -> np.ndarray:
        """HNSW: the id of every node, dead or alive, by position."""
        if self._id_map is None:
            self._id_map = import_faiss().vector_to_array(self._index.id_map).astype(np.int64)
        return self._id_map

    def _kill(self, ids: np.ndarray) -> None:
        """HNSW: mark the live nodes of ``ids`` dead; rebuild the graph once the dead outnumber the live."""
        hit = np.isin(self._positions(), ids) & ~self._dead
        self._dead |= hit
        if int(self._dead.sum()) > self._index.ntotal - int(self._dead.sum()):
            self._rebuild()

    def _rebuild(self) -> None:
        """HNSW: a new graph over the live vectors only, inserted in their old order (the dead are gone)."""
        if not self._dead.any():
            return
        live = np.flatnonzero(~self._dead)
        graph, ids = self._graph(), self._positions()
        fresh = self._build_index(import_faiss())
        for start in range(0, live.size, _REBUILD_CHUNK):
            rows = live[start : start + _REBUILD_CHUNK]
            fresh.add_with_ids(graph.reconstruct_batch(rows), ids[rows])
        logger.info("rebuilt the HNSW graph over %d live vectors (%d dead dropped)", live.size,
                    self._index.ntotal - live.size)
        self._index = fresh
        self._dead = np.zeros(live.size, dtype=bool)
        self._id_map = None

    def _upsert(self, vectors: Tensor, ids: Tensor, metadata: list[Metadata | None] | None) -> None:
        x = np.ascontiguousarray(vectors.cpu().numpy(), dtype=np.float32)
        id_np = ids.numpy().astype(np.int64)
        if not self._index.is_trained:
            if x.shape[0] < self.min_train_size:
                raise ProjectRuntimeError(
                    f"the IVF-PQ index is not trained: call train(vectors) with at least {self.min_train_size} "
                    f"representative vectors first, or add at least that many in the first call "
                    f"(got {x.shape[0]})")
            logger.info("IVF-PQ index untrained: training on the %d vectors of the first add", x.shape[0])
            self._train(x)
        existing = np.array([i for i in id_np.tolist() if i in self._known], dtype=np.int64)
        if self.kind == "hnsw":
            if existing.size:
                self._kill(existing)
            self._index.add_with_ids(x, id_np)  # the id map's reverse table now points at the new nodes
            self._dead = np.concatenate([self._dead, np.zeros(x.shape[0], dtype=bool)])
            self._id_map = None
        else:
            if existing.size:
                self._remove(existing)
                self._on_replica("remove_ids", self._selector(existing))
            self._index.add_with_ids(x, id_np)
            self._on_replica("add_with_ids", x, id_np)
        self._known.update(id_np.tolist())
        self._meta.set(ids, metadata)

    def _on_replica(self, method: str, *args: Any) -> None:
        """Apply a change made to the CPU index to the GPU replica too (``add_with_ids``, ``remove_ids``); a
        replica that cannot take it (faiss' GPU indexes do not all remove) is dropped and copied again at the next
        search. No replica (yet, or HNSW): nothing to do."""
        if self._gpu_index is None:
            return
        try:
            getattr(self._gpu_index, method)(*args)
        except RuntimeError as exc:
            logger.info("the GPU replica cannot %s (%s): it is rebuilt at the next search", method, exc)
            self._gpu_index = None

    def _gpu_options(self, faiss: Any) -> Any:
        """The cloner options of the GPU replica: float16 lookup tables for IVF-PQ (faiss' GPU IVF-PQ keeps one
        table of m x 2^nbits distances per query in shared memory: 64 KB in float32 at m=64, nbits=8, past the
        48 KB a block gets; float16 halves it)."""
        options = faiss.GpuClonerOptions()
        if self.kind == "ivfpq":
            options.useFloat16LookupTables = True
        return options

    def _searcher(self, k: int) -> Any:
        if not self.use_gpu or k > _GPU_MAX_K:
            return self._index
        if self._gpu_index is None:
            faiss = import_faiss()
            try:
                if self._gpu_res is None:
                    self._gpu_res = faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, self.gpu_device, self._index,
                                                         self._gpu_options(faiss))
                if self.kind == "ivfpq":
                    faiss.GpuParameterSpace().set_index_parameter(self._gpu_index, "nprobe", self.nprobe)
            except RuntimeError as exc:
                if self._gpu_required:
                    raise
                # "auto" promised speed, not a GPU: say why once, then stay on the CPU
                logger.warning("faiss could not move the %s index to GPU %d (%s); searching on the CPU",
                               self.kind, self.gpu_device, exc)
                self.use_gpu = False
                return self._index
        return self._gpu_index

    def _search_hnsw(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """HNSW search on the graph itself, skipping dead nodes, its positions mapped to ids."""
        faiss = import_faiss()
        params = faiss.SearchParametersHNSW()
        params.efSearch = self.ef_search
        keep = None
        if self._dead.any():
            keep = np.packbits(~self._dead, bitorder="little")  # bit i: node i may be returned
            selector = faiss.IDSelectorBitmap(self._dead.size, faiss.swig_ptr(keep))
            params.sel = selector
        scores, pos = self._graph().search(xq, k, params=params)
        del keep
        return scores, np.where(pos >= 0, self._positions()[np.maximum(pos, 0)], -1)

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        xq = np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32)
        if self._count() == 0:
            return torch.empty(xq.shape[0], 0), torch.empty(xq.shape[0], 0, dtype=torch.int64)
        if self.kind == "hnsw":
            scores, ids = self._search_hnsw(xq, k)
        else:
            scores, ids = self._searcher(k).search(xq, k)
        scores = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        scores[ids < 0] = float("-inf")  # faiss pads with -FLT_MAX; the convention here is -inf
        return scores, ids

    def _check_known(self, ids: Tensor) -> None:
        missing = [i for i in ids.tolist() if i not in self._known]
        if missing:
            raise unknown_ids_error(missing)

    def _get(self, ids: Tensor) -> Tensor:
        self._check_known(ids)
        out = self._index.reconstruct_batch(np.ascontiguousarray(ids.numpy(), dtype=np.int64))
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def _get_metadata(self, ids: Tensor) -> list[Metadata | None]:
        self._check_known(ids)
        return self._meta.get(ids)

    def _missing(self, ids: Tensor) -> Tensor:
        return ids[torch.tensor([i not in self._known for i in ids.tolist()], dtype=torch.bool)]

    def _delete(self, ids: Tensor) -> None:
        if self.kind == "hnsw":
            self._kill(ids.numpy().astype(np.int64))
        else:
            gone = np.ascontiguousarray(ids.numpy(), dtype=np.int64)  # alive while a selector points into it
            self._remove(gone)
            self._on_replica("remove_ids", self._selector(gone))
        self._known.difference_update(ids.tolist())
        self._meta.drop(ids)

    def _stored_ids(self) -> Tensor:
        return torch.tensor(sorted(self._known), dtype=torch.int64)

    def _next_free_id(self) -> int:
        return max(self._known) + 1 if self._known else 0

    def _index_ids(self) -> np.ndarray:
        """Every id held by the faiss index itself (used to rebuild the id set after loading)."""
        faiss = import_faiss()
        if self.kind in ("flat", "hnsw"):
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        invlists, parts = self._index.invlists, []
        for lst in range(self._index.nlist):
            size = invlists.list_size(lst)
            if size:
                ptr = invlists.get_ids(lst)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(lst, ptr)
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------------ persistence
    def _params(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dim": self.dim, "index": self.kind,
                "nlist": self.nlist, "m": self.m, "nbits": self.nbits, "nprobe": self.nprobe,
                "hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}

    def save(self, path: str | os.PathLike) -> None:
        """Write the database to ``path`` as one file, replaced atomically: the faiss index, then a JSON trailer
        holding the parameters, per-id metadata and the index bytes' sha256 (see the module notes). A sidecar
        ``path.json`` of the older two-file layout is removed. An HNSW graph holding dead nodes is rebuilt first,
        so that no deleted vector reaches the file."""
        faiss = import_faiss()
        if self.kind == "hnsw":
            self._rebuild()
        trailer = {**self._params(), "count": int(self._index.ntotal), "trained": self.is_trained,
                   "norm_tolerance": self.norm_tolerance, "metadata": json.loads(self._meta.to_json())}

        def write(tmp: str) -> None:
            digest, size = hashlib.sha256(), 0
            with open(tmp, "wb") as f:
                def sink(chunk: bytes) -> int:
                    nonlocal size
                    digest.update(chunk)
                    size += len(chunk)
                    return f.write(chunk)

                writer = faiss.PyCallbackIOWriter(sink)
                faiss.write_index(self._index, writer)
                del writer  # flushes its buffer into sink
                tail = json.dumps({**trailer, "index_bytes": size, "index_sha256": digest.hexdigest()}).encode()
                f.write(tail)
                f.write(_TAIL.pack(len(tail), _MAGIC))

        atomic_write(path, write)
        legacy = _sidecar(path)
        if legacy.is_file():
            legacy.unlink()
        logger.info("saved faiss %s index of %d vectors to %s", self.kind, trailer["count"], path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, use_gpu: bool | Literal["auto"] = "auto",
             gpu_device: int = 0) -> FaissVectorDB:
        """Read an index written by :meth:`save`, verifying the checksum, dimension, count and index type.

        Raises ``FileNotFoundError`` for a missing file and :class:`CorruptIndexError` for a damaged one.
        """
        faiss = import_faiss()
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"no saved FaissVectorDB at {path} (write one with FaissVectorDB.save)")
        with open(path, "rb") as f:  # one open file: a save replacing it meanwhile cannot mix into this read
            size = os.fstat(f.fileno()).st_size
            tail = b""
            if size >= _TAIL.size:
                f.seek(size - _TAIL.size)
                tail = f.read(_TAIL.size)
            if len(tail) == _TAIL.size and tail[-len(_MAGIC):] == _MAGIC:
                side, index = cls._read_one_file(f, path, size, tail, faiss)
            else:
                side, index = cls._read_two_files(path, faiss)
        return cls._from_parts(path, side, index, faiss, use_gpu=use_gpu, gpu_device=gpu_device)

    @staticmethod
    def _read_one_file(f: Any, path: Path, size: int, tail: bytes, faiss: Any) -> tuple[dict[str, Any], Any]:
        """The one-file layout, read from the open file ``f`` of ``size`` bytes ending in ``tail``."""
        tail_len, _ = _TAIL.unpack(tail)
        end = size - _TAIL.size - tail_len
        if end < 0:
            raise CorruptIndexError(f"{path} is truncated: its trailer says {tail_len} bytes, the file has {size}")
        f.seek(end)
        try:
            side = json.loads(f.read(tail_len))
            index_bytes, digest = int(side["index_bytes"]), side["index_sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptIndexError(f"{path}: its trailer is damaged or not a FaissVectorDB's: {exc}") from exc
        if index_bytes != end:
            raise CorruptIndexError(f"{path} is truncated or corrupted: the index should take {index_bytes} bytes, "
                                    f"it takes {end}")
        f.seek(0)
        h, left = hashlib.sha256(), end
        while left:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        if h.hexdigest() != digest:
            raise CorruptIndexError(f"{path}: sha256 checksum mismatch, the index is truncated or corrupted")
        f.seek(0)
        left = end

        def source(n: int) -> bytes:
            nonlocal left
            chunk = f.read(min(n, left))
            left -= len(chunk)
            return chunk

        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(source))
        except RuntimeError as exc:
            raise CorruptIndexError(f"faiss cannot read {path}: {exc}") from exc
        return side, index

    @staticmethod
    def _read_two_files(path: Path, faiss: Any) -> tuple[dict[str, Any], Any]:
        """The older layout: the index file and a ``path.json`` sidecar holding its sha256."""
        meta_path = _sidecar(path)
        if not meta_path.is_file():
            raise CorruptIndexError(f"{path} is not a FaissVectorDB save: it has no trailer (truncated?) and no "
                                    f"{meta_path.name} beside it")
        try:
            with open(meta_path) as f:
                side = json.load(f)
            digest = side["index_sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptIndexError(f"{meta_path} is truncated or not a FaissVectorDB sidecar: {exc}") from exc
        if file_sha256(path) != digest:
            raise CorruptIndexError(f"{path}: sha256 checksum mismatch, the index file is truncated or corrupted")
        try:
            index = faiss.read_index(os.fspath(path))
        except RuntimeError as exc:
            raise CorruptIndexError(f"faiss cannot read {path}: {exc}") from exc
        return side, index

    @classmethod
    def _from_parts(cls, path: Path, side: dict[str, Any], index: Any, faiss: Any, *,
                    use_gpu: bool | Literal["auto"], gpu_device: int) -> FaissVectorDB:
        try:
            params = {key: side[key] for key in ("format", "version", "dim", "index", "nlist", "m", "nbits",
                                                 "nprobe", "count")}
        except (KeyError, TypeError) as exc:
            raise CorruptIndexError(f"{path}: its description lacks {exc}: not a FaissVectorDB save") from exc
        if params["format"] != FORMAT_NAME or params["version"] != FORMAT_VERSION:
            raise CorruptIndexError(f"{path} has format {params['format']!r} v{params['version']}, "
                                    f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}")
        if params["index"] not in _KINDS:
            raise CorruptIndexError(f"{path}: unknown index type {params['index']!r}")
        hnsw = {key: side[key] for key in ("hnsw_m", "ef_construction", "ef_search") if key in side}
        db = cls(params["dim"], index=params["index"], nlist=params["nlist"], m=params["m"],
                 nbits=params["nbits"], nprobe=params["nprobe"], use_gpu=use_gpu, gpu_device=gpu_device,
                 norm_tolerance=side.get("norm_tolerance", 1e-3), **hnsw)
        expected = faiss.IndexIVFPQ if db.kind == "ivfpq" else faiss.IndexIDMap2
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
        wrong_inner = (db.kind == "flat" and not isinstance(inner, faiss.IndexFlat)) or \
            (db.kind == "hnsw" and not isinstance(inner, faiss.IndexHNSWFlat))
        if not isinstance(index, expected) or wrong_inner or index.d != db.dim \
                or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise CorruptIndexError(f"{path} holds a {type(index).__name__} (d={index.d}), expected a {db.kind} "
                                    f"{expected.__name__} with inner product and d={db.dim}")
        if db.kind == "hnsw":
            index.own_fields = True  # faiss.read_index gives the id map its graph to free
        if index.ntotal != params["count"]:
            raise CorruptIndexError(f"{path} holds {index.ntotal} vectors, its description says {params['count']}")
        db._index = index
        db.nprobe = params["nprobe"]
        db._dead = np.zeros(index.ntotal, dtype=bool)
        ids = db._index_ids()
        db._known = set(ids.tolist())
        if len(db._known) != ids.shape[0]:
            raise CorruptIndexError(f"{path} holds repeated ids")
        db._meta = LocalMetadata.from_json(json.dumps(side.get("metadata", {})))
        logger.info("loaded faiss %s index of %d vectors from %s", db.kind, index.ntotal, path)
        return db
