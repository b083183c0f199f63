"""The save format of a :class:`helpers.retrieval.Retriever`: a folder with the database, the weights when their
origin is unknown, and ``retriever.json`` (written last: the commit) naming every file with its sha256.

A save is atomic as a whole and writers to one folder take turns; a load re-reads ``retriever.json`` when a
concurrent save replaced the files it named.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.convention import InputConvention
from common.errors import InvalidValueError, MissingFileError, ProjectRuntimeError, shorten
from common.io import atomic_torch_save, atomic_write, file_sha256, io_error, printable_path
from helpers.builders import (
    GLOBAL_KINDS,
    backend_name,
    build_model,
    build_superglobal_reranker,
    global_dim,
    kind_of,
    load_database,
    make_database,
)
from helpers.cache_keys import state_dict_hash
from helpers.vector_db.base import AbstractVectorDB, CorruptIndexError
from models.checkpoint import OFFICIAL_CONVENTION, save_official_checkpoint
from models.superglobal import SuperGlobalRerank
from models.timm_global import TIMM_ARCH_PREFIX, TimmGlobal, timm_global_checkpoint

logger = logging.getLogger(__name__)

CONFIG_FILE = "retriever.json"
FORMAT_NAME = "helpers.retrieval.Retriever"
FORMAT_VERSION = 1
_DATABASE_SUFFIX = {"tensor": ".pt", "faiss": ".faiss"}
_LOCK_FILE = ".retriever.lock"
_LOAD_ATTEMPTS = 50  # re-reads of retriever.json while concurrent saves keep replacing the files it names
#: The files a save writes (``<part>-<save id>.<ext>``), those of saves before per-save names, and the temporary
#: files of an interrupted write of either: what a later save may remove once its retriever.json names others.
_SAVE_FILE = re.compile(r"^(database|model|reranker)-[0-9a-f]+-[0-9a-f]{8}\.(pt|faiss|pth)$")
_LEGACY_FILES = ("database.pt", "database.faiss", "database.faiss.json")
_TEMP_FILE = re.compile(r"^\.(database|model|reranker|retriever)[-.].*\.tmp$")


def model_config(model: nn.Module) -> dict[str, Any]:
    """What rebuilds the architecture: class, depth, options and input convention (weights not included)."""
    kind = kind_of(model, among=GLOBAL_KINDS)
    convention = getattr(model, "input_convention", OFFICIAL_CONVENTION)
    if kind == "timm_global":
        options = {"model_name": model.model_name, "pooling": model.pooling,
                   "dim": None if model.projection is None else int(model.dim)}
        return {"class": type(model).__name__, "depth": None, "options": options,
                "input_convention": convention.to_dict()}
    options: dict[str, Any] = {"reduction_dim": global_dim(model)}
    if kind == "superglobal":
        options.update(gemp=model.gemp, rgem=model.rgem, sgem=model.sgem, relup=model.relup,
                       scales=list(model.scales), antialias=model.antialias)
    return {"class": type(model).__name__, "depth": int(model.depth), "options": options,
            "input_convention": convention.to_dict()}


def save_retriever(retriever: Any, directory: str | os.PathLike, *, remote: Mapping[str, Any] | None = None) -> Path:
    """Write ``retriever`` into ``directory`` (see :meth:`helpers.retrieval.Retriever.save`); returns the path of
    ``retriever.json``."""
    try:
        backend = backend_name(retriever.database)
    except TypeError as exc:
        raise TypeError(f"{exc}: Retriever.save cannot write it; save your database yourself and pass it to "
                        "Retriever.load(database=...)") from None
    remote = dict(remote or {})
    if any("key" in name.lower() for name in remote):
        raise InvalidValueError("remote settings must not hold API keys (they are read from the environment)")
    directory = Path(directory)
    with writer_lock(directory):
        save_id = f"{time.time_ns():x}-{secrets.token_hex(4)}"
        files: dict[str, str] = {}

        def write_file(part: str, suffix: str, write: Callable[[Path], None]) -> str:
            name = f"{part}-{save_id}{suffix}"
            write(directory / name)
            files[name] = file_sha256(directory / name)
            return name

        if backend in _DATABASE_SUFFIX:
            spec: dict[str, Any] = {"backend": backend,
                                    "file": write_file("database", _DATABASE_SUFFIX[backend], retriever.database.save)}
        else:
            spec = {"backend": backend, "namespace": getattr(retriever.database, "namespace", ""),
                    "host": remote.get("host"), "index_name": remote.get("index_name")}
        model = {**model_config(retriever.model),
                 **_weights_record(retriever.model, retriever.weights, retriever.seed, "model", write_file)}
        config = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dim": retriever.dim,
                  "count": len(retriever.database), "model": model, "database": spec,
                  "reranker": _reranker_record(retriever, write_file), "settings": retriever.settings(),
                  "files": files}
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


def _reranker_record(retriever: Any, write_file: Callable[[str, str, Callable[[Path], None]], str]) -> dict | None:
    """What rebuilds the re-ranker: SuperGlobal's M, K, beta; CVNet's architecture and weights source."""
    r = retriever.reranker
    if r is None:
        return None
    if isinstance(r, SuperGlobalRerank):
        return {"kind": "superglobal", "M": int(r.M), "K": int(r.K), "beta": float(r.beta),
                "query_chunk": int(r.query_chunk)}
    return {"kind": "cvnet", "class": type(r).__name__, "depth": int(r.depth),
            "options": {"scales": list(r.scales)}, "input_convention": r.input_convention.to_dict(),
            **_weights_record(r, retriever.rerank_weights, retriever.rerank_seed, "reranker", write_file)}


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``retriever.json`` of a saved retriever, checked for format and version."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(f"no saved retriever in {directory}: {path} is missing "
                               "(build one with Retriever.save or `python retrieve.py build`)")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as exc:
        raise InvalidValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise InvalidValueError(f"{path} is not a saved Retriever")
    if config.get("version") != FORMAT_VERSION:
        raise InvalidValueError(f"{path} has version {config.get('version')}, expected {FORMAT_VERSION}")
    return config


def load_parts(directory: str | os.PathLike, *, model: nn.Module | None, database: AbstractVectorDB | None,
               reranker: Any, weights: str | os.PathLike | None, rerank_weights: str | os.PathLike | None,
               check_weights: bool, api_key: str | None, recorded_reranker: Any,
               device: torch.device | str | None = None) -> dict[str, Any]:
    """The constructor arguments of the retriever saved in ``directory`` (see
    :meth:`helpers.retrieval.Retriever.load`): model, database (a local one opened on ``device``), re-ranker,
    where their weights came from, and the recorded settings. A save running meanwhile is waited out: when a file
    named by ``retriever.json`` disappears because a new save replaced it, the new ``retriever.json`` is read."""
    for attempt in range(_LOAD_ATTEMPTS):
        config = read_config(directory)
        try:
            return _parts_of(directory, config, model=model, database=database, reranker=reranker,
                             weights=weights, rerank_weights=rerank_weights, check_weights=check_weights,
                             api_key=api_key, recorded_reranker=recorded_reranker, device=device)
        except FileNotFoundError:
            try:
                replaced = read_config(directory) != config
            except (OSError, ValueError):
                replaced = False
            if not replaced or attempt == _LOAD_ATTEMPTS - 1:
                raise
            logger.info("%s: a concurrent save replaced the files being loaded; reading it again", directory)
    raise AssertionError("unreachable")


def _parts_of(directory: str | os.PathLike, config: Mapping[str, Any], *, model: nn.Module | None,
              database: AbstractVectorDB | None, reranker: Any, weights: str | os.PathLike | None,
              rerank_weights: str | os.PathLike | None, check_weights: bool, api_key: str | None,
              recorded_reranker: Any, device: torch.device | str | None = None) -> dict[str, Any]:
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
            database = load_database(backend, directory / spec["file"], device=device)
        elif backend == "pinecone":
            database = make_database("pinecone", config["dim"], index_name=spec.get("index_name"),
                                     host=spec.get("host"), api_key=api_key, namespace=spec.get("namespace", ""))
        else:
            raise InvalidValueError(f"unknown database backend {shorten(backend)} in {directory / CONFIG_FILE}")
    if len(database) != config["count"]:
        logger.warning("%s: the database holds %d vectors, %d when saved", directory, len(database),
                       config["count"])
    rerank_record = config.get("reranker")
    rerank_source: dict[str, Any] = {}
    if reranker is recorded_reranker:
        reranker = _build_reranker(rerank_record, directory, weights=rerank_weights, check_weights=check_weights)
        if rerank_record is not None and rerank_record.get("kind") == "cvnet" and reranker is not None:
            rerank_source = _source_of(rerank_record, rerank_weights)
    source = _source_of(recorded, weights)
    return {"model": model, "database": database, "reranker": reranker, "weights": source.get("weights"),
            "seed": source.get("seed"), "rerank_weights": rerank_source.get("weights"),
            "rerank_seed": rerank_source.get("seed"), "settings": dict(config["settings"])}


#: The folders whose writer lock this process holds, each with the thread that holds it (a build holds it
#: for its whole run; its save, in the same thread, takes it again without waiting on itself).
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def writer_lock(directory: str | os.PathLike, *, wait: bool = True) -> Iterator[None]:
    """Writers to one folder take turns: an exclusive ``flock`` on its ``.retriever.lock`` (the folder is made;
    no lock where there is no fcntl). ``wait=False`` refuses at once, with a
    :class:`common.errors.ProjectRuntimeError` naming the folder, when another writer holds it (what a build
    does: the "already holds an index" check and the save must see the same folder). Re-entrant within a
    thread. Readers take no lock."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(directory, exc, action="create the folder") from exc
    key = os.fspath(directory.resolve())
    with _HELD_GUARD:
        mine = _HELD.get(key) == threading.get_ident()
    try:
        import fcntl
    except ImportError:  # not POSIX: saves are still atomic, concurrent writers are on their own
        fcntl = None
    if mine or fcntl is None:
        yield
        return
    with open(directory / _LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ProjectRuntimeError(f"{printable_path(directory)} is being written by another build or save "
                                      f"(it holds {_LOCK_FILE}): wait for it to finish, or use another "
                                      "folder") from None
        with _HELD_GUARD:
            _HELD[key] = threading.get_ident()
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD.pop(key, None)
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
            raise MissingFileError(f"{path} is missing: the saved retriever in {directory} is incomplete") from None
        if actual != digest:
            raise CorruptIndexError(f"{path}: sha256 mismatch with {directory / CONFIG_FILE}: the file is damaged "
                                    "(rebuild the index)")


def _weights_record(net: nn.Module, weights: str | None, seed: int | None, part: str,
                    write_file: Callable[[str, str, Callable[[Path], None]], str]) -> dict[str, Any]:
    """Where a network's weights come from: a checkpoint path, a seed, or (neither known) a checkpoint written
    into the save, so that a model of unknown origin still loads."""
    record: dict[str, Any] = {"weights": None if weights is None else str(Path(weights).resolve()), "seed": seed,
                              "fingerprint": state_dict_hash(net), "checkpoint": None}
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
        raise InvalidValueError(f"{directory} does not record where its {what}'s weights came from: pass it "
                                f"({'model=' if what == 'model' else 'reranker='})")
    if path is not None and not Path(path).is_file():
        flag = "weights= (--weights)" if what == "model" else "rerank_weights= (--rerank-weights)"
        raise MissingFileError(f"the index was built with {what} weights {path}, which is missing: put the file "
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
        raise InvalidValueError(f"unknown re-ranker {shorten(record.get('kind'))} in {directory / CONFIG_FILE}")
    reranker = _build_recorded(record, directory, kind="cvnet_rerank", weights=weights, what="re-ranker")
    if check_weights and record.get("fingerprint") and state_dict_hash(reranker) != record["fingerprint"]:
        raise InvalidValueError(f"{directory}: the CVNet re-ranker's weights differ from those it was saved with "
                                "(fingerprint mismatch); pass rerank_weights= with the right file, reranker= yourself, "
                                "or check_weights=False if you know better.")
    return reranker


def _check_same_model(model: nn.Module, recorded: Mapping[str, Any], *, check_weights: bool, where: Any) -> None:
    current = model_config(model)
    for key in ("class", "depth", "options", "input_convention"):
        if _normalise(current[key]) != _normalise(recorded[key]):
            raise InvalidValueError(f"{where} was built with a {recorded['class']} (depth {recorded['depth']}) whose "
                                    f"{key} "
                                    f"is {recorded[key]}; the model given has {current[key]}. Descriptors would not be "
                                    "comparable: use the recorded model (or rebuild the index).")
    if check_weights and recorded.get("fingerprint") and state_dict_hash(model) != recorded["fingerprint"]:
        source = recorded.get("weights") or (f"the checkpoint saved with it, {recorded['checkpoint']}"
                                             if recorded.get("checkpoint") else
                                             f"random weights, seed {recorded.get('seed')}")
        raise InvalidValueError(f"{where} was built with other weights than the model given (fingerprint mismatch): "
                                f"its descriptors are not comparable. Load the weights it was built with ({source}), "
                                "or pass check_weights=False if you know better.")


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))
