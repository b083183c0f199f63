"""Exports for the re-rankers that start from a SuperGlobal shortlist: AMES (ECCV 2024) and LoCoRe (CVPR 2025).

Both read, per dataset folder ``<data_root>/<dataset>/`` (file names and formats as their public loaders read them):

- ``nn_<desc>.pkl``: a pickled ``torch.Tensor`` of shape (2, nq, m), dtype float64: ``[0]`` the similarities of
  each query's top-m database images, best first, ``[1]`` their database indices (as floats; the loaders call
  ``.long()``). It is ``torch.from_numpy(np.stack((similarities, indices)))``, which is why float32 similarities
  and int64 indices end up float64 together.
- ``<desc>_query_global.pt`` / ``<desc>_gallery_global.pt``: the global descriptors as raw float32, row-major,
  no header (``torch.FloatStorage.from_file`` / ``np.memmap`` layout), (nq, d) and (n, d).
- ``test_query.txt`` / ``test_gallery.txt``: one image path per line, relative to the image root, in descriptor
  order; ``gnd_<dataset>.pkl`` (the revisited ground truth; the query boxes live there).

Local descriptors in the layout of AMES's own extractor (an HDF5 ``features`` array of (n, topk, 5 + d): x, y,
scale, mask, weight, descriptor) need AMES's trained local-feature detector to pick the top-k locations, which is
not part of this project; they are not written here.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from common.io import atomic_write

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
    """The (2, nq, m) float64 tensor AMES and LoCoRe unpickle: similarities stacked over indices."""
    if similarities.shape != indices.shape or similarities.ndim != 2:
        raise ValueError(f"similarities {tuple(similarities.shape)} and indices {tuple(indices.shape)} must be "
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
        raise ValueError(f"{path}: {size} bytes is not a whole number of {dim}-d float32 rows")
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
) -> dict[str, Path]:
    """Write ``<out_dir>/<dataset>/``: ``nn_<desc_name>.pkl``, the raw global descriptors, the image lists and
    (when given) a copy of the ground truth. ``ranking``: (similarities, indices) of an already computed shortlist
    (e.g. SuperGlobal's re-ranked top-M); without it the top-``m`` by inner product of the descriptors.
    Returns the written paths by role."""
    if query.shape[0] != len(query_names) or database.shape[0] != len(database_names):
        raise ValueError(f"{query.shape[0]} query / {database.shape[0]} database descriptors for "
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
    log.info("exported %s shortlists (%d queries x top-%d) and descriptors to %s", dataset, ids.shape[0],
             ids.shape[1], folder)
    return written
