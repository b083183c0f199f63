"""bench.finetune_recipe at tiny sizes: the class folder it writes (issue 20's layout, training and test landmarks
apart), the descriptors it scores, and its mAP / recall@1 against plain loops (revisitop's AP)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bench.finetune_recipe import describe, retrieval_figures, write_class_folder
from common.convention import InputConvention
from datasets.augment import resize_to
from datasets.synthetic import load_train_split
from datasets.transforms import read_image, to_tensor
from tests.support.synthetic import draw_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_bench")
    draw_tiny(root / "data", "ft", image_size=(96, 64), train_landmarks=5)  # 5 training landmarks of 4 views
    counts = write_class_folder(root / "data", "ft", root / "folder", train_classes=2, queries=1)
    return root, counts


class _Projection(nn.Module):
    """A fixed random projection of the 4 x 4 average-pooled image, L2-normalised: a stand-in model."""

    def __init__(self) -> None:
        super().__init__()
        self.input_convention = InputConvention("RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.fc = nn.Linear(3 * 16, 6)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        pooled = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return nn.functional.normalize(self.fc(pooled), dim=-1)


def test_the_class_folder_keeps_training_and_test_landmarks_apart(folder):
    root, counts = folder
    paths, labels = load_train_split(root / "data", "ft")
    out = root / "folder"
    assert counts == {"training": 2 * 4, "query": 3 * 1, "gallery": 3 * 3}
    training = {p.parent.name for p in out.glob("training/*/*.jpg")}
    query = {p.parent.name for p in out.glob("test/query/*/*.jpg")}
    gallery = {p.parent.name for p in out.glob("test/gallery/*/*.jpg")}
    assert training == {"lm000", "lm001"} and query == gallery == {"lm002", "lm003", "lm004"}
    for lm in query:  # one query view per held-out landmark, its other views the gallery
        assert len(list(out.glob(f"test/query/{lm}/*.jpg"))) == 1
        assert len(list(out.glob(f"test/gallery/{lm}/*.jpg"))) == 3
    written = sorted(p.name for p in out.rglob("*.jpg"))
    assert written == sorted(p.name for p in paths) and len(set(labels)) == 5  # every image once, copied whole
    first = next(out.glob("training/lm000/*.jpg"))
    assert first.read_bytes() == next(p for p in paths if p.name == first.name).read_bytes()


def test_descriptors_are_the_model_s_on_each_resized_image(folder):
    root, _ = folder
    files = sorted((root / "folder" / "test" / "gallery").glob("*/*.jpg"))
    torch.manual_seed(0)
    model = _Projection().train()
    got = describe(model, files, SIZE, batch=4)  # 9 files: batches of 4, 4 and 1
    assert not model.training and [c[0] for c in model.calls] == [4, 4, 1]
    assert all(c[1:] == (3, SIZE, SIZE) for c in model.calls)
    with torch.no_grad():
        for f, row in zip(files, got):
            one = model(to_tensor(resize_to(read_image(f), SIZE), model.input_convention)[None])[0]
            assert torch.allclose(row, one, atol=1e-6)


def _revisitop_ap(ranked_labels, label):
    """revisitop's AP of one ranking: the mean over positives of the two precisions around each (trapezoid)."""
    positions = [i for i, g in enumerate(ranked_labels) if g == label]
    total = 0.0
    for j, pos in enumerate(positions):
        before = 1.0 if pos == 0 else j / pos
        total += (before + (j + 1) / (pos + 1)) / 2
    return total / len(positions)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_and_recall_at_1_are_the_plain_loops(folder, seed):
    root, _ = folder
    test = root / "folder" / "test"
    torch.manual_seed(seed)
    model = _Projection()
    figures = retrieval_figures(model, test, SIZE)
    qfiles, gfiles = sorted(test.glob("query/*/*.jpg")), sorted(test.glob("gallery/*/*.jpg"))
    xq, xb = describe(model, qfiles, SIZE), describe(model, gfiles, SIZE)
    aps, hits = [], []
    for q, qfile in enumerate(qfiles):
        scores = [float(xb[g] @ xq[q]) for g in range(len(gfiles))]
        order = sorted(range(len(gfiles)), key=lambda g: -scores[g])
        ranked = [gfiles[g].parent.name for g in order]
        aps.append(_revisitop_ap(ranked, qfile.parent.name))
        hits.append(ranked[0] == qfile.parent.name)
    assert figures["queries"] == 3 and figures["gallery"] == 9
    assert figures["mAP"] == pytest.approx(round(100 * np.mean(aps), 2), abs=1e-9)
    assert figures["R@1"] == pytest.approx(round(100 * np.mean(hits), 2), abs=1e-9)
