"""Training data: the resumable distributed sample orders (shuffled, or P classes x K images per batch),
corrupt-image accounting (skip, count, cap) and the labelled training sets a config names (built-in synthetic,
GLDv2, an image folder, CIFAR-10)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, default_collate

from common.errors import InvalidValueError, ProjectRuntimeError
from datasets.folder import CorruptImageError
from helpers.distributed import DistEnv, barrier

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------------------


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (``set_start``): the resumed order is the original.

    The permutation of an epoch depends only on (seed, epoch); rank r takes positions r, r + W, r + 2W, ... of it,
    so the samples of global step s are positions [s * B, (s + 1) * B) of the permutation whatever the number of
    ranks W (B the global batch).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's share of the current epoch."""
        if not 0 <= start <= self.num_samples:
            raise InvalidValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


#: keeps the P-K order's stream apart from the other draws of one (seed, epoch)
_SALT_PK = 0x504B


class PKSampler(Sampler[int]):
    """P classes x K images in every global batch of ``batch_size`` = P * K (the P-K batches of metric learning,
    Hermans et al. 2017; pytorch-metric-learning's MPerClassSampler), resumable and distributed.

    Epoch e's order is a pure function of (seed, e): each of its ``steps_per_epoch`` global batches takes P
    distinct classes drawn uniformly, and of each class K distinct images drawn uniformly, or, from a class with
    fewer than K images, all of them and then repeats drawn at random. Rank r of W takes the contiguous slice
    [r * B / W, (r + 1) * B / W) of every global batch, so that the ranks' batches, joined in rank order, are the
    global batch whatever W. ``set_start`` skips the first indices of this rank's share of the epoch (a resume).

    It yields keys rather than indices: the d-th draw (d = 0, 1, ...) of image i within an epoch is
    ``i + d * N`` (N = ``len(labels)``), so that :class:`datasets.augment.AugmentedImages` makes every draw of
    an image a different view; ``key % N`` is the image.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray, *, k: int, batch_size: int, steps_per_epoch: int,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        classes, class_of = np.unique(labels, return_inverse=True)
        if k < 1 or batch_size % k:
            raise InvalidValueError(f"the batch of {batch_size} is not a whole number of classes of K={k} images "
                                    "(data.sampler.k must divide train.batch_size)")
        if batch_size % num_replicas:
            raise InvalidValueError(f"train.batch_size={batch_size} must be divisible by the {num_replicas} ranks")
        self.p, self.k, self.batch_size = batch_size // k, int(k), int(batch_size)
        if self.p > len(classes):
            raise InvalidValueError(f"a batch of P={self.p} classes x K={k} images needs {self.p} classes, the data "
                                    f"has {len(classes)}: lower train.batch_size or raise data.sampler.k")
        order = np.argsort(class_of, kind="stable")
        self.members = np.split(order, np.cumsum(np.bincount(class_of))[:-1])
        self.n = len(labels)
        self.steps_per_epoch, self.seed = int(steps_per_epoch), int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.per_rank = self.batch_size // self.num_replicas
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` keys of this rank's share of the current epoch."""
        if not 0 <= start <= self.steps_per_epoch * self.per_rank:
            raise InvalidValueError(f"start must be in [0, {self.steps_per_epoch * self.per_rank}], got {start}")
        self.start = int(start)

    def epoch_keys(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, batch_size) int64: the keys of every global batch of ``epoch``, all ranks."""
        rng = np.random.default_rng([self.seed, int(epoch), _SALT_PK])
        picks = []
        for _ in range(self.steps_per_epoch):
            for c in rng.choice(len(self.members), self.p, replace=False):
                members = self.members[c]
                if len(members) >= self.k:
                    picks.append(rng.choice(members, self.k, replace=False))
                else:
                    picks += [rng.permutation(members), rng.choice(members, self.k - len(members))]
        images = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
        # the draw number of each pick: its rank among the earlier picks of the same image
        order = np.argsort(images, kind="stable")
        ranked = images[order]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        draw = np.empty_like(images)
        draw[order] = np.arange(len(images)) - np.repeat(starts, np.diff(np.r_[starts, len(images)]))
        return (images + self.n * draw).reshape(self.steps_per_epoch, self.batch_size)

    def __iter__(self) -> Iterator[int]:
        lo = self.rank * self.per_rank
        mine = self.epoch_keys(self.epoch)[:, lo:lo + self.per_rank].reshape(-1)
        return iter(mine[self.start:].tolist())

    def __len__(self) -> int:
        return self.steps_per_epoch * self.per_rank - self.start


# --------------------------------------------------------------------------------------------------------------
# Corrupt images
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorruptSample:
    """What a dataset item became when its image (or its positive's) could not be decoded."""

    index: int
    path: str
    reason: str


class SkipCorrupt(Dataset):
    """Wrap a dataset: an item raising :class:`datasets.folder.CorruptImageError` becomes a CorruptSample.

    Pair with :func:`collate_skip_corrupt`, which drops those items from the batch and reports them, so that the
    count is exact whatever the number of DataLoader workers. ``set_epoch`` is forwarded.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except CorruptImageError as err:
            return CorruptSample(int(index), err.path, str(err))


@dataclass
class Batch:
    """A collated batch without its corrupt items, and the corrupt items it lost."""

    data: Any
    corrupt: list[CorruptSample]
    size: int

    def pin_memory(self) -> Batch:
        """The batch with its tensors in page-locked memory: what a ``DataLoader(pin_memory=True)`` calls on a
        custom batch type (without this method it hands the batch back unpinned, and the loop's
        ``non_blocking=True`` copies to the GPU wait for each transfer)."""
        return Batch(pinned(self.data), self.corrupt, self.size)


def pinned(data: Any) -> Any:
    """``data`` with every tensor in it (alone, or in tuples, lists and dicts) pinned; other values as they are."""
    if isinstance(data, torch.Tensor):
        return data.pin_memory()
    if isinstance(data, Mapping):
        return {k: pinned(v) for k, v in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # a named tuple
        return type(data)(*(pinned(v) for v in data))
    if isinstance(data, (tuple, list)):
        return type(data)(pinned(v) for v in data)
    return data


def collate_skip_corrupt(items: list[Any]) -> Batch:
    """``collate_fn`` over :class:`SkipCorrupt` items: the good ones collated, the corrupt ones listed."""
    good = [it for it in items if not isinstance(it, CorruptSample)]
    bad = [it for it in items if isinstance(it, CorruptSample)]
    return Batch(default_collate(good) if good else None, bad, len(good))


class TooManyCorruptImages(ProjectRuntimeError):
    """More distinct corrupt images than ``data.max_corrupt``: the run stops."""


class CorruptTally:
    """Distinct corrupt image paths seen so far (and how many items were skipped); enforces the ceiling."""

    def __init__(self, max_corrupt: int | None) -> None:
        self.max_corrupt = max_corrupt
        self.paths: set[str] = set()
        self.skipped = 0

    def add(self, samples: Sequence[CorruptSample]) -> list[str]:
        new = []
        for s in samples:
            self.skipped += 1
            if s.path not in self.paths:
                self.paths.add(s.path)
                new.append(s.path)
                log.warning("skipping corrupt training image %s (%s)", s.path, s.reason)
        if self.max_corrupt is not None and len(self.paths) > self.max_corrupt:
            raise TooManyCorruptImages(
                f"{len(self.paths)} corrupt training images (ceiling data.max_corrupt={self.max_corrupt}); "
                f"first ones: {sorted(self.paths)[:5]}. Re-download or remove them, or raise data.max_corrupt."
            )
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"paths": sorted(self.paths), "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.paths = set(state.get("paths", []))
        self.skipped = int(state.get("skipped", 0))


# --------------------------------------------------------------------------------------------------------------
# Training data from a config
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LabelledData:
    """A training set of ``(uint8 BGR image, label)`` items with contiguous labels 0..C-1."""

    dataset: Dataset
    labels: np.ndarray  # (N,) int64
    num_classes: int
    description: str


class _Relabelled(Dataset):
    def __init__(self, dataset: Dataset, mapping: np.ndarray, labels: np.ndarray) -> None:
        self.dataset, self.mapping, self.targets = dataset, mapping, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.dataset[index]
        return image, int(self.targets[index])


def _contiguous(dataset: Dataset, raw: Sequence[int] | np.ndarray, description: str) -> LabelledData:
    raw = np.asarray(raw, dtype=np.int64)
    classes, labels = np.unique(raw, return_inverse=True)
    labels = labels.astype(np.int64).reshape(-1)
    if not np.array_equal(classes, np.arange(len(classes))):
        dataset = _Relabelled(dataset, classes, labels)
    return LabelledData(dataset, labels, len(classes), description)


def build_labelled_dataset(data_cfg: Mapping[str, Any], *, env: DistEnv | None = None,
                           progress: bool = True) -> LabelledData:
    """The training set named by ``data.name``:

    - ``synthetic`` (default): the built-in split ``<root>/<synthetic.name>_train`` (drawn here when absent);
    - ``gldv2``: GLDv2-clean under ``root`` (``exclude_revisited`` + ``exclude_landmarks_file`` for RGLDv2-clean,
      ``min_class_size``);
    - ``folder``: ``root/<class>/<images>``;
    - ``cifar10``: ``root/cifar-10-batches-py`` (never downloaded here).
    """
    env = env or DistEnv()
    name = str(data_cfg.get("name", "synthetic")).lower()
    root = os.fspath(data_cfg.get("root", "data"))
    if name == "synthetic":
        from datasets.augment import LabelledImageList
        from datasets.synthetic import SyntheticConfig, build_synthetic, load_train_split

        synth = dict(data_cfg.get("synthetic") or {})
        sname = str(synth.get("name", "synth"))
        if env.is_main and not (Path(root) / f"{sname}_train" / "train.csv").is_file():
            log.info("drawing the built-in synthetic dataset under %s (no download)", root)
            build_synthetic(root, name=sname, config=SyntheticConfig(**(synth.get("config") or {})),
                            progress=progress)
        if env.distributed:
            barrier()
        paths, labels = load_train_split(root, sname)
        return _contiguous(LabelledImageList(paths, labels), labels,
                           f"built-in synthetic train split {Path(root) / (sname + '_train')}")
    if name == "gldv2":
        from datasets.gldv2 import GoogleLandmarksV2

        g = dict(data_cfg.get("gldv2") or {})
        ds = GoogleLandmarksV2(root, split=str(g.get("split", "train_clean")),
                               exclude_revisited=bool(g.get("exclude_revisited", False)),
                               exclude_landmarks_file=g.get("exclude_landmarks_file"),
                               min_class_size=int(g.get("min_class_size", 1)))
        kind = "RGLDv2-clean" if g.get("exclude_revisited") else "GLDv2-clean"
        return _contiguous(ds, ds.targets, f"{kind} ({g.get('split', 'train_clean')}) under {root}")
    if name == "folder":
        from datasets.folder import ImageFolderDataset

        ds = ImageFolderDataset(root)
        return _contiguous(ds, ds.targets, f"image folder {root}")
    if name == "cifar10":
        from datasets.folder import cifar10

        ds = cifar10(root, train=True)
        return _contiguous(ds, ds.targets, f"CIFAR-10 train under {root}")
    raise InvalidValueError(f"data.name must be synthetic, gldv2, folder or cifar10, got {name!r}")
