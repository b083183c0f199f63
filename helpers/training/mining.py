"""Positive and hard-negative mining for CVNet-Rerank training, and the curriculum that makes negatives harder.

CVNet (Sec. 3.4) trains the re-ranker on image pairs chosen with the global descriptors of the trained backbone:
positives are images of the same landmark that the global model ranks high (so they actually share the object),
hard negatives are top-ranked images of *other* landmarks. Its curriculum raises the difficulty over training;
here the negative of a query is drawn from the ``pool`` most similar other-landmark images, with ``pool``
shrinking from ``pool_start`` (easy: almost any negative) to ``pool_end`` (only the hardest), and the
Hide-and-Seek probability growing alongside.

:func:`mine_pairs` is the whole step as training runs it: describe every training image with the frozen backbone,
mine, and cache the result in ``<out_dir>/mining.pt`` (keyed by the backbone file, the labels and the settings).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from common.convention import InputConvention
from common.errors import InvalidValueError
from common.io import atomic_torch_save
from datasets.augment import (
    _SALT_HIDE,
    _SALT_NEGATIVE,
    _SALT_POSITIVE,
    _SALT_QUERY,
    ResizedImages,
    TrainAugment,
    hide_and_seek,
    item_rng,
)
from datasets.revisited import describe_item
from datasets.transforms import CorruptImageError, to_tensor
from helpers.builders import build_model, global_dim
from helpers.distributed import DistEnv, all_gather_cat, all_gather_objects, fits_on_device
from helpers.extraction import extract_global_descriptors
from helpers.training.data import LabelledData
from models.functional import topk_merge

log = logging.getLogger(__name__)

MINING_NAME = "mining.pt"
MINING_FORMAT = "cvnet-mining-v1"


# --------------------------------------------------------------------------------------------------------------
# Descriptors and neighbours
# --------------------------------------------------------------------------------------------------------------


class _Images(Dataset):
    """Engine items of a training set: the image of each ``(image (3, H, W), label)`` item, as its one scale."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> list[Tensor]:
        return [self.dataset[index][0]]

    def describe(self, index: int) -> str:
        return describe_item(self.dataset, index)


def _as_given(per_scale: Sequence[Tensor]) -> Tensor:
    """Mining's one scale, as the model gives it (already L2-normalised): no re-normalisation rounding."""
    return per_scale[0]


def extract_descriptors(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    env: DistEnv | None = None,
    progress: bool = True,
    weights_source: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Global descriptors of every item of ``dataset`` (items ``(image (3, H, W), label)``, equal sizes), through
    the extraction engine (the model as given, batches of ``batch_size``, finite checks).

    Returns ``(descriptors (N, D) float32 on CPU, valid (N,) bool)``; an undecodable image gives a zero row and
    ``valid`` False. Under DDP each rank describes every W-th item and the results are gathered, so every rank
    returns the full matrix.
    """
    env = env or DistEnv()
    n = len(dataset)
    mine = list(range(env.rank, n, env.world_size))
    skipped: list[int] = []
    local = extract_global_descriptors(
        model=model, dataset=_Images(dataset), indices=mine, device=device, batch_size=batch_size,
        num_workers=num_workers, progress=progress and env.is_main, desc="mining: global descriptors", fast=False,
        weights_source=weights_source, combine=_as_given, skip_errors=(CorruptImageError,), skipped=skipped)
    if local.shape[1] == 0:  # this rank's images all failed to decode
        local = torch.zeros(len(mine), global_dim(model))
    local_ok = torch.ones(len(mine), dtype=torch.bool)
    if skipped:
        position = {index: k for k, index in enumerate(mine)}
        local_ok[[position[i] for i in skipped]] = False
        log.warning("mining: %d undecodable image(s) left out", len(skipped))
    if not env.distributed:
        return local, local_ok
    dev = env.device if env.device.type == "cuda" else torch.device("cpu")
    gathered = all_gather_cat(local.to(dev), env).cpu()
    gathered_ok = all_gather_cat(local_ok.to(dev), env).cpu()
    order = torch.tensor([i for r in range(env.world_size) for i in range(r, n, env.world_size)])
    desc = torch.zeros(n, local.shape[1])
    valid = torch.zeros(n, dtype=torch.bool)
    desc[order] = gathered
    valid[order] = gathered_ok
    return desc, valid


def mine_neighbours(
    descriptors: Tensor,
    labels: Tensor,
    *,
    valid: Tensor | None = None,
    num_positives: int = 20,
    num_negatives: int = 100,
    chunk: int | None = None,
    rows: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    memory_budget: int = 1 << 30,
    block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """For each image, its most similar same-label images and most similar other-label images.

    descriptors (N, D) L2-normalised, labels (N,). Returns ``(positives (N, num_positives), negatives
    (N, num_negatives))`` int64 indices on the CPU, sorted by decreasing cosine similarity, padded with -1 where
    fewer exist. An image is never its own positive; invalid images (``valid`` False) are never chosen and get
    -1 rows. ``rows`` restricts the computation to those query rows (the others stay -1), for sharding.

    The similarities are computed on ``device`` in (``chunk`` queries, ``block`` database rows) tiles, each
    tile's top-k merged into the running top-k of its queries (:func:`models.functional.topk_merge`), so the
    largest temporary is one tile of about ``memory_budget`` bytes and each GEMM is large (GLDv2's 1.6M images:
    (1024, 65536) tiles rather than 40 rows against all 1.6M). The descriptors are copied to a GPU once when they
    fit (:func:`helpers.distributed.fits_on_device`), else read from host memory block by block.
    """
    n = descriptors.shape[0]
    if labels.shape != (n,):
        raise InvalidValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    device = torch.device(device)
    x = descriptors.float()
    if device.type == "cuda" and fits_on_device(x.numel() * 4, device):
        x = x.to(device)
    valid = (torch.ones(n, dtype=torch.bool) if valid is None else valid.bool()).to(x.device)
    labels = labels.long().to(x.device)
    block, chunk = mining_tiles(n, memory_budget, block=block, chunk=chunk)
    pos = torch.full((n, num_positives), -1, dtype=torch.long)
    neg = torch.full((n, num_negatives), -1, dtype=torch.long)
    todo = torch.arange(n) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
    todo = todo[valid.cpu()[todo]]
    for start in tqdm(range(0, len(todo), chunk), desc="mining: neighbours", disable=len(todo) <= chunk * 8):
        idx = todo[start : start + chunk]
        found = _tile_top(x, labels, valid, idx, block=block, device=device, ks=(num_positives, num_negatives))
        for out, (val, ind) in zip((pos, neg), found):
            if val is not None:
                out[idx, : ind.shape[1]] = ind.masked_fill(~torch.isfinite(val), -1).cpu()
    return pos, neg


def mining_tiles(n: int, memory_budget: int, *, block: int | None = None, chunk: int | None = None
                 ) -> tuple[int, int]:
    """(database rows, query rows) of a mining tile: up to 65536 database rows, and as many queries as keep the
    tile's temporaries (similarities, two masked copies, masks: about 16 bytes an entry) within ``memory_budget``."""
    block = block or max(1, min(n, 1 << 16))
    chunk = chunk or max(1, min(4096, memory_budget // (16 * block)))
    return block, chunk


def _tile_top(x: Tensor, labels: Tensor, valid: Tensor, idx: Tensor, *, block: int, device: torch.device,
              ks: tuple[int, int]) -> list[tuple[Tensor | None, Tensor | None]]:
    """For query rows ``idx``: the top ``ks[0]`` same-label and top ``ks[1]`` other-label (similarity (c, k),
    index (c, k)) over every database block, merged block after block; (None, None) where k is 0."""
    n = x.shape[0]
    q, q_labels, q_idx = x[idx.to(x.device)].to(device), labels[idx.to(x.device)].to(device), idx.to(device)
    running: list[tuple[list[Tensor], list[Tensor]]] = [([], []), ([], [])]
    for b0 in range(0, n, block):
        xb = x[b0 : b0 + block].to(device, non_blocking=True)
        sim = q @ xb.T  # (c, b)
        sim[:, ~valid[b0 : b0 + block].to(device)] = -math.inf
        same = q_labels[:, None] == labels[b0 : b0 + block].to(device)[None, :]
        own = q_idx[:, None] == torch.arange(b0, b0 + xb.shape[0], device=device)[None, :]
        for (values, indices), mask, k in zip(running, (same & ~own, ~same), ks):
            if k == 0:
                continue
            val, ind = sim.masked_fill(~mask, -math.inf).topk(min(k, xb.shape[0]), dim=1)
            values.append(val)
            indices.append(ind + b0)
            if len(values) > 1:
                merged = topk_merge(values, indices, min(k, n))
                values[:], indices[:] = [merged[0]], [merged[1]]
    out: list[tuple[Tensor | None, Tensor | None]] = []
    for values, indices in running:
        if not values:
            out.append((None, None))
            continue
        val, order = values[0].sort(dim=1, descending=True, stable=True)  # a merge under k leaves blocks in order
        out.append((val, indices[0].gather(1, order)))
    return out


def mine_distributed(descriptors: Tensor, labels: Tensor, valid: Tensor, *, num_positives: int,
                     num_negatives: int, env: DistEnv, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`mine_neighbours` with the query rows shared out over ranks, then gathered (same result)."""
    n = descriptors.shape[0]
    rows = list(range(env.rank, n, env.world_size))
    pos, neg = mine_neighbours(descriptors, labels, valid=valid, num_positives=num_positives,
                               num_negatives=num_negatives, chunk=chunk, rows=rows, device=env.device)
    if not env.distributed:
        return pos, neg
    dev = env.device if env.device.type == "cuda" else torch.device("cpu")
    order = torch.tensor([i for r in range(env.world_size) for i in range(r, n, env.world_size)])
    full_pos, full_neg = torch.empty_like(pos), torch.empty_like(neg)
    full_pos[order] = all_gather_cat(pos[rows].to(dev), env).cpu()
    full_neg[order] = all_gather_cat(neg[rows].to(dev), env).cpu()
    return full_pos, full_neg


def mining_key(backbone_path: str | os.PathLike, labels: Tensor, mining_cfg: Mapping[str, Any],
               convention: InputConvention) -> str:
    """What a cached mining result depends on: the backbone file (path, size, mtime), the labels (N,), the
    ``mining`` settings and the input convention, as a hex digest."""
    st = os.stat(backbone_path)
    h = hashlib.sha256()
    h.update(f"{MINING_FORMAT}|{os.path.abspath(backbone_path)}|{st.st_size}|{st.st_mtime_ns}|".encode())
    h.update(repr(sorted((k, str(v)) for k, v in mining_cfg.items())).encode())
    h.update(repr(convention.to_dict()).encode())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()


def mine_pairs(*, backbone: Mapping[str, Any], backbone_path: str, depth: int, dim: int, data: LabelledData,
               mining_cfg: Mapping[str, Any], convention: InputConvention, env: DistEnv, out_dir: Path,
               progress: bool = True, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """Positives (N, num_positives) and hard negatives (N, num_negatives) of every training image, from the
    global descriptors of the frozen backbone (an official-layout checkpoint dict read from ``backbone_path``),
    cached in ``<out_dir>/mining.pt``. ``mining_cfg``: image_size, batch_size, num_positives, num_negatives."""
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    key = mining_key(backbone_path, labels, mining_cfg, convention)
    cache = out_dir / MINING_NAME
    saved = torch.load(cache, map_location="cpu", weights_only=True) if cache.is_file() else {}
    # every rank must take the same branch (mining uses collectives), e.g. nodes without a shared file system
    if all(all_gather_objects(saved.get("key") == key, env)):
        log.info("mined pairs loaded from %s", cache)
        return saved["positives"], saved["negatives"]
    # seed=None: the global RNG as before (the checkpoint overwrites every weight anyway)
    model = build_model("cvnet_global", depth=depth, weights=backbone, seed=None, options={"reduction_dim": dim},
                        device=env.device, warn_random=False)
    images = ResizedImages(data.dataset, size=int(mining_cfg["image_size"]), convention=convention)
    desc, valid = extract_descriptors(model, images, batch_size=int(mining_cfg["batch_size"]), device=env.device,
                                      num_workers=num_workers, env=env, progress=progress,
                                      weights_source=os.fspath(backbone_path))
    pos, neg = mine_distributed(desc, labels, valid, num_positives=int(mining_cfg["num_positives"]),
                                num_negatives=int(mining_cfg["num_negatives"]), env=env)
    if env.is_main:
        same = (labels[neg[:, 0].clamp(min=0)] == labels) & (neg[:, 0] >= 0)
        assert not bool(same.any()), "a mined negative shares the query's label"
        atomic_torch_save({"key": key, "positives": pos, "negatives": neg}, cache)
        log.info("mined %d positives and %d hard negatives per image (%d images, %d undecodable)",
                 pos.shape[1], neg.shape[1], len(labels), int((~valid).sum()))
    return pos, neg


# --------------------------------------------------------------------------------------------------------------
# Curriculum
# --------------------------------------------------------------------------------------------------------------


def curriculum_progress(epoch: int, total_epochs: int) -> float:
    """0 at the first epoch, 1 at the last (a single epoch counts as 1: the hardest setting)."""
    if total_epochs <= 1:
        return 1.0
    return min(max(epoch / (total_epochs - 1), 0.0), 1.0)


def negative_pool_size(progress: float, *, start: int, end: int) -> int:
    """How many top-ranked negatives a query draws from: geometric from ``start`` (progress 0) to ``end`` (1)."""
    if start < 1 or end < 1:
        raise InvalidValueError(f"pool sizes must be >= 1, got start={start}, end={end}")
    return max(1, int(round(start * (end / start) ** min(max(progress, 0.0), 1.0))))


def linear_ramp(progress: float, *, start: float, end: float) -> float:
    return start + (end - start) * min(max(progress, 0.0), 1.0)


# --------------------------------------------------------------------------------------------------------------
# The training triplets
# --------------------------------------------------------------------------------------------------------------


class MinedTriplets(Dataset):
    """``(query, positive, negative, label, negative's label)`` for CVNet-Rerank training (normalised tensors).

    ``dataset`` yields ``(uint8 BGR image, label)``; ``positives`` / ``negatives`` come from
    :func:`mine_neighbours`. For item i of epoch e (all draws from ``item_rng(seed, e, i, ...)``):
    the positive is uniform among i's mined positives (an augmented second view of i itself when it has none),
    the negative uniform among the first ``negative_pool_size(progress)`` mined negatives, where progress runs
    0 -> 1 over ``total_epochs``; each of the three images is augmented and then Hide-and-Seek hides patches with
    the probability of the curriculum.
    """

    def __init__(
        self,
        dataset: Dataset,
        positives: Tensor,
        negatives: Tensor,
        *,
        augment: TrainAugment,
        convention: InputConvention,
        total_epochs: int,
        pool_start: int,
        pool_end: int,
        hide_grid: int = 4,
        hide_prob_start: float = 0.0,
        hide_prob_end: float = 0.0,
        seed: int = 0,
    ) -> None:
        if positives.shape[0] != len(dataset) or negatives.shape[0] != len(dataset):
            raise InvalidValueError("positives / negatives must have one row per dataset item")
        self.dataset = dataset
        self.positives = positives.numpy() if isinstance(positives, Tensor) else np.asarray(positives)
        self.negatives = negatives.numpy() if isinstance(negatives, Tensor) else np.asarray(negatives)
        self.augment = augment
        self.convention = convention
        self.total_epochs = int(total_epochs)
        self.pool_start, self.pool_end = int(pool_start), int(pool_end)
        self.hide_grid = int(hide_grid)
        self.hide_prob_start, self.hide_prob_end = float(hide_prob_start), float(hide_prob_end)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def progress(self) -> float:
        return curriculum_progress(self.epoch, self.total_epochs)

    @property
    def pool(self) -> int:
        return negative_pool_size(self.progress, start=self.pool_start, end=self.pool_end)

    @property
    def hide_prob(self) -> float:
        return linear_ramp(self.progress, start=self.hide_prob_start, end=self.hide_prob_end)

    def __len__(self) -> int:
        return len(self.dataset)

    def pick(self, index: int) -> tuple[int, int]:
        """(positive index, negative index) of item ``index`` this epoch; positive == index means a second view."""
        rng = item_rng(self.seed, self.epoch, index, 0)
        cands = self.positives[index][self.positives[index] >= 0]
        pos = int(cands[rng.integers(len(cands))]) if len(cands) else int(index)
        negs = self.negatives[index][self.negatives[index] >= 0][: self.pool]
        if not len(negs):
            raise InvalidValueError(f"item {index} has no mined negative (is there a single landmark?)")
        return pos, int(negs[rng.integers(len(negs))])

    def _view(self, image, index: int, salt: int) -> Tensor:
        x = to_tensor(self.augment(image, item_rng(self.seed, self.epoch, index, salt)), self.convention)
        return hide_and_seek(x, item_rng(self.seed, self.epoch, index, _SALT_HIDE * 10 + salt),
                             grid=self.hide_grid, prob=self.hide_prob)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, int, int]:
        image, label = self.dataset[index]  # first: an undecodable image raises CorruptImageError here
        pos, neg = self.pick(index)
        positive = image if pos == index else self.dataset[pos][0]
        negative, negative_label = self.dataset[neg]
        return (self._view(image, index, _SALT_QUERY), self._view(positive, index, _SALT_POSITIVE),
                self._view(negative, index, _SALT_NEGATIVE), int(label), int(negative_label))
