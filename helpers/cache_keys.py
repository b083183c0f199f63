"""The feature cache's keys: sha256 of a model's weights and configuration, and of an image set (names, sizes and
content, the content hashes memoised per file); the extraction engine names its cache files by them."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset
from tqdm import tqdm

from common.errors import MissingFileError
from common.io import atomic_write, file_sha256
from helpers.distributed import DistEnv, all_gather_objects, split_evenly

logger = logging.getLogger(__name__)

#: Bumped when the cached tensors' meaning changes, so older cache files are not taken for current ones.
CACHE_FORMAT = 1
_MODEL_OPTIONS = ("gemp", "rgem", "sgem", "relup", "scales", "antialias")
#: ctime / mtime closer to now than this: the file may still be changing within the file system's timestamp
#: granularity, so its hash is not memoised (git's "racily clean" entries).
_RACY_NS = 2_000_000_000
#: Sub-folder of a cache directory holding the memoised content hashes of the images.
HASH_MEMO_DIR = "content-sha256"
_HASH_THREADS = 8


class ContentHashes:
    """sha256 of files' content, memoised in ``memo_dir`` (one TSV per image set) under
    (path, size, mtime_ns, ctime_ns, inode).

    A file is read again only when one of those changed. ctime changes with every write or metadata change and
    cannot be set back (``os.utime`` sets mtime only), so a file replaced by one of the same size, even with its
    mtime restored, is hashed again. Without ``memo_dir`` every file is hashed on every call. ``hashed`` counts
    the files read.

    ``env``: the ranks of a torchrun job, each of which asks for the same files in the same order. The files to
    hash are then cut into one slice per rank, each rank hashes its slice and the digests are gathered, so that
    every rank works for the same time instead of waiting while one reads a million files (CUDA review finding
    13); rank 0 alone writes the memo. Every rank must then call :meth:`digests` the same number of times.
    """

    def __init__(self, memo_dir: str | os.PathLike | None = None, *, env: DistEnv | None = None) -> None:
        self.memo_dir = None if memo_dir is None else Path(memo_dir)
        self.env = env or DistEnv()
        self.hashed = 0
        self._tables: dict[str, dict[str, tuple[int, int, int, int, str]]] = {}

    def _memo_path(self, group: str) -> Path | None:
        if self.memo_dir is None:
            return None
        return self.memo_dir / f"{hashlib.sha256(group.encode()).hexdigest()[:16]}.tsv"

    def _table(self, group: str) -> dict[str, tuple[int, int, int, int, str]]:
        if group in self._tables:
            return self._tables[group]
        table: dict[str, tuple[int, int, int, int, str]] = {}
        path = self._memo_path(group)
        if path is not None and path.is_file():
            try:
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        parts = line.rstrip("\n").split("\t", 5)
                        if len(parts) == 6 and len(parts[4]) == 64:
                            table[parts[5]] = (int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]), parts[4])
            except (OSError, ValueError, UnicodeDecodeError) as exc:  # a damaged memo only costs re-hashing
                logger.warning("ignoring unreadable hash memo %s (%s)", path, exc)
                table = {}
        self._tables[group] = table
        return table

    def _save(self, group: str) -> None:
        path = self._memo_path(group)
        if path is None:
            return
        table = self._tables[group]

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for name, (size, mtime, ctime, ino, digest) in table.items():
                    f.write(f"{size}\t{mtime}\t{ctime}\t{ino}\t{digest}\t{name}\n")

        atomic_write(path, write)

    def digests(self, paths: Sequence[str], *, group: str, stats: Sequence[os.stat_result] | None = None,
                progress: bool = False, desc: str = "hashing") -> list[str]:
        """sha256 (hex) of each file's content; ``stats`` are their ``os.stat`` results when already taken.
        ``group`` names the memo (e.g. the data root and the set's name)."""
        stats = list(stats) if stats is not None else [os.stat(p) for p in paths]
        table = self._table(group)
        keys = [os.path.abspath(p) for p in paths]
        out: list[str | None] = []
        todo = []
        for k, (key, st) in enumerate(zip(keys, stats)):
            entry = table.get(key)
            if entry is not None and entry[:4] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino):
                out.append(entry[4])
            else:
                out.append(None)
                todo.append(k)
        if self.env.distributed:  # always, even with nothing to hash here: every rank gathers as many times
            share = [todo[k] for k in split_evenly([1] * len(todo), self.env.world_size)[self.env.rank]]
            found: dict[int, str] = {}
            for part in all_gather_objects(self._hash(paths, share, progress=progress, desc=desc), self.env):
                found.update(part)
            # a rank that read the memo before another rewrote it may list other files: those it hashes itself
            found.update(self._hash(paths, [k for k in todo if k not in found], progress=progress, desc=desc))
        else:
            found = self._hash(paths, todo, progress=progress, desc=desc)
        for k in todo:
            out[k] = found[k]
        if not todo:
            return out  # type: ignore[return-value]
        settled = time.time_ns() - _RACY_NS
        changed = False
        for k in todo:
            st = stats[k]
            if "\n" in keys[k] or max(st.st_ctime_ns, st.st_mtime_ns) > settled:
                continue
            table[keys[k]] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, out[k])  # type: ignore[assignment]
            changed = True
        if changed and self.env.is_main:
            self._save(group)
        return out  # type: ignore[return-value]

    def _hash(self, paths: Sequence[str], which: Sequence[int], *, progress: bool, desc: str) -> dict[int, str]:
        """{k: sha256 of ``paths[k]``} for each k of ``which``, read by a pool of threads."""
        if not which:
            return {}
        bar = tqdm(total=len(which), desc=desc, unit="file", leave=False, disable=not progress or len(which) < 2000)
        found = {}
        with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:  # hashlib releases the GIL while hashing
            for k, digest in zip(which, pool.map(lambda j: file_sha256(paths[j]), which)):
                found[k] = digest
                bar.update(1)
        bar.close()
        self.hashed += len(which)
        return found


def state_dict_hash(model: nn.Module) -> str:
    """sha256 of a model's weights: every state-dict tensor (name, dtype, shape, bytes) in name order.

    Parts the model declares as derived (``derived_prefixes``, e.g. CVNet's momentum encoder, unused at test
    time) are left out.
    """
    derived = tuple(getattr(model, "derived_prefixes", ()))
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if derived and name.startswith(derived):
            continue
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_signature(model: nn.Module) -> dict[str, Any]:
    """The extraction options of a model that change its output: class, depth, SuperGlobal's switches, scales,
    and the input convention it expects."""
    sig: dict[str, Any] = {"class": type(model).__name__, "depth": getattr(model, "depth", None)}
    for name in _MODEL_OPTIONS:
        if hasattr(model, name):
            value = getattr(model, name)
            sig[name] = list(value) if isinstance(value, tuple) else value
    convention = getattr(model, "input_convention", None)
    sig["input_convention"] = convention.to_dict() if convention is not None else None
    return sig


def _leaf_datasets(dataset: Dataset) -> list[Dataset]:
    if isinstance(dataset, ConcatDataset):
        return [leaf for d in dataset.datasets for leaf in _leaf_datasets(d)]
    return [dataset]


def _image_names(dataset: Dataset) -> list[tuple[str, str]]:
    """(path on disk, name used in the key) of every image of a dataset; names are relative to its root."""
    paths = getattr(dataset, "image_paths", None)
    if paths is None:
        raise TypeError(f"{type(dataset).__name__} has no image_paths: the feature cache keys on the image list")
    root = getattr(dataset, "root", None)
    return [(p, os.path.relpath(p, root) if root else os.path.basename(p)) for p in paths]


def dataset_signature(dataset: Dataset, *, progress: bool = False, hashes: ContentHashes | None = None,
                      contents: bool = True) -> dict[str, Any]:
    """What decides the images a dataset yields: for each part its class, name, split, scales, input
    convention and minimum side, and a sha256 over its image list (relative names, file sizes, sha256 of each
    file's content from ``hashes`` (memoised there; default: hashed now), query boxes).

    ``contents=False`` leaves the image list out (no file is read). A missing image is a ``FileNotFoundError``
    naming the file and the dataset.
    """
    hashes = hashes if hashes is not None else ContentHashes()
    parts = []
    for d in _leaf_datasets(dataset):
        names = _image_names(d)
        convention = getattr(d, "convention", None)
        part = {
            "class": type(d).__name__,
            "name": getattr(d, "name", None),
            "split": getattr(d, "split", None),
            "scales": [float(s) for s in getattr(d, "scales", ())],
            "convention": convention.to_dict() if convention is not None else None,
            "min_side": getattr(d, "min_side", None),
            "n_images": len(names),
        }
        if contents:
            h = hashlib.sha256()
            for name, size, digest, box in _image_entries(d, names, hashes, progress=progress):
                h.update(f"{name}\t{size}\t{digest}\t{box}\n".encode())
            part["images_sha256"] = h.hexdigest()
        parts.append(part)
    return {"parts": parts}


def _image_entries(d: Dataset, names: list[tuple[str, str]], hashes: ContentHashes, *,
                   progress: bool = False) -> list[tuple[str, int, str, str]]:
    """(name, file size, content sha256, query box) of each image of a leaf dataset."""
    label = f"{getattr(d, 'name', type(d).__name__)} ({getattr(d, 'split', 'images')})"
    stats = []
    for path, _ in tqdm(names, desc=f"listing {label}", unit="img", leave=False,
                        disable=not progress or len(names) < 20000):
        try:
            stats.append(os.stat(path))
        except FileNotFoundError:
            raise MissingFileError(f"image file not found: {path} (dataset {label})") from None
    paths = [p for p, _ in names]
    root = getattr(d, "root", None) or (os.path.dirname(paths[0]) if paths else ".")
    group = f"{os.path.abspath(root)}|{getattr(d, 'name', '')}"  # one memo per set: roxford5k's need not read R1M's
    try:
        digests = hashes.digests(paths, group=group, stats=stats, progress=progress, desc=f"hashing {label}")
    except FileNotFoundError as exc:  # removed since the listing
        raise MissingFileError(f"image file not found: {exc.filename} (dataset {label})") from None
    bbxs = getattr(d, "bbxs", None)  # a class folder's query without a box has None: used whole
    return [(name, st.st_size, digest,
             "" if bbxs is None or bbxs[i] is None else ",".join(repr(float(v)) for v in bbxs[i]))
            for i, ((_, name), st, digest) in enumerate(zip(names, stats, digests))]


def compute_key(device: torch.device | str | None) -> dict[str, Any]:
    """What of the computing side an extraction on ``device`` depends on, as cache key entries: nothing for the
    CPU (so the keys of caches written before stay valid), ``{"compute": {"device": "cuda", "tf32": ...}}`` for a
    GPU. GPU kernels round differently from the CPU's (~1e-6), and TF32 (:func:`helpers.distributed.set_tf32`)
    by ~1e-3: descriptors made on one are never served to a run on the other."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cpu":
        return {}
    compute: dict[str, Any] = {"device": device.type}
    if device.type == "cuda":
        compute["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    return {"compute": compute}


def feature_cache_key(*, model: nn.Module, dataset: Dataset, kind: str = "global",
                      weights_hash: str | None = None, progress: bool = False,
                      hashes: ContentHashes | None = None, flip: bool = False,
                      device: torch.device | str | None = None) -> str:
    """sha256 of (weights hash, extraction config, image list with each file's content hash, where it runs):
    equal keys mean equal descriptors. ``hashes`` memoises the files' hashes (default: every file is read).
    ``flip`` (flip test-time augmentation) enters the key only when on, and ``device`` (:func:`compute_key`)
    only when not the CPU, so the keys of caches written without them stay valid."""
    payload: dict[str, Any] = {
        **compute_key(device),
        "format": CACHE_FORMAT,
        "kind": kind,
        "weights": weights_hash or state_dict_hash(model),
        "model": model_signature(model),
        "data": dataset_signature(dataset, progress=progress, hashes=hashes),
    }
    if flip:
        payload["flip"] = True
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
