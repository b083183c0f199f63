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


def test_small_classes_are_left_out_when_asked():
    x, labels = _clusters(n_classes=4, per_class=4)
    keep = np.flatnonzero(labels != 3)[:-2].tolist() + np.flatnonzero(labels == 3).tolist()
    x, labels = x[keep], labels[keep]  # class 2 now has 2 examples
    with pytest.raises(ValueError, match="classes \\[2\\]"):
        few_shot_accuracy(x, labels, 2)
    r = few_shot_accuracy(x, labels, 2, trials=2, skip_small=True)
    assert r.classes == 3 and r.queries_per_trial == 3 * 2 and r.accuracy == 1.0
    with pytest.raises(ValueError, match="more than 4 examples"):  # no class left: refused, not an empty mean
        few_shot_accuracy(x, labels, 4, skip_small=True)


def test_class_folder_views(tmp_path):
    from helpers.fewshot import class_folder_views
    from tests.support.class_folder import make_class_folder

    root = make_class_folder(tmp_path / "f")
    paths, labels, classes = class_folder_views(root / "gallery")
    assert classes == ["eiffel", "louvre", "pisa"] and labels.tolist() == [0, 0, 0, 1, 2]  # loose.jpg: no class
    assert paths[3] == root / "gallery" / "louvre" / "c.jpg"
    with pytest.raises(FileNotFoundError, match="expected .*<class>/<images>"):
        class_folder_views(tmp_path / "nowhere")
