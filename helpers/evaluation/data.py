"""The datasets of an evaluation and what is held for them: which datasets a run evaluates (the named ones, or the
built-in benchmark), revisited Oxford / Paris (or any dataset in their layout), a class folder (``folder:PATH``,
datasets.folder.ClassFolderSet: one protocol, ``class``, and recall@k), the R1M distractors, the global descriptors
of each (:class:`Descriptors`) and the global ranking over them (:class:`GlobalRanking`), and the reader of ranked
images that a report draws its thumbnails from.

A class folder is named ``folder:PATH`` everywhere a dataset name goes (``data.datasets``, the keys of
results.json); PATH is taken as written (relative to the working directory), its separators normalised.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from common.errors import InvalidValueError, MissingFileError
from datasets.folder import CLASS_FOLDER_PREFIX, ClassFolderSet, class_folder_title, list_class_folder
from datasets.revisited import REVISITED_NAMES, RevisitedDataset, Revisitop1M
from helpers.config import ConfigError
from helpers.distributed import fits_on_device
from helpers.evaluation.metrics import CLASS_PROTOCOLS, PROTOCOLS
from helpers.reranking import global_ranking

logger = logging.getLogger(__name__)


def dataset_label(name: str, distractors: str | None) -> str:
    """``roxford5k`` or, with the R1M distractors, ``roxford5k+1m``."""
    return f"{name}+1m" if distractors else name


def folder_path(name: str) -> str | None:
    """The PATH of a class folder's name ``folder:PATH``; None for any other dataset name."""
    return name[len(CLASS_FOLDER_PREFIX):] if name.startswith(CLASS_FOLDER_PREFIX) else None


def file_name(label: str) -> str:
    """A dataset label as a file or folder name (feature cache, result grids, exports): itself, or for a class
    folder ``folder-<its title>`` with anything but letters, digits, '.', '_', '-' and '+' replaced by '-'."""
    path = folder_path(label.removesuffix("+1m"))
    if path is None:
        return label
    return re.sub(r"[^\w.+-]", "-", f"folder-{class_folder_title(path)}" + ("+1m" if label.endswith("+1m") else ""))


def resolve_datasets(data_cfg: Mapping[str, Any]) -> tuple[list[str], bool]:
    """The datasets a run evaluates and whether the built-in benchmark is one of them: the named ones
    (``data.datasets``; a class folder's ``folder:PATH`` with PATH normalised), or, when none is named, the
    built-in benchmark (``data.synthetic.name``) alone. A named dataset is never replaced by the built-in one,
    which is drawn only when no dataset is named or when it is named itself."""
    names = [name if folder_path(name) is None else CLASS_FOLDER_PREFIX + os.path.normpath(folder_path(name) or ".")
             for name in data_cfg["datasets"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.datasets names a dataset twice: {names}")
    synthetic = (data_cfg.get("synthetic") or {}).get("name")
    if not names:
        if not synthetic:
            raise ConfigError("data.datasets is empty: name the datasets to evaluate (e.g. data.datasets=[roxford5k]), "
                              "or set data.synthetic.name for the built-in benchmark")
        return [synthetic], True
    if synthetic and synthetic not in names:
        logger.info("data.datasets names %s: the built-in benchmark (data.synthetic.name=%s) is not evaluated",
                    ", ".join(names), synthetic)
    return names, bool(synthetic) and synthetic in names


def check_named_dataset(root: str, name: str) -> None:
    """A dataset named in ``data.datasets`` must be on disk in the revisitop layout (``<root>/<name>/gnd_<name>.pkl``
    and ``jpg/``), or be a class folder in its layout (datasets.folder: ``PATH/query/<class>/``,
    ``PATH/gallery/<class>/``); else a :class:`MissingFileError` of one line naming it, the missing path and how
    to get it."""
    if folder_path(name) is not None:
        list_class_folder(folder_path(name) or ".")  # its errors name the folder and what is missing
        return
    folder = os.path.join(root, name)
    wanted = ((folder, "folder"), (os.path.join(folder, f"gnd_{name}.pkl"), "ground-truth file"),
              (os.path.join(folder, "jpg"), "image folder"))
    missing = next(((path, what) for path, what in wanted if not os.path.exists(path)), None)
    if missing is None:
        return
    if name in REVISITED_NAMES:
        how = f"fetch it with `python prepare_data.py download --root {root} --datasets {name}`"
    else:
        how = (f"the revisited datasets are {', '.join(REVISITED_NAMES)} (`python prepare_data.py download --root "
               f"{root} --datasets <name>`); any other dataset must be in their layout (<root>/<name>/gnd_<name>.pkl "
               "and jpg/), or be a class folder named folder:PATH (PATH/query/<class>/, PATH/gallery/<class>/); the "
               "built-in benchmark runs when data.datasets is empty")
    raise MissingFileError(f"data.datasets names {name}, but its {missing[1]} {missing[0]} is missing: {how}")


def open_revisited(*, root: str, name: str, split: str, convention: Any, scales: Sequence[float],
                   min_side: int | None) -> RevisitedDataset | ClassFolderSet:
    """ROxford5k / RParis6k, or any dataset in their layout (the built-in benchmark), through one class; or a class
    folder (``folder:PATH``) through :class:`datasets.folder.ClassFolderSet`, which has the same interface."""
    if folder_path(name) is not None:
        return ClassFolderSet(folder_path(name) or ".", split, convention=convention, scales=tuple(scales),
                              min_side=min_side)
    return RevisitedDataset(root, name, split, convention=convention, scales=tuple(scales), min_side=min_side)


def dataset_protocols(query_set: Any) -> tuple[tuple[str, ...], bool]:
    """The protocols a dataset is scored under and whether recall@k is reported: a class folder's one protocol
    (``class``) with recall@k; revisited Easy / Medium / Hard with the papers' metrics (mAP, mP@k) only."""
    if isinstance(query_set, ClassFolderSet):
        return CLASS_PROTOCOLS, True
    return PROTOCOLS, False


def item_names(dataset: Any) -> list[str]:
    """What a report calls a dataset's images: a class folder's paths relative to their split folder
    (``eiffel/0042.jpg``, the class shown), else the file names."""
    names = getattr(dataset, "item_names", None)
    return list(names) if names is not None else [os.path.basename(p) for p in dataset.image_paths]


def folder_training_dir(names: Sequence[str]) -> str | None:
    """The training images of the first class folder of ``names``, what its learned whitening is learned on:
    ``PATH/training/`` when present, else ``training/`` beside PATH (the reference CLIP system's layout, PATH
    being its ``test/``); None when no class folder has either."""
    for name in names:
        path = folder_path(name)
        if path is None:
            continue
        for candidate in (os.path.join(path, "training"), os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                       "training")):
            if os.path.isdir(candidate):
                return candidate
        return None
    return None


def build_builtin_dataset(*, root: str, synthetic: Mapping[str, Any], progress: bool) -> str:
    """Build (idempotently) the synthetic benchmark ``synthetic["name"]`` under ``root``; returns its name."""
    from datasets.synthetic import SyntheticConfig, build_synthetic

    name = synthetic["name"]
    build_synthetic(root, name=name, config=SyntheticConfig(**(synthetic.get("config") or {})), progress=progress)
    return name


def open_distractors(*, root: str, convention: Any, scales: Sequence[float], min_side: int | None,
                     progress: bool = False, check: bool = False) -> Revisitop1M:
    """The R1M distractors; with ``check``, every listed image must be on disk (a missing one changes mAP)."""
    r1m = Revisitop1M(root, convention=convention, scales=tuple(scales), min_side=min_side)
    if not check:
        return r1m
    report = r1m.check_complete(progress=progress)
    if not report.complete:
        raise MissingFileError(
            f"revisitop1m: {len(report.missing)} of {report.n_listed} listed images are missing under "
            f"{r1m.image_dir} (e.g. {report.missing[0]}); a +1M evaluation needs all of them. Re-run "
            f"`python prepare_data.py download --root {root} --datasets revisitop1m`.")
    return r1m


@dataclass
class EvalSets:
    """One evaluated dataset: its query side (the cropped queries and the ground truth ``query.gnd``) and its
    database side."""

    query: RevisitedDataset | ClassFolderSet
    db: RevisitedDataset | ClassFolderSet


class CombinedReader:
    """``read(j)`` and ``name(j)`` (the file name) over the database followed by the distractors (indices
    continue after the database)."""

    def __init__(self, db: Any, distractors: Any | None) -> None:
        self.db, self.distractors = db, distractors

    def read(self, j: int) -> np.ndarray:
        n = len(self.db)
        return self.db.read(j) if j < n else self.distractors.read(j - n)

    def name(self, j: int) -> str:
        """What a report calls item ``j`` (:func:`item_names`: a class folder's ``<class>/<file>``)."""
        n = len(self.db)
        if j < n:
            names = getattr(self.db, "item_names", None)
            return names[j] if names is not None else os.path.basename(self.db.image_paths[j])
        return os.path.basename(self.distractors.image_paths[j - n])


def stored_distractors(vectors: torch.Tensor | None, dtype: str) -> torch.Tensor | None:
    """The distractors' descriptors as kept for ranking: float32 (faithful) or float16 (half the memory, 4 GB
    instead of 8 GB per model for R1M; scores then carry float16 rounding, so the +1M figures can move slightly)."""
    return vectors.half() if vectors is not None and dtype == "float16" else vectors


@dataclass(frozen=True)
class DescriptorKey:
    """Which descriptors: those of dataset ``dataset`` by global model ``kind``, with flip test-time augmentation
    (original and mirrored image averaged) or without."""

    dataset: str
    kind: str
    flip: bool = False


@dataclass
class Descriptors:
    """The global descriptors of one :class:`DescriptorKey`: ``query`` (nq, d), ``db`` (n_db, d) and, for a +1M run,
    ``distractors`` (n_1m, d) (float16 with ``data.distractors_dtype=float16``; shared by every dataset). A part is
    None on the ranks of a sharded extraction other than 0."""

    query: Tensor | None
    db: Tensor | None
    distractors: Tensor | None = None

    def database(self, with_distractors: bool = False) -> Tensor | list[Tensor]:
        """What is ranked: the database, or the list [database, distractors], never concatenated (+1M: 8 GB per
        copy)."""
        if not with_distractors:
            return self.db
        if self.distractors is None:
            raise InvalidValueError("these descriptors hold no distractors (data.distractors is unset)")
        return [self.db, self.distractors]


class GlobalRanking(NamedTuple):
    """A global ranking and what it ranked: ``ranks`` (n_db, nq) int32, best first, the ``query`` descriptors
    (nq, d) and the ``database`` (n_db, d) or its parts [database, distractors]."""

    ranks: np.ndarray
    query: Tensor
    database: Tensor | list[Tensor]


class DeviceCopies:
    """A run's copies of its descriptors on its GPU, each made once and reused by every later ranking of the same
    tensor (a dataset's database by its global ranking, its post rows and its +1M label; the distractors by every
    dataset and row). Together they take at most ``budget`` bytes (default: 40% of the GPU's memory, the rest left
    to extraction and CVNet re-ranking), and each at most half the free memory; a tensor that does not fit stays
    in host memory, and the ranking reads it block by block. On the CPU every tensor is used where it is."""

    def __init__(self, device: torch.device | str, *, budget: int | None = None) -> None:
        self.device = torch.device(device)
        if budget is None and self.device.type == "cuda":
            budget = int(0.4 * torch.cuda.get_device_properties(self.device).total_memory)
        self.budget = budget
        self.nbytes = 0
        self._held: dict[int, tuple[Tensor, Tensor]] = {}  # id of a host tensor -> (that tensor, its copy)

    def __call__(self, part: Tensor) -> Tensor:
        """``part``'s copy on the device (made at the first call), or ``part`` itself where it does not fit."""
        if self.device.type == "cpu" or part.device == self.device:
            return part
        held = self._held.get(id(part))
        if held is not None and held[0] is part:
            return held[1]
        nbytes = part.numel() * part.element_size()
        over = self.budget is not None and self.nbytes + nbytes > self.budget
        if over or (self.device.type == "cuda" and not fits_on_device(nbytes, self.device)):
            logger.info("ranking a %.1f GB part from host memory (no room for it on %s)", nbytes / 1e9, self.device)
            return part
        copy = part.to(self.device)
        self._held[id(part)] = (part, copy)  # the host tensor is kept alive, so its id is not reused
        self.nbytes += nbytes
        return copy


def rank_descriptors(descriptors: Descriptors, *, with_distractors: bool = False,
                     device: torch.device | str = "cpu", copies: DeviceCopies | None = None) -> GlobalRanking:
    """The global ranking (inner product, ties in database order) of the queries against the database, followed by
    the distractors when ``with_distractors``; on a GPU, the database is read from ``copies`` (made once per run)
    where they hold it, else streamed from host memory. The ranking holds the descriptors as given."""
    database = descriptors.database(with_distractors)
    placed = database
    if copies is not None:
        placed = [copies(p) for p in database] if isinstance(database, list) else copies(database)
    _, ranks = global_ranking(descriptors.query, placed, device=device, with_similarities=False,
                              rank_dtype=np.int32)
    return GlobalRanking(ranks, descriptors.query, database)
