"""Few-shot classification by retrieval on the built-in synthetic landmarks or any class folder: k labelled
images per class form the index of a :class:`models.ClassificationByRetrieval`, the remaining images are
classified, top-1 accuracy is averaged over seeded draws of the k images.

The built-in landmarks are those of the built-in *test* split (``<root>/<name>/views.csv``), which the built-in
training run never sees: its query images and the database views labelled easy or hard (junk views show too little
of the landmark, distractors none). A class folder (:func:`class_folder_views`) is ``PATH/<class>/<images>``.
"""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from common.constants import CVNET_TEST_SCALES
from common.errors import InvalidValueError, MissingFileError
from datasets.folder import ImageFiles, class_images
from helpers.extraction import extract_global_descriptors
from models.classification import ClassificationByRetrieval

log = logging.getLogger(__name__)


def landmark_views(root: str | os.PathLike, name: str = "synth") -> tuple[list[Path], np.ndarray]:
    """(image paths, landmark labels) of the query images and the easy and hard database views of the built-in
    test split (6 to 9 per landmark with the default configuration)."""
    folder = Path(root) / name
    table = folder / "views.csv"
    if not table.is_file():
        raise MissingFileError(f"{table} not found: build the built-in benchmark first "
                               f"(python prepare_data.py synthetic --root {root} --name {name})")
    with open(table, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["landmark"]) >= 0
                and (r["role"] == "query" or (r["role"] == "database" and r["label"] in ("easy", "hard")))]
    if not rows:
        raise InvalidValueError(f"{table} lists no easy or hard database view of a landmark")
    return [folder / "jpg" / f"{r['image']}.jpg" for r in rows], np.asarray([int(r["landmark"]) for r in rows])


def class_folder_views(folder: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, class labels (n,) indexing the classes, class names) of the images of a class folder
    ``<folder>/<class>/...`` (datasets.folder.class_images; images directly in ``folder`` have no class and are
    left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"class folder {folder} not found (expected {folder}/<class>/<images>)")
    images = [(rel, cls) for rel, cls in class_images(folder) if cls is not None]
    if not images:
        raise MissingFileError(f"no images in the class sub-folders of {folder} (expected {folder}/<class>/<images>)")
    classes = sorted({cls for _, cls in images})
    index = {c: i for i, c in enumerate(classes)}
    return [folder / rel for rel, _ in images], np.asarray([index[cls] for _, cls in images]), classes


def describe_images(model: nn.Module, paths: Sequence[os.PathLike], *, device: torch.device | str = "cpu",
                    batch_size: int = 8, progress: bool = True) -> Tensor:
    """Global descriptors (n, d) of image files through the extraction engine (CVNet-Global at its three test
    scales, other models at scale 1); the files are read as the engine goes."""
    scales = CVNET_TEST_SCALES if type(model).__name__ == "CVNetGlobal" else (1.0,)
    dataset = ImageFiles(paths, root=".", name="few-shot", convention=model.input_convention, scales=scales)
    return extract_global_descriptors(model=model, dataset=dataset, device=device, batch_size=batch_size,
                                      progress=progress, desc="few-shot")


@dataclass(frozen=True)
class FewShotResult:
    shots: int
    accuracy: float  # mean top-1 over trials, in [0, 1]
    std: float
    trials: int
    queries_per_trial: float
    classes: int = 0  # classes drawn from (those with more than ``shots`` examples)


def shot_classes(labels: Sequence[int] | np.ndarray, shots: int, *, skip_small: bool = False) -> np.ndarray:
    """The classes ``shots``-shot classification draws from: every class, each of which needs more than ``shots``
    examples; with ``skip_small`` the classes with fewer are left out instead of refused, as long as one remains."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = {c: int((labels == c).sum()) for c in classes}
    short = [c for c, n in counts.items() if n <= shots]
    if short and (not skip_small or len(short) == len(classes)):
        raise InvalidValueError(f"{shots} shots need more than {shots} examples per class; classes "
                                f"{np.asarray(short[:5]).tolist()} have {[counts[c] for c in short[:5]]}")
    return np.setdiff1d(classes, short)


def few_shot_accuracy(embeddings: Tensor, labels: Sequence[int] | np.ndarray, shots: int, *, trials: int = 10,
                      seed: int = 0, k: int = 5, aggregation: str = "max", skip_small: bool = False) -> FewShotResult:
    """Top-1 accuracy of classification by retrieval with ``shots`` indexed examples per class.

    Per trial, ``shots`` examples of every class (:func:`shot_classes`) are drawn (seeded) into the index and all
    other examples of those classes are classified. Returns the mean and standard deviation over trials.
    """
    labels = np.asarray(labels)
    classes = shot_classes(labels, shots, skip_small=skip_small)
    if len(classes) < len(np.unique(labels)):
        log.info("%d shots: %d of %d classes have at most %d examples and are left out", shots,
                 len(np.unique(labels)) - len(classes), len(np.unique(labels)), shots)
        keep = np.flatnonzero(np.isin(labels, classes))
        embeddings, labels = embeddings[torch.from_numpy(keep)], labels[keep]
    rng = np.random.default_rng(seed)
    accs, n_queries = [], []
    for _ in range(trials):
        index = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in classes])
        query = np.setdiff1d(np.arange(len(labels)), index)
        cbr = ClassificationByRetrieval(embedding_dim=embeddings.shape[1], k=k, aggregation=aggregation)
        cbr.add_index_data(embeddings[index], labels[index].tolist())
        predicted = np.asarray(cbr.predict(embeddings[query]))
        accs.append(float((predicted == labels[query]).mean()))
        n_queries.append(len(query))
    return FewShotResult(shots=shots, accuracy=float(np.mean(accs)), std=float(np.std(accs)), trials=trials,
                         queries_per_trial=float(np.mean(n_queries)), classes=len(classes))
