"""Descriptor extraction for evaluation: global descriptors, CVNet re-ranking maps, a feature cache, shards.

- Global descriptors: a dataset item is a list of (3, H_s, W_s) tensors, one per test scale. Each scale goes
  through the model (CVNet-Global / SuperGlobal, which return L2-normalised (B, D) descriptors) and the scales
  are combined by :func:`models.functional.aggregate_scales` (per-scale L2, mean, L2: CVNet's multi-scale
  test). SuperGlobal's datasets yield scale 1.0 only, since its Scale-GeM resizes inside the model; one scale
  passes through unchanged.
- Flip test-time augmentation (``flip=True``, off by default): ``L2(desc(x) + desc(flip x))``, every scale of
  the image mirrored horizontally; it is part of the feature cache key.
- Images of identical size are batched (:func:`bucket_batches`); the revisited sets hold many sizes, so most
  batches hold one image, which is handled the same way.
- Pieces: a call can cut its images into consecutive pieces that no batch spans (``pieces``), so that an image's
  descriptor does not depend on what else is extracted with it; :mod:`helpers.feature_cache` (the on-disk cache
  of an evaluation, its resumable pieces split across torchrun ranks) relies on it.
- :class:`ReducedMapStore`: CVNet-Rerank's query-independent reduced maps (``reduce_featuremap`` output) of each
  image, computed once and kept in memory (bounded, least recently used first out) with an optional
  on-disk cache.
- Fast path (``fast=True``, the default): the model runs as :func:`inference_copy` (BatchNorm folded into the
  convs, channels-last weights and inputs) under ``inference_mode``; optionally ``torch.compile`` and, on CUDA,
  bfloat16/float16 autocast. In float32 it gives the faithful path's descriptors within 1e-5.
- Images already in memory (the retrieval API's) go through the same engine as :class:`ImageArrays`.
- Nothing silently wrong: descriptors and maps are checked to be finite where they are made
  (:class:`NonFiniteDescriptorError` names the images and the weights), and an image too small for the model
  is an :class:`ImageTooSmallError` naming it and the setting that fixes it.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm import tqdm

from common.convention import OFFICIAL_CONVENTION, InputConvention
from common.errors import InvalidValueError
from common.io import atomic_torch_save
from datasets.transforms import multiscale_tensors
from helpers.cache_keys import (
    CACHE_FORMAT,
    HASH_MEMO_DIR,
    ContentHashes,
    _image_entries,
    _image_names,
    _leaf_datasets,
    compute_key,
    dataset_signature,
    model_signature,
    state_dict_hash,
)
from models.functional import aggregate_scales
from models.inference import fast_runner

logger = logging.getLogger(__name__)

#: Short side below which an image is too small for SuperGlobal at its test scales: at scale 0.7071 a 92 px side
#: is the least that leaves a 3 x 3 stage-4 map, which Regional-GeM's reflection padding of 2 needs; 96 keeps a
#: margin. What ``data.min_side`` (eval.py) and ``--min-side`` (retrieve.py) should be for such images.
MIN_SIDE = 96
_NAMED = 5  # images an error message names before eliding the rest


class ExtractionError(InvalidValueError):
    """An image set the engine cannot describe faithfully; the message names the images and what to do."""


class NonFiniteDescriptorError(ExtractionError):
    """A model gave NaN or Inf descriptors (or CVNet maps): broken weights, never a result to rank with."""


class ImageTooSmallError(ExtractionError):
    """An image too small for the model (SuperGlobal's Regional-GeM pads its stage-4 map by 2, reflecting)."""


def describe_multiscale(model: nn.Module, per_scale: Sequence[Tensor], *, flip: bool = False,
                        combine: Callable[[Sequence[Tensor]], Tensor] = aggregate_scales) -> Tensor:
    """One batch through ``model`` at every scale: list of (B, 3, H_s, W_s) -> (B, D) descriptors combined by
    ``combine``, by default :func:`models.functional.aggregate_scales` (per-scale L2, mean, L2).

    ``flip``: flip test-time augmentation at the image level, ``L2(desc(x) + desc(flip x))`` where ``flip x``
    mirrors every scale horizontally and ``desc`` is the multi-scale descriptor above."""
    desc = combine([model(x) for x in per_scale])
    if not flip:
        return desc
    mirrored = combine([model(torch.flip(x, dims=(-1,))) for x in per_scale])
    return torch.nn.functional.normalize(desc + mirrored, dim=-1)


class ImageArrays(Dataset):
    """Images already in memory as engine items: item i is one normalised (3, H_s, W_s) tensor per scale of the
    uint8 (H, W, 3) BGR image ``images[i]``, resized with OpenCV per scale as the datasets do
    (:func:`datasets.transforms.multiscale_tensors`). CVNet-Global takes its three test scales, SuperGlobal and
    CVNet-Rerank's maps scale 1.0 only. ``names`` (one per image, e.g. its file) are what errors call them."""

    def __init__(self, images: Sequence[np.ndarray], *, scales: Sequence[float] = (1.0,),
                 convention: InputConvention = OFFICIAL_CONVENTION, names: Sequence[str] | None = None) -> None:
        if names is not None and len(names) != len(images):
            raise InvalidValueError(f"got {len(names)} names for {len(images)} images")
        self.images, self.scales, self.convention = images, tuple(float(s) for s in scales), convention
        self.names = None if names is None else [str(n) for n in names]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[Tensor]:
        return multiscale_tensors(self.images[i], self.scales, self.convention)


def item_name(dataset: Any, index: int) -> str:
    """What an error calls item ``index`` of a dataset: its image file where the dataset lists them
    (``image_paths``, or ``names``), through ConcatDataset and Subset; else ``Class[index]``."""
    if isinstance(dataset, ConcatDataset):
        part = bisect.bisect_right(dataset.cumulative_sizes, index)
        start = dataset.cumulative_sizes[part - 1] if part else 0
        return item_name(dataset.datasets[part], index - start)
    if isinstance(dataset, Subset):
        return item_name(dataset.dataset, dataset.indices[index])
    for attr in ("image_paths", "names"):
        listed = getattr(dataset, attr, None)
        if listed is not None:
            try:
                return os.fspath(listed[index])
            except (IndexError, KeyError, TypeError):
                break
    return f"{type(dataset).__name__}[{index}]"


def _named(dataset: Any, indices: Sequence[int]) -> str:
    names = ", ".join(item_name(dataset, i) for i in indices[:_NAMED])
    return names + (f" and {len(indices) - _NAMED} more" if len(indices) > _NAMED else "")


def check_finite(values: Tensor | Sequence[Tensor], *, dataset: Any, indices: Sequence[int], model: nn.Module,
                 weights_source: str | None = None, what: str = "descriptors") -> None:
    """Raise :class:`NonFiniteDescriptorError` when a row of ``values`` (B, ...) (or of each tensor of a list, rows
    aligned with ``indices``) holds NaN or Inf, naming the images (``dataset[indices]``) and the weights.

    ``weights_source`` says where the weights came from (a checkpoint path, "random (seed 0)", ...)."""
    tensors = [values] if isinstance(values, Tensor) else list(values)
    ok = torch.ones(len(indices), dtype=torch.bool)
    for t in tensors:
        ok &= torch.isfinite(t.detach().reshape(t.shape[0], -1)).all(dim=1).cpu()
    if bool(ok.all()):
        return
    bad = [int(i) for i, good in zip(indices, ok.tolist()) if not good]
    source = weights_source or "not named by the caller"
    raise NonFiniteDescriptorError(
        f"{type(model).__name__} gave NaN/Inf {what} for {len(bad)} image(s): {_named(dataset, bad)} "
        f"(weights: {source}). The weights or the model's numbers are broken (a damaged checkpoint, a diverged "
        "training run, a half-precision overflow): no ranking is computed from them.")


def _too_small(exc: RuntimeError, *, dataset: Any, indices: Sequence[int], per_scale: Sequence[Tensor],
               model: nn.Module) -> ImageTooSmallError:
    sizes = ", ".join(f"{t.shape[-2]}x{t.shape[-1]}" for t in per_scale)
    return ImageTooSmallError(
        f"{type(model).__name__} cannot describe {_named(dataset, list(indices))}: the image is too small "
        f"({sizes} px, H x W per scale) for its feature map's padding ({exc}). Enlarge small images: set "
        f"data.min_side: {MIN_SIDE} (eval.py) or --min-side {MIN_SIDE} (retrieve.py).")


# --------------------------------------------------------------------------------------------------------------
# Inference copy of a model: BatchNorm folded, channels-last
# --------------------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """bfloat16/float16 autocast on CUDA; float32 (no autocast) otherwise. A half dtype on the CPU is an error."""
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    if device.type != "cuda":
        raise InvalidValueError(f"dtype {dtype} is a CUDA option (autocast); extract in float32 on {device}")
    return torch.autocast("cuda", dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Batched iteration
# --------------------------------------------------------------------------------------------------------------


class _Indexed(Dataset):
    """Items ``indices[k]`` of a dataset as (index, item) pairs."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], skip: tuple[type[BaseException], ...] = ()) -> None:
        self.dataset, self.indices, self.skip = dataset, list(indices), skip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, list[Tensor] | None]:
        index = self.indices[k]
        try:
            item = self.dataset[index]
        except self.skip:  # e.g. an undecodable training image: the caller counts it (None), the run goes on
            return index, None
        return index, list(item) if isinstance(item, (list, tuple)) else [item]


def _unbatched(batch: list) -> Any:
    return batch[0]


def iterate_images(dataset: Dataset, indices: Sequence[int], *, num_workers: int = 0,
                   skip: tuple[type[BaseException], ...] = ()) -> Iterator[tuple[int, list[Tensor] | None]]:
    """(index, list of per-scale (3, H_s, W_s) tensors) for ``indices``, read by a DataLoader with workers; an
    item whose reading raises one of ``skip`` comes as (index, None)."""
    loader = DataLoader(_Indexed(dataset, indices, skip), batch_size=1, shuffle=False, num_workers=num_workers,
                        collate_fn=_unbatched)
    yield from loader


def bucket_batches(items: Iterable[tuple[int, list[Tensor]]], *, batch_size: int, max_pending: int | None = None
                   ) -> Iterator[tuple[list[int], list[Tensor]]]:
    """Group items of identical (per-scale) size into batches of up to ``batch_size``.

    Yields (indices, list of (B, 3, H_s, W_s)). At most ``max_pending`` images (default 4 * batch_size) wait
    for company: past that the fullest bucket goes out incomplete, so memory stays bounded when every image
    has its own size.
    """
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
    max_pending = max(max_pending or 4 * batch_size, batch_size)
    buckets: dict[tuple, list[tuple[int, list[Tensor]]]] = {}
    pending = 0

    def stack(bucket: list[tuple[int, list[Tensor]]]) -> tuple[list[int], list[Tensor]]:
        n_scales = len(bucket[0][1])
        return [i for i, _ in bucket], [torch.stack([t[s] for _, t in bucket]) for s in range(n_scales)]

    for index, tensors in items:
        key = tuple(tuple(t.shape) for t in tensors)
        bucket = buckets.setdefault(key, [])
        bucket.append((index, tensors))
        pending += 1
        if len(bucket) >= batch_size:
            pending -= len(bucket)
            yield stack(buckets.pop(key))
        elif pending >= max_pending:
            fullest = max(buckets, key=lambda k: len(buckets[k]))
            pending -= len(buckets[fullest])
            yield stack(buckets.pop(fullest))
    for bucket in buckets.values():
        yield stack(bucket)


# --------------------------------------------------------------------------------------------------------------
# Global descriptors
# --------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def extract_global_descriptors(
    *,
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "descriptors",
    fast: bool = True,
    compile_model: bool = False,
    dtype: torch.dtype | None = None,
    runner: nn.Module | None = None,
    weights_source: str | None = None,
    flip: bool = False,
    combine: Callable[[Sequence[Tensor]], Tensor] = aggregate_scales,
    skip_errors: tuple[type[BaseException], ...] = (),
    skipped: list[int] | None = None,
    pieces: Sequence[int] | None = None,
    on_piece: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Global descriptors (N, D) float32 on CPU of ``dataset[indices]`` (all by default), in that order.

    ``model`` must already be on ``device`` and return L2-normalised (B, D) descriptors per scale; the scales a
    dataset item holds are combined by :func:`models.functional.aggregate_scales`. ``fast`` runs an
    :func:`inference_copy` (BatchNorm folded, channels-last) on channels-last batches, equal to the model as given
    within 1e-5; ``compile_model`` adds ``torch.compile`` (worth it for long runs only); ``dtype``
    bfloat16/float16 autocasts on CUDA. ``runner``: the module to run in place of the one ``fast`` derives from
    ``model``, e.g. a :func:`fast_runner` kept by a caller that extracts a few images at a time, so that the model
    is not copied on every call. ``flip``: flip test-time augmentation, each image's descriptor is
    ``L2(desc(x) + desc(flip x))`` with every scale mirrored horizontally (:func:`describe_multiscale`); twice
    the compute. Off by default. ``combine``: how a batch's per-scale descriptors become one (training's mining
    passes its single scale through as the model gives it). ``skip_errors``: exceptions of reading an item that
    leave its row zero and its index in ``skipped`` instead of stopping (an all-skipped set gives (N, 0)).

    ``pieces``: the lengths of consecutive pieces of ``indices`` (default: one piece). A batch never holds images
    of two pieces, so an image's descriptor depends only on its piece, not on what else the call extracts (a
    model's float result can depend on its batch). ``on_piece(k, rows)`` receives piece k's descriptors as soon
    as it is complete (the feature cache writes each to disk).

    Every batch is checked: NaN/Inf descriptors raise :class:`NonFiniteDescriptorError` naming the images and
    ``weights_source`` (where the weights came from: a checkpoint path, "random (seed 0)", ...); an image too
    small for the model's padding raises :class:`ImageTooSmallError` naming it and the ``min_side`` that fixes it.
    """
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if not indices:
        raise InvalidValueError(f"nothing to extract for {desc}: no images")
    lengths = [len(indices)] if pieces is None else [int(n) for n in pieces]
    if sum(lengths) != len(indices) or min(lengths) < 1:
        raise InvalidValueError(f"pieces {lengths} do not cut {len(indices)} images into non-empty pieces")
    model.eval()
    if runner is None:
        runner = fast_runner(model) if fast else model
    if compile_model:
        runner = torch.compile(runner)
    run = functools.partial(_describe_batch, runner, device=torch.device(device), dtype=dtype, fast=fast, flip=flip,
                            combine=combine, dataset=dataset, model=model, weights_source=weights_source)
    position = {index: k for k, index in enumerate(indices)}
    piece_of = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum([0, *lengths])
    out: Tensor | None = None
    emitted = 0
    bar = tqdm(total=len(indices), desc=desc, unit="img", disable=not progress)

    def readable() -> Iterator[tuple[int, list[Tensor]]]:
        for index, tensors in iterate_images(dataset, indices, num_workers=num_workers, skip=skip_errors):
            if tensors is None:
                if skipped is not None:
                    skipped.append(index)
                bar.update(1)
                continue
            yield index, tensors

    def emit_until(piece: int) -> None:  # the pieces before ``piece`` are complete
        nonlocal emitted
        while emitted < piece:
            if on_piece is not None:
                rows = out[starts[emitted] : starts[emitted + 1]] if out is not None else torch.zeros(0, 0)
                on_piece(emitted, rows)
            emitted += 1

    for piece, items in itertools.groupby(readable(), key=lambda item: piece_of[position[item[0]]]):
        emit_until(int(piece))
        for batch_indices, per_scale in bucket_batches(items, batch_size=batch_size):
            desc_b = run(batch_indices, per_scale)
            if out is None:
                out = torch.zeros(len(indices), desc_b.shape[1], dtype=torch.float32)  # skipped rows stay zero
            out[[position[i] for i in batch_indices]] = desc_b
            bar.update(len(batch_indices))
    emit_until(len(lengths))
    bar.close()
    if out is None:  # every image was skipped
        return torch.zeros(len(indices), 0)
    return out


def _describe_batch(runner: nn.Module, batch_indices: list[int], per_scale: list[Tensor], *, device: torch.device,
                    dtype: torch.dtype | None, fast: bool, flip: bool, combine: Callable[[Sequence[Tensor]], Tensor],
                    dataset: Dataset, model: nn.Module, weights_source: str | None) -> Tensor:
    """The (B, D) float32 CPU descriptors of one batch (list of (B, 3, H_s, W_s)), checked finite; an image too
    small for the model's padding is an :class:`ImageTooSmallError`."""
    layout = torch.channels_last if fast else torch.contiguous_format
    with _autocast(device, dtype):
        batch = [x.to(device, non_blocking=True).contiguous(memory_format=layout) for x in per_scale]
        try:
            desc_b = describe_multiscale(runner, batch, flip=flip, combine=combine).float().cpu()
        except RuntimeError as exc:
            if "padding" not in str(exc).lower():
                raise
            raise _too_small(exc, dataset=dataset, indices=batch_indices, per_scale=per_scale, model=model) from exc
    check_finite(desc_b, dataset=dataset, indices=batch_indices, model=model, weights_source=weights_source)
    return desc_b


# --------------------------------------------------------------------------------------------------------------
# CVNet re-ranking maps
# --------------------------------------------------------------------------------------------------------------


class ReducedMapStore:
    """CVNet-Rerank's reduced maps (``reduce_featuremap`` of the stage-3 map at scale 1.0) per dataset image.

    ``get(i)`` -> list of (1, 256, h_s, w_s) tensors on ``device``, one per correlation scale. They do not depend
    on the other image of a pair, so each image's maps are computed once: kept in memory (at most
    ``max_items``, least recently used dropped first; None = no bound) and, with ``cache_dir``, written to disk
    (one file per image, keyed by the weights and the image's name, size and box) for later runs.
    ``dataset`` is anything indexable by the keys asked for, each item the list ``[(3, H, W)]`` of the image at
    scale 1.0: a benchmark dataset indexed 0..n-1, or the retrieval API's database images indexed by database
    id (the disk cache needs ``image_paths``, so it is for the former only).
    The disk entries are keyed by each file's content (sha256, memoised in ``<cache_dir>/content-sha256/``), so a
    replaced image is never served its old maps. Maps are checked to be finite (:class:`NonFiniteDescriptorError`
    names the images and ``weights_source``).
    ``prefetch(indices)`` computes the missing ones in batches of same-size images. ``fast=True`` computes them
    with an :func:`inference_copy` of the model (BatchNorm folded, channels-last), 1.3x faster on a CPU: the same
    maps up to float32 rounding (~1e-6 of their largest value, so scores agree to ~1e-7), not bit-identical, hence
    off by default.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        dataset: Dataset,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        max_items: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        weights_hash: str | None = None,
        fast: bool = False,
        weights_source: str | None = None,
    ) -> None:
        if max_items is not None and max_items < 1:
            raise InvalidValueError(f"max_items must be >= 1 or None, got {max_items}")
        self.fast = fast
        self.weights_source = weights_source
        self._runner: nn.Module | None = None
        self.model, self.dataset, self.device = model, dataset, torch.device(device)
        self.max_items, self.batch_size, self.num_workers = max_items, batch_size, num_workers
        self._memory: OrderedDict[int, list[Tensor]] = OrderedDict()
        self.computed = 0
        self.loaded = 0
        self._dir: Path | None = None
        self._names: list[str] | None = None
        if cache_dir is not None:
            prefix = hashlib.sha256(json.dumps({
                "format": CACHE_FORMAT, "weights": weights_hash or state_dict_hash(model),
                "model": model_signature(model),
                "data": dataset_signature(dataset, contents=False)["parts"], **compute_key(self.device),
            }, sort_keys=True).encode()).hexdigest()
            self._dir = Path(cache_dir) / f"maps-{prefix[:24]}"
            self._names = self._entry_names(ContentHashes(Path(cache_dir) / HASH_MEMO_DIR))

    def _entry_names(self, hashes: ContentHashes) -> list[str]:
        names = []
        for d in _leaf_datasets(self.dataset):
            for name, size, digest, box in _image_entries(d, _image_names(d), hashes):
                entry = f"{name}\t{size}\t{digest}\t{box}"
                names.append(hashlib.sha256(entry.encode()).hexdigest()[:32])
        return names

    def __len__(self) -> int:
        return len(self.dataset)

    def _disk_path(self, index: int) -> Path | None:
        return None if self._dir is None or self._names is None else self._dir / f"{self._names[index]}.pt"

    def _remember(self, index: int, maps: list[Tensor]) -> None:
        self._memory[index] = maps
        self._memory.move_to_end(index)
        while self.max_items is not None and len(self._memory) > self.max_items:
            self._memory.popitem(last=False)

    def _from_disk(self, index: int) -> list[Tensor] | None:
        path = self._disk_path(index)
        if path is None or not path.is_file():
            return None
        try:
            maps = torch.load(path, map_location="cpu", weights_only=True)["maps"]
        except Exception as exc:
            logger.warning("ignoring unreadable map cache file %s (%s)", path, exc)
            return None
        self.loaded += 1
        return [m.to(self.device) for m in maps]

    @torch.inference_mode()
    def prefetch(self, indices: Iterable[int], *, progress: bool = False) -> None:
        """Make the maps of ``indices`` available, computing the missing ones in same-size batches."""
        todo = []
        for i in dict.fromkeys(int(i) for i in indices):
            if i in self._memory:
                self._memory.move_to_end(i)
                continue
            maps = self._from_disk(i)
            if maps is not None:
                self._remember(i, maps)
            else:
                todo.append(i)
        if not todo:
            return
        self.model.eval()
        if self._runner is None:  # built on first use: the copy costs a model's worth of memory
            self._runner = fast_runner(self.model) if self.fast else self.model
        layout = torch.channels_last if self.fast else torch.contiguous_format
        items = iterate_images(self.dataset, todo, num_workers=self.num_workers)
        bar = tqdm(total=len(todo), desc="re-ranking maps", unit="img", disable=not progress, leave=False)
        for batch_indices, per_scale in bucket_batches(items, batch_size=self.batch_size):
            if len(per_scale) != 1:
                raise InvalidValueError(f"CVNet re-ranking maps come from scale 1.0 only; the dataset yields "
                                        f"{len(per_scale)} scales")
            images = per_scale[0].to(self.device).contiguous(memory_format=layout)
            reduced = self._runner.reduce_featuremap(self._runner.extract_featuremap(images))
            check_finite(reduced, dataset=self.dataset, indices=batch_indices, model=self.model,
                         weights_source=self.weights_source, what="re-ranking maps")
            for k, i in enumerate(batch_indices):
                maps = [r[k : k + 1].clone() for r in reduced]
                self.computed += 1
                path = self._disk_path(i)
                if path is not None:
                    atomic_torch_save({"maps": [m.cpu() for m in maps]}, path)
                self._remember(i, maps)
            bar.update(len(batch_indices))
        bar.close()

    def clear(self) -> None:
        """Drop the maps held in memory (the disk cache stays)."""
        self._memory.clear()

    def forget(self, indices: Iterable[int]) -> None:
        """Drop the in-memory maps of ``indices`` (e.g. database ids whose image was replaced)."""
        for i in indices:
            self._memory.pop(int(i), None)

    def in_memory(self, index: int) -> bool:
        """Whether the maps of ``index`` are held in memory now."""
        return int(index) in self._memory

    def cached_indices(self) -> list[int]:
        """The indices whose maps are held in memory, least recently used first."""
        return list(self._memory)

    def get(self, index: int) -> list[Tensor]:
        """Reduced maps of image ``index``: list of (1, 256, h_s, w_s), one per correlation scale."""
        index = int(index)
        if index not in self._memory:
            self.prefetch([index])
        self._memory.move_to_end(index)
        return self._memory[index]
