"""helpers.fewshot: accuracy by a plain loop on separable data, the shots rule, and the built-in landmark views."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.fewshot import few_shot_accuracy, landmark_views


def _clusters(n_classes=5, per_class=6, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, 16, generator=g), dim=1)
    labels = np.repeat(np.arange(n_classes), per_class)
    x = F.normalize(centres[labels] + noise * torch.randn(len(labels), 16, generator=g), dim=1)
    return x, labels


def test_separable_classes_are_all_recognised_from_one_shot():
    x, labels = _clusters()
    r = few_shot_accuracy(x, labels, 1, trials=3)
    assert r.accuracy == 1.0 and r.std == 0.0 and r.queries_per_trial == 25


def test_accuracy_equals_a_nearest_neighbour_loop_with_k_1():
    x, labels = _clusters(noise=1.2, seed=1)  # overlapping classes: some errors
    r = few_shot_accuracy(x, labels, 2, trials=1, seed=4, k=1)
    rng = np.random.default_rng(4)
    index = np.concatenate([rng.choice(np.flatnonzero(labels == c), 2, replace=False) for c in np.unique(labels)])
    query = np.setdiff1d(np.arange(len(labels)), index)
    nearest = index[(x[query] @ x[index].T).argmax(dim=1).numpy()]
    assert r.accuracy == pytest.approx(float((labels[nearest] == labels[query]).mean()))
    assert 0 < r.accuracy < 1


def test_too_few_examples_for_the_shots():
    x, labels = _clusters(per_class=3)
    with pytest.raises(ValueError, match="3 shots need more than 3 examples"):
        few_shot_accuracy(x, labels, 3)


def test_landmark_views_of_the_built_in_test_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data.py synthetic"):
        landmark_views(tmp_path)
    from datasets.synthetic import SyntheticConfig, build_synthetic

    build_synthetic(tmp_path, name="t", config=SyntheticConfig(n_landmarks=3, views_per_landmark=4,
                                                               n_distractors=2, train_landmarks=2,
                                                               train_views_per_landmark=2, image_size=(96, 72)),
                    progress=False)
    paths, labels = landmark_views(tmp_path, "t")
    assert set(labels.tolist()) <= {0, 1, 2} and all(p.is_file() for p in paths)
