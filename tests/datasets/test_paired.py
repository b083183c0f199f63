"""PairedDataset: positives share the label, draws are a pure function of (seed, epoch, index), caches by content."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datasets.paired import (
    SPOT_CHECKS,
    PairedDataset,
    build_label_index,
    labels_key,
    random_flip_and_crop,
)

LABELS = [3, 5, 3, 9, 5, 3, 7, 5, 3, 11]  # classes 7 and 11 (and 9) have a single item


class IndexImages(Dataset):
    """Item i is a (1, 4, 6) tensor whose pixel [0, 0, 0] equals i, so a positive tells which item it was."""

    def __init__(self, labels, *, targets=True):
        self._labels = list(labels)
        if targets:
            self.targets = list(labels)
        self.reads = 0

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        self.reads += 1
        image = torch.arange(24, dtype=torch.float32).view(1, 4, 6) / 100.0
        image[0, 0, 0] = float(i)
        return image, self._labels[i]


def _idx(image):
    return int(round(float(image[0, 0, 0])))


def test_label_index_groups_indices_by_label():
    index = build_label_index(LABELS)
    assert index.classes.tolist() == [3, 5, 7, 9, 11]
    for c, label in enumerate(index.classes):
        assert index.members(c).tolist() == [i for i, y in enumerate(LABELS) if y == label]
        assert all(index.class_of[i] == c for i in index.members(c))


def test_positives_share_label_and_differ_in_index():
    ds = PairedDataset(IndexImages(LABELS), seed=3)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, positive, label = ds[i]
            assert _idx(image) == i and label == LABELS[i]
            if LABELS.count(LABELS[i]) > 1:
                j = _idx(positive)
                assert j != i and LABELS[j] == LABELS[i]
                assert ds.positive_index(i) == j
            else:
                assert ds.positive_index(i) == i


def test_every_other_member_is_drawn_over_epochs():
    ds = PairedDataset(IndexImages(LABELS), seed=0)
    seen = set()
    for epoch in range(60):
        ds.set_epoch(epoch)
        seen.add(ds.positive_index(0))
    assert seen == {2, 5, 8}  # the other members of class 3


def test_draws_depend_only_on_seed_epoch_index():
    a = PairedDataset(IndexImages(LABELS), seed=1)
    b = PairedDataset(IndexImages(LABELS), seed=1)
    forward = [a.positive_index(i) for i in range(len(a))]
    backward = [b.positive_index(i) for i in reversed(range(len(b)))][::-1]
    assert forward == backward
    per_epoch = []
    for epoch in range(5):
        a.set_epoch(epoch)
        per_epoch.append(tuple(a.positive_index(i) for i in range(len(a))))
    assert len(set(per_epoch)) > 1, "different epochs must give different pairs"
    per_seed = {tuple(PairedDataset(IndexImages(LABELS), seed=s).positive_index(i) for i in range(10))
                for s in range(5)}
    assert len(per_seed) > 1, "different seeds must give different pairs"


def _triples(num_workers, epoch):
    ds = PairedDataset(IndexImages(LABELS), seed=7)
    ds.set_epoch(epoch)
    kwargs = dict(batch_size=3, shuffle=False, num_workers=num_workers)
    if num_workers:
        kwargs["multiprocessing_context"] = "fork"
    return [(im, pos, y) for im, pos, y in DataLoader(ds, **kwargs)]


def test_dataloader_worker_count_does_not_change_the_triples():
    for epoch in (0, 1):
        serial, parallel = _triples(0, epoch), _triples(2, epoch)
        assert len(serial) == len(parallel) == 4
        for (a_im, a_pos, a_y), (b_im, b_pos, b_y) in zip(serial, parallel):
            assert torch.equal(a_im, b_im) and torch.equal(a_pos, b_pos) and torch.equal(a_y, b_y)


def test_single_item_classes_get_a_second_view_and_are_logged_once(caplog):
    calls = []

    def view(image, rng):
        calls.append(_idx(image))
        return image + 100.0 + float(rng.integers(10))

    with caplog.at_level(logging.INFO, logger="datasets.paired"):
        ds = PairedDataset(IndexImages(LABELS), seed=2, single_view_transform=view)
    assert ds.num_single_item_classes == 3
    assert sum("single item" in r.getMessage() for r in caplog.records) == 1
    image, positive, label = ds[6]  # class 7, alone
    assert label == 7 and calls == [6]
    offset = positive - image
    assert torch.allclose(offset, offset.flatten()[0].expand_as(offset)) and offset.flatten()[0] >= 100
    again = ds[6][1]
    assert torch.equal(again, positive), "the second view is seeded by (seed, epoch, index)"
    ds[0]
    assert calls == [6, 6], "multi-item classes never go through the single-view transform"


def test_default_second_view_is_seeded_and_keeps_size_and_type():
    rng_img = np.random.default_rng(0)
    arr = rng_img.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    tensor = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    pil = Image.fromarray(arr)
    for image in (arr, tensor, pil):
        one = random_flip_and_crop(image, np.random.default_rng(5))
        two = random_flip_and_crop(image, np.random.default_rng(5))
        other = random_flip_and_crop(image, np.random.default_rng(6))
        assert type(one) is type(image)
        as_np = [np.asarray(x if not isinstance(x, torch.Tensor) else x.permute(1, 2, 0)) for x in (one, two, other)]
        assert as_np[0].shape == (20, 30, 3) and as_np[0].dtype == np.uint8
        assert np.array_equal(as_np[0], as_np[1])
        assert not np.array_equal(as_np[0], as_np[2])
    # with the crop disabled the view is the image or its mirror, each for some seed
    full = [random_flip_and_crop(arr, np.random.default_rng(s), min_area=1.0, ratio=(30 / 20, 30 / 20))
            for s in range(8)]
    kinds = {("same" if np.array_equal(v, arr) else "mirror" if np.array_equal(v, arr[:, ::-1]) else "other")
             for v in full}
    assert kinds == {"same", "mirror"}
    with pytest.raises(TypeError, match="second view"):
        random_flip_and_crop([1, 2, 3], np.random.default_rng(0))


def test_label_sources_in_order_of_preference():
    base = IndexImages(LABELS)
    override = [0] * 5 + [1] * 5
    ds = PairedDataset(base, labels=override)
    assert base.reads == 0, "labels given: the dataset is not read to find them"
    assert ds.labels.tolist() == override and ds[0][2] == 0
    no_targets = IndexImages(LABELS, targets=False)
    ds = PairedDataset(no_targets)
    assert ds.labels.tolist() == LABELS and no_targets.reads == len(LABELS)
    with pytest.raises(ValueError, match="9 entries"):
        PairedDataset(base, labels=LABELS[:-1])
    with pytest.raises(TypeError, match="integers"):
        PairedDataset(base, labels=[0.5] * len(LABELS))


def test_cache_round_trip_skips_reading_the_dataset(tmp_path):
    cache = tmp_path / "index.npz"
    first = IndexImages(LABELS, targets=False)
    PairedDataset(first, cache_path=cache)
    assert cache.is_file() and first.reads == len(LABELS)
    second = IndexImages(LABELS, targets=False)
    ds = PairedDataset(second, cache_path=cache)
    assert ds.labels.tolist() == LABELS
    assert second.reads == SPOT_CHECKS, "a valid cache is only spot-checked, not rebuilt"
    with np.load(cache) as data:
        assert str(data["key"]) == labels_key(np.array(LABELS), len(LABELS))


def test_cache_is_keyed_by_content_and_rebuilt_when_a_label_changes(tmp_path):
    cache = tmp_path / "index.npz"
    PairedDataset(IndexImages(LABELS), cache_path=cache)
    changed = list(LABELS)
    changed[1] = 3  # same length, same dataset class, one label different
    ds = PairedDataset(IndexImages(changed), cache_path=cache)
    assert ds.labels.tolist() == changed
    assert LABELS.count(5) > changed.count(5)
    with np.load(cache) as data:
        assert str(data["key"]) == labels_key(np.array(changed), len(changed))
    assert labels_key(np.array(LABELS), 10) != labels_key(np.array(changed), 10)
    # a stale cache for an unlabelled dataset (same length, other labels) is caught by the spot check
    relabelled = IndexImages([y + 100 for y in LABELS], targets=False)
    ds = PairedDataset(relabelled, cache_path=cache)
    assert ds.labels.tolist() == [y + 100 for y in LABELS]
    # an unreadable cache is replaced
    cache.write_bytes(b"not an npz")
    ds = PairedDataset(IndexImages(LABELS, targets=False), cache_path=cache)
    assert ds.labels.tolist() == LABELS
    with np.load(cache) as data:
        assert str(data["key"]) == labels_key(np.array(LABELS), len(LABELS))


def test_bad_epoch_and_index():
    ds = PairedDataset(IndexImages(LABELS))
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)
    with pytest.raises(IndexError):
        ds[len(LABELS)]
    assert _idx(ds[-1][0]) == len(LABELS) - 1
