"""The feature cache of an evaluation: the global descriptors of a whole image set, extracted once and kept on
disk, in resumable pieces split evenly across the ranks of a torchrun job.

- :func:`cached_global_descriptors`: ``<cache_dir>/<label>-<key>.pt``, keyed by
  :func:`helpers.cache_keys.feature_cache_key` (sha256 of the weights, the model's settings and the image list
  with each file's content, the content hashes memoised in ``<cache_dir>/content-sha256/``), written atomically;
  a hit is read, a miss extracted.
- Pieces (:func:`piece_ranges`): a set is cut into consecutive pieces whose boundaries follow from its size (and
  ``shard_size``, ``batch_size``), never from the number of ranks, and no batch spans two pieces
  (``pieces`` of :func:`helpers.extraction.extract_global_descriptors`). Every image meets the same batch
  companions whether one process or N ranks extract it, so the descriptors are bit-identical (a model's float
  result can depend on the batch it runs in).
- Ranks (:func:`extract_sharded`): the pieces not yet on disk are cut into ``world_size`` contiguous blocks of
  about equal image counts (:func:`helpers.distributed.split_evenly`); each rank extracts its block in one pass,
  writing each piece as it completes (one file, atomic), and rank 0 merges them once every rank is done. Queries,
  databases, distractors and the whitening's training images all go this way, whatever their size.
- Resuming: a crashed run leaves its pieces on disk; the next run extracts only the missing ones, split over its
  own ranks. The pieces do not depend on the number of ranks, so a run resumed under another world size reuses
  every piece already written (a changed ``shard_size`` or ``batch_size`` cuts other pieces: those are then
  extracted again).
- The key hashes every image's content; under several ranks each rank hashes a slice of the files and the digests
  are gathered (:class:`helpers.cache_keys.ContentHashes`), so that no rank waits in a barrier while another reads
  a million files (finding 13 of the CUDA review).
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from common.errors import InvalidValueError
from common.io import atomic_torch_save
from helpers.cache_keys import CACHE_FORMAT, HASH_MEMO_DIR, ContentHashes, feature_cache_key
from helpers.distributed import DistEnv, barrier, broadcast_object, split_evenly
from helpers.extraction import extract_global_descriptors

logger = logging.getLogger(__name__)

#: Piece counts that most world sizes divide (2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20, 24, ... ranks): a set is cut
#: into the largest of them that leaves each piece about a batch or more, so that ranks get equal shares of
#: whole pieces; a set larger than 240 pieces of ``shard_size`` images is cut into pieces of ``shard_size``.
PIECE_COUNTS = (1, 2, 4, 6, 12, 24, 48, 120, 240)


def piece_ranges(n: int, *, shard_size: int | None = None, batch_size: int = 1) -> list[range]:
    """The pieces of a set of ``n`` images: consecutive ranges covering ``range(n)``, their sizes differing by at
    most one. Their count is the largest of :data:`PIECE_COUNTS` not above ``ceil(n / batch_size)``, or
    ``ceil(n / shard_size)`` when that is larger; it never depends on the number of ranks."""
    if n < 0:
        raise InvalidValueError(f"a set cannot hold {n} images")
    if shard_size is not None and shard_size < 1:
        raise InvalidValueError(f"shard_size must be >= 1, got {shard_size}")
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
    if n == 0:
        return []
    count = max(c for c in PIECE_COUNTS if c <= -(-n // batch_size))
    if shard_size is not None:
        count = max(count, -(-n // shard_size))
    size, extra = divmod(n, count)
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + size + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _load_features(path: Path, key: str) -> Tensor | None:
    """The cached features at ``path`` when it holds ``key``; None when absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file is a miss, never a crash
        logger.warning("ignoring unreadable cache file %s (%s)", path, exc)
        return None
    if not isinstance(payload, dict) or payload.get("key") != key or not isinstance(payload.get("features"), Tensor):
        return None
    features = payload["features"]
    for start in range(0, features.shape[0], 65536):  # in blocks: a 1M x 2048 check would take 2 GB at once
        if not bool(torch.isfinite(features[start : start + 65536]).all()):
            logger.warning("ignoring cache file %s: it holds NaN/Inf descriptors", path)
            return None
    return features


def _save_features(path: Path, key: str, features: Tensor, **meta: Any) -> None:
    atomic_torch_save({"key": key, "format": CACHE_FORMAT, "features": features.contiguous(), **meta}, path)


def _piece_path(shard_dir: Path, piece: range) -> Path:
    return shard_dir / f"piece-{piece.start:09d}-{piece.stop:09d}.pt"


def _extract_pieces(pieces: Sequence[range], *, key: str, shard_dir: Path | None, desc: str,
                    **engine: Any) -> Tensor:
    """The descriptors of ``pieces`` in one pass of the engine (no batch spanning two pieces), each piece written to
    ``shard_dir`` (when given) as soon as it is complete; (sum of their sizes, D)."""
    def save(k: int, rows: Tensor) -> None:
        if shard_dir is not None:
            piece = pieces[k]
            # a copy: the rows are a slice of the pass's tensor, whose whole storage torch.save would write
            _save_features(_piece_path(shard_dir, piece), key, rows.clone(), start=piece.start, stop=piece.stop)

    return extract_global_descriptors(indices=[i for piece in pieces for i in piece], pieces=[len(p) for p in pieces],
                                      on_piece=save, desc=desc, **engine)


def extract_sharded(
    *,
    model: nn.Module,
    dataset: Dataset,
    key: str,
    shard_dir: str | os.PathLike,
    shard_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "descriptors",
    fast: bool = True,
    weights_source: str | None = None,
    flip: bool = False,
) -> Tensor | None:
    """The descriptors (N, D) of ``dataset`` extracted in the pieces of :func:`piece_ranges`, one file each in
    ``shard_dir`` (atomic), the pieces already there skipped.

    Rank ``rank`` of ``world_size`` extracts its even share of the missing pieces (rank 0's view of the folder,
    broadcast, is every rank's plan); after a barrier rank 0 merges every piece (extracting again any that is
    missing or unreadable) and returns the descriptors; the other ranks return None. ``flip``: see
    :func:`helpers.extraction.extract_global_descriptors` (``key`` must say it).
    """
    if not 0 <= rank < world_size:
        raise InvalidValueError(f"rank {rank} of world size {world_size} is not valid")
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    pieces = piece_ranges(len(dataset), shard_size=shard_size, batch_size=batch_size)
    engine = {"model": model, "dataset": dataset, "device": device, "batch_size": batch_size,
              "num_workers": num_workers, "fast": fast, "weights_source": weights_source, "flip": flip,
              "key": key, "shard_dir": shard_dir}
    env = DistEnv(rank=rank, world_size=world_size)
    # one plan for every rank: rank 0's view of the folder, taken before any rank writes to it
    missing = broadcast_object([i for i, p in enumerate(pieces) if not _piece_path(shard_dir, p).is_file()], env)
    mine = [pieces[missing[k]] for k in split_evenly([len(pieces[i]) for i in missing], world_size)[rank]]
    logger.info("%s: %d pieces of about %d images, %d to extract; rank %d/%d takes %d of them (%d images)", desc,
                len(pieces), len(dataset) // max(len(pieces), 1), len(missing), rank, world_size, len(mine),
                sum(len(p) for p in mine))
    if mine:
        _extract_pieces(mine, desc=desc, progress=progress, **engine)
    barrier()  # every share is on disk; the shares are even, so rank 0 waits only for the slowest one's rest
    if rank != 0:
        return None
    found = {p: _load_features(_piece_path(shard_dir, p), key) for p in pieces}
    redo = [p for p, f in found.items() if f is None or f.shape[0] != len(p)]
    if redo:
        logger.warning("%s: %d pieces missing or unreadable after every rank wrote its share; rank 0 extracts them",
                       desc, len(redo))
        again = _extract_pieces(redo, desc=f"{desc} (rest)", progress=progress, **engine)
        found.update(zip(redo, again.split([len(p) for p in redo])))
    return torch.cat([found[p] for p in pieces])


def cached_global_descriptors(
    *,
    model: nn.Module,
    dataset: Dataset,
    cache_dir: str | os.PathLike | None = None,
    label: str = "features",
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
    shard_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    weights_hash: str | None = None,
    progress: bool = True,
    fast: bool = True,
    weights_source: str | None = None,
    flip: bool = False,
) -> Tensor | None:
    """Global descriptors (N, D) of a whole dataset, through the on-disk cache when ``cache_dir`` is given; None on
    the ranks other than 0 of a job of several (``world_size`` > 1, which needs a ``cache_dir`` they all share).

    The cache file ``<cache_dir>/<label>-<key>.pt`` is keyed by :func:`feature_cache_key` (weights, config, image
    list with each file's content hash, memoised in ``<cache_dir>/content-sha256/``; under several ranks each
    hashes a slice); rank 0 reads a hit; a miss is extracted in the pieces of :func:`piece_ranges` and written
    atomically. A set of more than ``shard_size`` images, and any set under several ranks, goes through
    :func:`extract_sharded` in ``<cache_dir>/<label>-<key>.shards/`` (one file per piece, resumable, removed once
    merged). ``weights_source`` names the weights in errors (see
    :func:`helpers.extraction.extract_global_descriptors`). ``fast`` (same) gives the same descriptors within
    1e-5, so it shares the cache; ``flip`` (flip test-time augmentation) is part of the cache key.
    """
    if len(dataset) == 0:  # refused on every rank alike, before any of them waits for another
        raise InvalidValueError(f"nothing to extract for {label}: no images")
    engine = {"model": model, "dataset": dataset, "device": device, "batch_size": batch_size,
              "num_workers": num_workers, "fast": fast, "weights_source": weights_source, "flip": flip,
              "progress": progress}
    pieces = [len(p) for p in piece_ranges(len(dataset), shard_size=shard_size, batch_size=batch_size)]
    if cache_dir is None:
        if world_size > 1:
            raise InvalidValueError("extraction over several ranks needs a cache_dir shared by all of them")
        return extract_global_descriptors(desc=label, pieces=pieces, **engine)
    env = DistEnv(rank=rank, world_size=world_size)
    key = feature_cache_key(model=model, dataset=dataset, weights_hash=weights_hash, progress=progress,
                            hashes=ContentHashes(Path(cache_dir) / HASH_MEMO_DIR, env=env), flip=flip,
                            device=device)
    path = Path(cache_dir) / f"{label}-{key[:24]}.pt"
    feats = _load_features(path, key) if rank == 0 else None  # the other ranks need not read it
    if broadcast_object(feats is not None and feats.shape[0] == len(dataset), env):
        logger.info("%s: feature cache hit (%s)", label, path)
        return feats
    logger.info("%s: extracting %d images (cache miss, will write %s)", label, len(dataset), path)
    if world_size == 1 and (shard_size is None or len(dataset) <= shard_size):
        feats = extract_global_descriptors(desc=label, pieces=pieces, **engine)
        _save_features(path, key, feats, label=label)
        return feats
    shard_dir = path.with_suffix(".shards")
    feats = extract_sharded(key=key, shard_dir=shard_dir, shard_size=shard_size, rank=rank, world_size=world_size,
                            desc=label, **engine)
    if feats is not None:
        _save_features(path, key, feats, label=label)
        shutil.rmtree(shard_dir, ignore_errors=True)
    return feats
