"""Exports for the re-rankers that start from a SuperGlobal shortlist, AMES (ECCV 2024) and LoCoRe (CVPR 2025):
each query's top-m, the global descriptors, the image lists and the ground truth of a dataset, in the files and
formats their public loaders read (:func:`export_shortlists`; docs/evaluation.md, Shortlists for AMES / LoCoRe).
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.errors import InvalidValueError, ProjectRuntimeError
from common.io import atomic_write
from datasets.folder import ClassFolderSet, revisitop_ground_truth, write_ground_truth
from datasets.revisited import RevisitedDataset
from helpers.config import ConfigError
from helpers.evaluation.detail import (
    ScoreFn,
)

log = logging.getLogger(__name__)

#: LoCoRe's default shortlist length (its prepare_topk_global keeps the top 1600).
DEFAULT_SHORTLIST = 1600


def top_m(query: Tensor, database: Tensor, m: int, *, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Each query's ``m`` most similar database rows by inner product: (similarities (nq, m) float32,
    indices (nq, m) int64), best first, ``chunk`` queries at a time."""
    m = min(int(m), database.shape[0])
    sims, ids = [], []
    for start in range(0, query.shape[0], chunk):
        s, i = (query[start : start + chunk].float() @ database.float().T).topk(m, dim=1)
        sims.append(s)
        ids.append(i)
    return torch.cat(sims), torch.cat(ids)


def shortlist_tensor(similarities: Tensor, indices: Tensor) -> Tensor:
    """The (2, nq, m) float64 tensor AMES and LoCoRe unpickle: ``[0]`` each query's top-m similarities, best
    first, ``[1]`` their database indices as floats (the loaders call ``.long()``). It is
    ``torch.from_numpy(np.stack((similarities, indices)))``, which is why float32 similarities and int64 indices end
    up float64 together."""
    if similarities.shape != indices.shape or similarities.ndim != 2:
        raise InvalidValueError(f"similarities {tuple(similarities.shape)} and indices {tuple(indices.shape)} must be "
                                "the same (nq, m) shape")
    return torch.from_numpy(np.stack((similarities.float().cpu().numpy(), indices.long().cpu().numpy())))


def write_shortlist(path: str | os.PathLike, similarities: Tensor, indices: Tensor) -> Path:
    """Pickle :func:`shortlist_tensor` to ``path`` (atomically)."""
    tensor = shortlist_tensor(similarities, indices)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(tensor, f)

    atomic_write(path, write)
    return Path(path)


def write_raw_descriptors(path: str | os.PathLike, descriptors: Tensor) -> Path:
    """(n, d) descriptors as raw little-endian float32, row-major, no header."""
    array = np.ascontiguousarray(descriptors.detach().float().cpu().numpy(), dtype="<f4")
    atomic_write(path, lambda tmp: array.tofile(tmp))
    return Path(path)


def read_raw_descriptors(path: str | os.PathLike, dim: int) -> np.ndarray:
    """The inverse of :func:`write_raw_descriptors` (a read-only memory map of (n, dim) float32)."""
    size = os.path.getsize(path)
    if size % (4 * dim):
        raise InvalidValueError(f"{path}: {size} bytes is not a whole number of {dim}-d float32 rows")
    return np.memmap(path, dtype="<f4", mode="r", shape=(size // (4 * dim), dim))


def write_image_list(path: str | os.PathLike, names: Sequence[str]) -> Path:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{n}\n" for n in names)))
    return Path(path)


def export_shortlists(
    out_dir: str | os.PathLike,
    *,
    dataset: str,
    query: Tensor,
    database: Tensor,
    query_names: Sequence[str],
    database_names: Sequence[str],
    gnd_path: str | os.PathLike | None = None,
    desc_name: str = "superglobal",
    m: int = DEFAULT_SHORTLIST,
    ranking: tuple[Tensor, Tensor] | None = None,
    ground_truth: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/<dataset>/``: ``nn_<desc_name>.pkl``, the raw global descriptors, the image lists and
    (when given) a copy of the ground truth file ``gnd_path`` or the revisitop ``ground_truth`` itself as
    ``gnd_<dataset>.pkl``. ``ranking``: (similarities, indices) of an already computed shortlist (e.g.
    SuperGlobal's re-ranked top-M); without it the top-``m`` by inner product of the descriptors. Returns the
    written paths by role.

    The files, as AMES's and LoCoRe's public loaders read them:

    - ``nn_<desc>.pkl``: a pickled ``torch.Tensor`` (2, nq, m) float64 (:func:`shortlist_tensor`).
    - ``<desc>_query_global.pt`` / ``<desc>_gallery_global.pt``: the global descriptors as raw float32, row-major,
      no header (``torch.FloatStorage.from_file`` / ``np.memmap`` layout), (nq, d) and (n, d).
    - ``test_query.txt`` / ``test_gallery.txt``: one image path per line, relative to the image root, in
      descriptor order; ``gnd_<dataset>.pkl``: the revisited ground truth (the query boxes live there).
    """
    if query.shape[0] != len(query_names) or database.shape[0] != len(database_names):
        raise InvalidValueError(f"{query.shape[0]} query / {database.shape[0]} database descriptors for "
                                f"{len(query_names)} / {len(database_names)} image names")
    folder = Path(out_dir) / dataset
    folder.mkdir(parents=True, exist_ok=True)
    sims, ids = ranking if ranking is not None else top_m(query, database, m)
    written = {
        "shortlist": write_shortlist(folder / f"nn_{desc_name}.pkl", sims, ids),
        "query_global": write_raw_descriptors(folder / f"{desc_name}_query_global.pt", query),
        "gallery_global": write_raw_descriptors(folder / f"{desc_name}_gallery_global.pt", database),
        "query_list": write_image_list(folder / "test_query.txt", query_names),
        "gallery_list": write_image_list(folder / "test_gallery.txt", database_names),
    }
    if gnd_path is not None:
        target = folder / Path(gnd_path).name
        if Path(gnd_path).resolve() != target.resolve():
            shutil.copyfile(gnd_path, target)
        written["gnd"] = target
    elif ground_truth is not None:
        written["gnd"] = write_ground_truth(folder / f"gnd_{dataset}.pkl", dict(ground_truth))
    log.info("exported %s shortlists (%d queries x top-%d) and descriptors to %s", dataset, ids.shape[0],
             ids.shape[1], folder)
    return written


def check_exports(cfg: Mapping[str, Any], needed: set[str]) -> None:
    """``export.*`` needs the rankings it writes: refused before anything runs otherwise."""
    export = cfg.get("export") or {}
    if not export.get("ames"):
        return
    if "superglobal" not in needed:
        raise ConfigError("export.ames writes SuperGlobal shortlists: add superglobal (or superglobal_rerank) to "
                          "methods")
    if export.get("reranked") and "superglobal_rerank" not in cfg["methods"]:
        raise ConfigError("export.reranked=true exports the superglobal_rerank ranking: add superglobal_rerank to "
                          "methods")


def export_ames(out_dir: str | os.PathLike, *, name: str, query_set: RevisitedDataset | ClassFolderSet,
                db_set: RevisitedDataset | ClassFolderSet,
                xq: torch.Tensor, xb: torch.Tensor, ranks: np.ndarray, m: int,
                reranked: tuple[np.ndarray, ScoreFn, int] | None = None) -> dict[str, Any]:
    """Write ``<out_dir>/<name>/`` for AMES and LoCoRe (:func:`export_shortlists`): the SuperGlobal
    descriptors, each query's top ``m`` of the SuperGlobal ranking ``ranks`` (n_db, nq) with their cosine
    similarities or, with ``reranked`` = (superglobal_rerank ranking, its score lookup, M), the re-ranked top
    min(m, M) with their re-ranking scores, the image lists relative to the dataset folder and the ground truth.

    A class folder (``folder:PATH``) is exported as ``folder-<title>/``: its image paths relative to PATH
    (``query/<class>/...``, ``gallery/<class>/...``) and its ground truth written in revisitop's form
    (:func:`datasets.folder.revisitop_ground_truth`: positives as 'easy', junk as 'junk', each query's box or
    whole image)."""
    from helpers.evaluation.export import export_shortlists

    if reranked is None:
        m = min(int(m), ranks.shape[0])
        ids = torch.from_numpy(np.ascontiguousarray(ranks[:m].T).astype(np.int64))
        sims = (xq.float() @ xb.float().T).gather(1, ids)
        source = f"superglobal global ranking, top {m}"
    else:
        final, score_of, top = reranked
        m = min(int(m), int(top), final.shape[0])
        ids = torch.from_numpy(np.ascontiguousarray(final[:m].T).astype(np.int64))
        sims = torch.from_numpy(score_of(ids.numpy())).float()
        if not torch.isfinite(sims).all():
            raise ProjectRuntimeError("export.reranked: the SuperGlobal re-ranking recorded no score for some of "
                                      "the top "
                                      f"{m} of {name} (set export.shortlist <= rerank.superglobal.M)")
        source = f"superglobal_rerank ranking, top {m} with the re-ranking scores"
    written = export_shortlists(
        out_dir, dataset=name, query=xq, database=xb,
        query_names=[os.path.relpath(p, query_set.data_dir) for p in query_set.image_paths],
        database_names=[os.path.relpath(p, db_set.data_dir) for p in db_set.image_paths],
        gnd_path=query_set.gnd_path, desc_name="superglobal", ranking=(sims, ids),
        ground_truth=revisitop_ground_truth(query_set.folder) if isinstance(query_set, ClassFolderSet) else None)
    return {"shortlist": source, "m": m, "files": {k: os.fspath(v) for k, v in written.items()}}
