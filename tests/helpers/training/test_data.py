"""Training data: the resumable distributed orders (shuffled; P classes x K images), corrupt images (dropped,
counted once, capped), the labelled sets, and the augmentations training draws (Hide-and-Seek, random resized
crops, augmented pairs, one view per draw)."""
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from datasets.augment import (
    AugmentedImages,
    AugmentedPairs,
    TrainAugment,
    color_jitter,
    exact_mean,
    hide_and_seek,
    hide_and_seek_mask,
    luma,
    random_resized_crop,
)
from datasets.folder import CorruptImageError
from datasets.paired import PairedDataset
from helpers.training.data import (
    CorruptSample,
    CorruptTally,
    PKSampler,
    ResumableDistributedSampler,
    SkipCorrupt,
    TooManyCorruptImages,
    _contiguous,
    collate_skip_corrupt,
    pinned,
)
from helpers.training.loop import steps_per_epoch
from models.checkpoint import OFFICIAL_CONVENTION

# ------------------------------------------------------------------------------------------------ data order


class _Range(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def test_sampler_resumes_mid_epoch_with_the_same_order():
    s = ResumableDistributedSampler(_Range(23), num_replicas=1, rank=0, seed=5)
    s.set_epoch(3)
    full = list(s)
    s.set_start(10)
    assert list(s) == full[10:] and len(s) == 13
    s.set_epoch(4)
    s.set_start(0)
    assert list(s) != full  # another epoch, another permutation
    with pytest.raises(ValueError):
        s.set_start(99)


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    n, batch = 24, 6
    one = ResumableDistributedSampler(_Range(n), num_replicas=1, rank=0, seed=1)
    one.set_epoch(2)
    order = list(one)
    shards = []
    for r in range(2):
        s = ResumableDistributedSampler(_Range(n), num_replicas=2, rank=r, seed=1)
        s.set_epoch(2)
        shards.append(list(s))
    per_rank = batch // 2
    for step in range(n // batch):
        two = shards[0][step * per_rank:(step + 1) * per_rank] + shards[1][step * per_rank:(step + 1) * per_rank]
        assert sorted(two) == sorted(order[step * batch:(step + 1) * batch])
    assert steps_per_epoch(n, batch, 2) == steps_per_epoch(n, batch, 1) == n // batch


#: 7 classes: sizes 6, 5, 4, 4, 3 (smaller than K = 4), 1 and 2, the items of a class not contiguous
_PK_LABELS = np.random.default_rng(3).permutation(np.repeat(np.arange(7), [6, 5, 4, 4, 3, 1, 2]))


def test_pk_batches_hold_p_classes_of_k_images():
    n, s = len(_PK_LABELS), PKSampler(_PK_LABELS, k=4, batch_size=12, steps_per_epoch=40, seed=2)
    keys = s.epoch_keys(0)
    assert keys.shape == (40, 12) and s.p == 3
    seen = np.zeros(n, dtype=int)
    for batch in keys:
        images = batch % n
        blocks = _PK_LABELS[images].reshape(3, 4)
        assert (blocks == blocks[:, :1]).all() and len(set(blocks[:, 0])) == 3  # P distinct classes, K each
        for block in images.reshape(3, 4):
            size = int((_PK_LABELS == _PK_LABELS[block[0]]).sum())
            # K distinct images of a class that has them; all of a smaller class, then repeats
            assert len(set(block)) == min(size, 4)
        for key in batch:  # the d-th draw of image i is i + d * N
            assert key // n == seen[key % n]
            seen[key % n] += 1
    assert len(set(keys.ravel())) == keys.size  # every draw of the epoch its own key
    assert (seen > 0).all()  # 40 batches reach every image, the single image of class 5 included
    counts = np.bincount(_PK_LABELS[keys[:, ::4].ravel() % n], minlength=7)
    assert counts.min() > 0.5 * counts.mean()  # classes drawn uniformly, whatever their size


def test_pk_order_is_a_pure_function_of_seed_and_epoch_and_resumes():
    a = PKSampler(_PK_LABELS, k=4, batch_size=12, steps_per_epoch=5, seed=2)
    b = PKSampler(_PK_LABELS, k=4, batch_size=12, steps_per_epoch=5, seed=2)
    a.set_epoch(3)
    b.set_epoch(3)
    full = list(a)
    assert full == list(b) and len(full) == len(a) == 60
    b.set_start(24)  # resumed after two steps
    assert list(b) == full[24:] and len(b) == 36
    a.set_epoch(4)
    assert list(a) != full
    other = PKSampler(_PK_LABELS, k=4, batch_size=12, steps_per_epoch=5, seed=3)
    other.set_epoch(3)
    assert list(other) != full
    with pytest.raises(ValueError, match="start"):
        b.set_start(61)


def test_pk_ranks_take_contiguous_slices_of_the_global_batch():
    one = PKSampler(_PK_LABELS, k=4, batch_size=12, steps_per_epoch=5, seed=1)
    one.set_epoch(1)
    order = list(one)
    shards = []
    for rank in range(2):
        s = PKSampler(_PK_LABELS, k=4, batch_size=12, steps_per_epoch=5, num_replicas=2, rank=rank, seed=1)
        s.set_epoch(1)
        shards.append(list(s))
    joined = [key for step in range(5) for shard in shards for key in shard[6 * step:6 * step + 6]]
    assert joined == order


def test_pk_sampler_refuses_what_cannot_make_a_batch():
    with pytest.raises(ValueError, match="needs 8 classes"):
        PKSampler(_PK_LABELS, k=4, batch_size=32, steps_per_epoch=1)
    with pytest.raises(ValueError, match="data.sampler.k"):
        PKSampler(_PK_LABELS, k=5, batch_size=12, steps_per_epoch=1)
    with pytest.raises(ValueError, match="ranks"):
        PKSampler(_PK_LABELS, k=4, batch_size=12, steps_per_epoch=1, num_replicas=5)


# ------------------------------------------------------------------------------------------------ corrupt images


class _Flaky(Dataset):
    def __init__(self, bad):
        self.bad = set(bad)

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i in self.bad:
            raise CorruptImageError(f"/x/{i}.jpg", "truncated")
        return torch.full((2,), float(i)), i


def test_corrupt_items_are_dropped_from_the_batch_and_counted_once():
    data = SkipCorrupt(_Flaky({1, 4}))
    batch = collate_skip_corrupt([data[i] for i in range(6)])
    assert batch.size == 4 and batch.data[1].tolist() == [0, 2, 3, 5]
    assert [c.path for c in batch.corrupt] == ["/x/1.jpg", "/x/4.jpg"]
    tally = CorruptTally(max_corrupt=2)
    assert tally.add(batch.corrupt) == ["/x/1.jpg", "/x/4.jpg"]
    assert tally.add([CorruptSample(1, "/x/1.jpg", "again")]) == []  # the same file again: not a new one
    assert len(tally.paths) == 2 and tally.skipped == 3
    with pytest.raises(TooManyCorruptImages, match="max_corrupt=2"):
        tally.add([CorruptSample(0, "/x/0.jpg", "bad")])
    empty = collate_skip_corrupt([data[1]])
    assert empty.data is None and empty.size == 0


# ------------------------------------------------------------------------------------------------ augmentation


def test_hide_and_seek_hides_whole_grid_cells_with_the_given_probability():
    rng = np.random.default_rng(0)
    masks = np.stack([hide_and_seek_mask(12, 16, rng, grid=4, prob=0.3) for _ in range(2000)])
    cells = masks.reshape(-1, 4, 3, 4, 4)  # (draws, grid rows, 3 px, grid cols, 4 px)
    assert (cells.all(axis=(2, 4)) | ~cells.any(axis=(2, 4))).all()  # a cell is hidden entirely or not at all
    assert abs(masks.mean() - 0.3) < 0.01
    assert not hide_and_seek_mask(5, 5, rng, grid=2, prob=0.0).any()
    assert hide_and_seek_mask(5, 5, rng, grid=2, prob=1.0).all()
    x = torch.randn(3, 12, 16)
    y = hide_and_seek(x, np.random.default_rng(1), grid=4, prob=0.5, fill=0.0)
    m = torch.from_numpy(hide_and_seek_mask(12, 16, np.random.default_rng(1), grid=4, prob=0.5))
    assert torch.equal(y[:, m], torch.zeros_like(y[:, m])) and torch.equal(y[:, ~m], x[:, ~m])


def test_random_resized_crop_size_and_determinism():
    img = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    a = random_resized_crop(img, np.random.default_rng(7), size=24)
    b = random_resized_crop(img, np.random.default_rng(7), size=24)
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert random_resized_crop(img, np.random.default_rng(7), size=(10, 20)).shape == (10, 20, 3)


def test_luma_rounds_each_product_and_sum_in_a_fixed_order():
    # the colour jitter's grey must not go through BLAS (whose kernel, and so its rounding, depends on the CPU):
    # each pixel is (b * 0.114 + g * 0.587) + r * 0.299 with every step rounded to float32
    x = np.random.default_rng(0).uniform(0, 300, (17, 23, 3)).astype(np.float32)
    wb, wg, wr = np.float32(0.114), np.float32(0.587), np.float32(0.299)
    want = np.array([[np.float32(np.float32(np.float32(p[0] * wb) + np.float32(p[1] * wg)) + np.float32(p[2] * wr))
                      for p in row] for row in x], dtype=np.float32)
    assert luma(x).dtype == np.float32 and np.array_equal(luma(x), want)


def test_exact_mean_does_not_depend_on_the_summation_order():
    # numpy's float32 summation order changed between releases; the jitter's mean must not follow it
    rng = np.random.default_rng(1)
    x = (rng.uniform(0, 255, 9216) * rng.choice([1.0, 1e-4], 9216)).astype(np.float32)
    orders = [x, x[::-1], x[rng.permutation(x.size)], np.sort(x)]
    naive = {float(np.add.accumulate(v)[-1]) for v in orders}  # a float32 running sum does depend on the order
    assert len(naive) > 1
    assert len({exact_mean(v) for v in orders}) == 1
    assert exact_mean(x).dtype == np.float32
    assert abs(float(exact_mean(x)) - x.astype(np.float64).mean()) <= np.spacing(exact_mean(x))
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    a = color_jitter(img, np.random.default_rng(3), brightness=0.2, contrast=0.2, saturation=0.1)
    assert np.array_equal(a, color_jitter(img, np.random.default_rng(3), brightness=0.2, contrast=0.2,
                                          saturation=0.1))
    assert a.dtype == np.uint8 and a.shape == img.shape and not np.array_equal(a, img)


def test_augmented_pairs_are_a_pure_function_of_seed_epoch_index(constant_images):
    aug = TrainAugment(size=16, brightness=0.3, contrast=0.3, saturation=0.3)
    make = lambda: AugmentedPairs(PairedDataset(constant_images(), seed=1), augment=aug,  # noqa: E731
                                  convention=OFFICIAL_CONVENTION, seed=1)
    a, b = make(), make()
    a.set_epoch(2)
    b.set_epoch(2)
    for i in (0, 5, 11):
        x, y = a[i], b[i]
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] == i // 3
        assert x[0].shape == (3, 16, 16)
    b.set_epoch(3)
    assert any(not torch.equal(a[i][0], b[i][0]) for i in range(12))


def test_augmented_images_make_every_draw_another_view(constant_images):
    aug = TrainAugment(size=16, scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4)
    items = AugmentedImages(constant_images(), augment=aug, convention=OFFICIAL_CONVENTION, seed=1)
    again = AugmentedImages(constant_images(), augment=aug, convention=OFFICIAL_CONVENTION, seed=1)
    items.set_epoch(2)
    again.set_epoch(2)
    first, second = items[5], items[5 + 12]  # draws 0 and 1 of item 5
    assert first[0].shape == (3, 16, 16) and first[1] == second[1] == 5 // 3
    assert torch.equal(first[0], again[5][0]) and not torch.equal(first[0], second[0])
    again.set_epoch(3)
    assert not torch.equal(first[0], again[5][0])


def test_labels_become_contiguous_class_indices(constant_images):
    data = _contiguous(constant_images(6), [7, 7, 3, 9, 3, 7], "toy")
    assert data.num_classes == 3 and data.labels.tolist() == [1, 1, 0, 2, 0, 1]
    assert [data.dataset[i][1] for i in range(6)] == [1, 1, 0, 2, 0, 1]
    same = _contiguous(constant_images(3), [0, 1, 1], "toy")
    assert isinstance(same.dataset, constant_images) and same.num_classes == 2  # already contiguous: not wrapped


# ------------------------------------------------------------------------------------------------ pinned batches


def test_a_batch_pins_every_tensor_it_holds(monkeypatch):
    """What DataLoader(pin_memory=True) calls on a custom batch: every tensor pinned (tensor.pin_memory, recorded
    here: pinning needs a GPU), the corrupt items and the size kept."""
    calls = []

    def pin(self):
        calls.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    images, labels = torch.rand(2, 3, 4, 4), torch.tensor([1, 2])
    lost = [CorruptSample(5, "x.jpg", "truncated")]
    batch = collate_skip_corrupt([(images[0], labels[0]), lost[0], (images[1], labels[1])])
    out = batch.pin_memory()
    assert out.corrupt == lost and out.size == 2 and len(calls) == 2
    assert torch.equal(out.data[0], images) and torch.equal(out.data[1], labels)
    assert pinned({"a": (torch.zeros(1), [torch.ones(2)]), "b": "text"})["b"] == "text" and len(calls) == 4
    assert collate_skip_corrupt([lost[0]]).pin_memory().data is None  # an all-corrupt batch has nothing to pin


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_pinning_data_loader_hands_out_pinned_batches():
    from torch.utils.data import DataLoader

    class Pairs(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3, 8, 8), float(i)), i

    loader = DataLoader(SkipCorrupt(Pairs()), batch_size=2, collate_fn=collate_skip_corrupt, pin_memory=True)
    batch = next(iter(loader))
    assert all(t.is_pinned() for t in batch.data) and batch.size == 2
