"""PairedDataset: ``(image, label)`` items -> ``(image, positive image, label)`` for CVNet-Global's momentum branch.

CVNet-Global's key encoder sees a *positive* of each query: another image of the same landmark. The choice is a
pure function of (seed, epoch, index), so a run gives the same pairs whatever the DataLoader's worker count or
order, and a resumed run gives the pairs the interrupted one would have.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from common.errors import InvalidValueError
from common.io import atomic_write

logger = logging.getLogger(__name__)

CACHE_FORMAT = "paired-label-index-v1"
SPOT_CHECKS = 8  # items re-read to validate a cache when the labels can only be had by reading the dataset


# ------------------------------------------------------------------------------------------- label index


@dataclass(frozen=True)
class LabelIndex:
    """label -> indices, as flat arrays: the members of class c are ``order[starts[c] : starts[c] + counts[c]]``
    (increasing indices); ``class_of[i]`` is the class (position in ``classes``) of item i.
    """

    labels: np.ndarray  # (N,) int64, the label of every item
    classes: np.ndarray  # (C,) sorted distinct labels
    class_of: np.ndarray  # (N,) int64 in [0, C)
    order: np.ndarray  # (N,) item indices grouped by class
    starts: np.ndarray  # (C,)
    counts: np.ndarray  # (C,)

    def members(self, c: int) -> np.ndarray:
        return self.order[self.starts[c] : self.starts[c] + self.counts[c]]


def _as_label_array(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise InvalidValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def build_label_index(labels: Sequence[int] | np.ndarray | torch.Tensor) -> LabelIndex:
    """Group item indices by label (any integers; classes in increasing label order)."""
    arr = _as_label_array(labels)
    classes, class_of = np.unique(arr, return_inverse=True)
    class_of = class_of.astype(np.int64).reshape(-1)
    order = np.argsort(class_of, kind="stable").astype(np.int64)
    counts = np.bincount(class_of, minlength=len(classes)).astype(np.int64)
    starts = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=starts[1:])
    return LabelIndex(arr, classes, class_of, order, starts, counts)


def labels_key(labels: np.ndarray, n: int) -> str:
    """Cache key: a SHA-256 of the label list's content (int64, little-endian) together with len(dataset)."""
    digest = hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()
    return f"{CACHE_FORMAT}:n={n}:sha256={digest}"


def _save_cache(path: Path, key: str, labels: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: given a name, np.savez would append ".npz"
            np.savez(f, key=np.array(key), labels=labels)

    atomic_write(path, write)  # a crash never leaves a half-written cache behind


def _load_cache(path: Path) -> tuple[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return str(data["key"]), _as_label_array(data["labels"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable label-index cache %s (%s)", path, err)
        return None


# ------------------------------------------------------------------------------------------- second views


def _crop_box(h: int, w: int, rng: np.random.Generator, min_area: float, ratio: tuple[float, float]):
    area = rng.uniform(min_area, 1.0) * h * w
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = min(w, max(1, round(math.sqrt(area * aspect))))
    ch = min(h, max(1, round(math.sqrt(area / aspect))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return top, left, ch, cw


def random_flip_and_crop(
    image: Any,
    rng: np.random.Generator,
    *,
    min_area: float = 0.8,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Any:
    """The default second view of a single-image class: horizontal flip (p = 0.5), then a random crop of
    ``min_area``..1 of the area (aspect ratio log-uniform in ``ratio``) resized back to the input size.

    image: ndarray (H, W[, C]) (resized with cv2, bilinear), tensor (..., H, W) or PIL image; same type, size and
    dtype come back. All randomness comes from ``rng``.
    """
    flip = bool(rng.random() < 0.5)
    if isinstance(image, torch.Tensor):
        h, w = image.shape[-2:]
        top, left, ch, cw = _crop_box(h, w, rng, min_area, ratio)
        x = image.flip(-1) if flip else image
        x = x[..., top : top + ch, left : left + cw]
        lead = x.shape[:-2]
        x4 = x.reshape(1, -1, ch, cw).to(torch.float32)
        x4 = torch.nn.functional.interpolate(x4, size=(h, w), mode="bilinear", align_corners=False)
        out = x4.reshape(*lead, h, w)
        if not image.dtype.is_floating_point:
            info = torch.iinfo(image.dtype)
            out = out.round().clamp(info.min, info.max)
        return out.to(image.dtype)
    if isinstance(image, np.ndarray):
        import cv2

        h, w = image.shape[:2]
        top, left, ch, cw = _crop_box(h, w, rng, min_area, ratio)
        x = image[:, ::-1] if flip else image
        x = np.ascontiguousarray(x[top : top + ch, left : left + cw])
        return cv2.resize(x, dsize=(w, h), interpolation=cv2.INTER_LINEAR)
    from PIL import Image

    if isinstance(image, Image.Image):
        w, h = image.size
        top, left, ch, cw = _crop_box(h, w, rng, min_area, ratio)
        x = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
        return x.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR)
    raise TypeError(f"cannot make a second view of a {type(image).__name__}: expected ndarray, tensor or PIL image")


# ------------------------------------------------------------------------------------------- the dataset


class PairedDataset(Dataset):
    """Wrap a dataset of ``(image, label)`` items; yield ``(image, positive_image, label)``.

    The positive is another item with the same label (never the same index when the class has more than one
    item), drawn uniformly by ``numpy.random.default_rng([seed, epoch, index])``: deterministic whatever the
    DataLoader's workers do. Call :meth:`set_epoch` before each epoch's iterator is created (with
    ``persistent_workers=True`` the workers keep the epoch they were started with).

    Classes with a single item get as positive a second view of that item: ``single_view_transform(image, rng)``
    with ``rng`` the item's numpy Generator (default :func:`random_flip_and_crop`); they are counted
    (``num_single_item_classes``) and logged once.

    Labels come from ``labels`` if given, else ``dataset.targets`` or ``dataset.labels``, else by reading every
    item once. ``cache_path`` (an .npz) stores them under :func:`labels_key` (content hash + length): a cache
    whose key differs from the labels at hand is rebuilt; when the labels can only be had by reading the dataset,
    a cache is accepted if its length matches and ``SPOT_CHECKS`` re-read items agree with it.
    The returned label is the one the positive was chosen by (an int).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        seed: int = 0,
        labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        cache_path: str | os.PathLike | None = None,
        single_view_transform: Callable[[Any, np.random.Generator], Any] | None = None,
    ) -> None:
        if seed < 0:
            raise InvalidValueError(f"seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0
        self.single_view_transform = single_view_transform or random_flip_and_crop
        self.index = build_label_index(self._resolve_labels(labels, cache_path))
        single = self.index.counts == 1
        self.num_single_item_classes = int(single.sum())
        if self.num_single_item_classes:
            logger.info(
                "PairedDataset: %d of %d classes have a single item; their positive is a second view from %s",
                self.num_single_item_classes, len(self.index.classes),
                getattr(self.single_view_transform, "__name__", type(self.single_view_transform).__name__),
            )

    # -- labels -----------------------------------------------------------------------------------------

    def _known_labels(self, labels: Any) -> np.ndarray | None:
        n = len(self.dataset)
        if labels is not None:
            arr = _as_label_array(labels)
            if len(arr) != n:
                raise InvalidValueError(f"labels has {len(arr)} entries but the dataset has {n} items")
            return arr
        for name in ("targets", "labels"):
            value = getattr(self.dataset, name, None)
            if value is None or callable(value):
                continue
            try:
                arr = _as_label_array(value)
            except (TypeError, ValueError) as err:
                logger.info("dataset.%s is not a per-item integer label list (%s); not using it", name, err)
                continue
            if len(arr) == n:
                return arr
            logger.info("dataset.%s has %d entries for %d items; not using it", name, len(arr), n)
        return None

    def _read_labels(self) -> np.ndarray:
        n = len(self.dataset)
        out = np.empty(n, dtype=np.int64)
        for i in tqdm(range(n), desc="PairedDataset: reading labels", disable=n < 1000):
            out[i] = int(self.dataset[i][1])
        return out

    def _resolve_labels(self, labels: Any, cache_path: str | os.PathLike | None) -> np.ndarray:
        n = len(self.dataset)
        known = self._known_labels(labels)
        if cache_path is None:
            return known if known is not None else self._read_labels()
        path = Path(cache_path)
        cached = _load_cache(path) if path.is_file() else None
        if cached is not None:
            key, cached_labels = cached
            if known is not None:
                if key == labels_key(known, n):
                    return known
                logger.warning("label-index cache %s does not match these labels; rebuilding it", path)
            elif key == labels_key(cached_labels, n) and self._spot_check(cached_labels):
                logger.info("label index loaded from %s", path)
                return cached_labels
            else:
                logger.warning("label-index cache %s does not match this dataset; rebuilding it", path)
        result = known if known is not None else self._read_labels()
        _save_cache(path, labels_key(result, n), result)
        return result

    def _spot_check(self, cached: np.ndarray) -> bool:
        n = len(self.dataset)
        if len(cached) != n:
            return False
        rng = np.random.default_rng(n)
        picks = rng.choice(n, size=min(SPOT_CHECKS, n), replace=False) if n else []
        return all(int(self.dataset[int(i)][1]) == int(cached[i]) for i in picks)

    # -- sampling ---------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's pairs (call on the main process before iterating)."""
        if epoch < 0:
            raise InvalidValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    @property
    def labels(self) -> np.ndarray:
        return self.index.labels

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)

    def __len__(self) -> int:
        return len(self.index.labels)

    def _normalise(self, index: int) -> int:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        return index

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _draw_positive(self, index: int, rng: np.random.Generator) -> int:
        c = int(self.index.class_of[index])
        count = int(self.index.counts[c])
        if count == 1:
            return index
        members = self.index.members(c)
        own = int(np.searchsorted(members, index))  # members are increasing indices
        r = int(rng.integers(count - 1))  # uniform over the other count - 1 members
        return int(members[r + (r >= own)])

    def positive_index(self, index: int) -> int:
        """The index of ``index``'s positive this epoch (``index`` itself for a single-item class)."""
        index = self._normalise(index)
        return self._draw_positive(index, self._rng(index))

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        index = self._normalise(index)
        rng = self._rng(index)
        pos = self._draw_positive(index, rng)
        image = self.dataset[index][0]
        if pos == index:
            positive = self.single_view_transform(image, rng)
        else:
            positive = self.dataset[pos][0]
        return image, positive, int(self.index.labels[index])
