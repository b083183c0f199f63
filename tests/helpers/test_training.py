"""The training pieces: schedule, resumable data order, RNG capture, checkpoints, corrupt images, mining,
curriculum, Hide-and-Seek and the step loop (crash + resume == uninterrupted, on a toy model)."""
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from datasets.augment import (
    AugmentedPairs,
    TrainAugment,
    hide_and_seek,
    hide_and_seek_mask,
    item_rng,
    random_resized_crop,
)
from datasets.folder import CorruptImageError
from datasets.paired import PairedDataset
from helpers.mining import MinedTriplets, curriculum_progress, linear_ramp, mine_neighbours, negative_pool_size
from helpers.training import (
    METRICS_NAME,
    TRAIN_STATE_NAME,
    CorruptSample,
    CorruptTally,
    DistEnv,
    JsonlLog,
    LoopConfig,
    ResumableDistributedSampler,
    SkipCorrupt,
    TooManyCorruptImages,
    capture_rng_state,
    collate_skip_corrupt,
    load_train_state,
    lr_factor,
    read_jsonl,
    restore_rng_state,
    run_loop,
    save_train_state,
    steps_per_epoch,
)
from models.checkpoint import OFFICIAL_CONVENTION

# ------------------------------------------------------------------------------------------------ schedule


def test_lr_factor_warmup_then_cosine_matches_formula():
    total, warm = 20, 4
    got = [lr_factor(s, total_steps=total, warmup_steps=warm, schedule="cosine", final_ratio=0.1) for s in range(total)]
    for s in range(warm):
        assert got[s] == pytest.approx((s + 1) / warm)
    for s in range(warm, total):
        t = (s - warm) / (total - warm)
        assert got[s] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert lr_factor(total, total_steps=total, schedule="cosine", final_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(7, total_steps=10, schedule="linear") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, total_steps=10, schedule="step")


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


# ------------------------------------------------------------------------------------------------ RNG + state


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = (random.random(), float(np.random.standard_normal()), torch.rand(3))
    save_train_state(tmp_path / "s.pth", {"step": 1, "rng": [state]})
    loaded = load_train_state(tmp_path / "s.pth")
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng_state(loaded["rng"][0])
    got = (random.random(), float(np.random.standard_normal()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_train_state_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="without --resume"):
        load_train_state(tmp_path / "absent.pth")
    torch.save({"step": 3}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_train_state(tmp_path / "other.pth")


def test_jsonl_log_drops_records_past_the_resumed_step(tmp_path):
    log = JsonlLog(tmp_path / "m.jsonl")
    for s in (1, 2, 3, 4):
        log.write({"step": s, "loss": float(s)})
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut by a crash
    JsonlLog(tmp_path / "m.jsonl", resume_step=2)
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 2]


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


# ------------------------------------------------------------------------------------------------ mining


def _reference_neighbours(x, labels, valid, kp, kn):
    n = len(labels)
    sim = x @ x.T
    pos = -np.ones((n, kp), dtype=np.int64)
    neg = -np.ones((n, kn), dtype=np.int64)
    for i in range(n):
        if not valid[i]:
            continue
        same = [j for j in range(n) if j != i and valid[j] and labels[j] == labels[i]]
        other = [j for j in range(n) if valid[j] and labels[j] != labels[i]]
        same.sort(key=lambda j: -sim[i, j])
        other.sort(key=lambda j: -sim[i, j])
        pos[i, :len(same[:kp])] = same[:kp]
        neg[i, :len(other[:kn])] = other[:kn]
    return pos, neg


@pytest.mark.parametrize("chunk", [3, 1000])
def test_mined_neighbours_match_a_brute_force_loop(chunk):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(17, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5, 5, 5, 5, 5])
    valid = torch.ones(17, dtype=torch.bool)
    valid[6] = False
    pos, neg = mine_neighbours(x, labels, valid=valid, num_positives=3, num_negatives=5, chunk=chunk)
    ref_pos, ref_neg = _reference_neighbours(x.numpy(), labels.numpy(), valid.numpy(), 3, 5)
    assert np.array_equal(pos.numpy(), ref_pos) and np.array_equal(neg.numpy(), ref_neg)
    assert pos[9].tolist() == [-1, -1, -1]  # label 3 has a single image
    assert (neg != 6).all() and (pos != 6).all()


def test_curriculum_makes_negatives_harder_and_hides_more():
    pools = [negative_pool_size(curriculum_progress(e, 5), start=100, end=10) for e in range(5)]
    assert pools[0] == 100 and pools[-1] == 10 and pools == sorted(pools, reverse=True)
    assert pools[2] == round(100 * (10 / 100) ** 0.5)
    assert linear_ramp(curriculum_progress(2, 5), start=0.0, end=0.4) == pytest.approx(0.2)
    assert curriculum_progress(0, 1) == 1.0


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


class _Images(Dataset):
    """Item i: a constant image of value 10 * i (so its source is readable), label = i // 3."""

    def __init__(self, n=12):
        self.targets = [i // 3 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return np.full((20, 30, 3), 10 * i, dtype=np.uint8), self.targets[i]


def test_augmented_pairs_are_a_pure_function_of_seed_epoch_index():
    aug = TrainAugment(size=16, brightness=0.3, contrast=0.3, saturation=0.3)
    make = lambda: AugmentedPairs(PairedDataset(_Images(), seed=1), augment=aug,  # noqa: E731
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


def test_mined_triplets_draw_within_the_curriculum_pool():
    data = _Images(12)
    labels = torch.tensor(data.targets)
    x = torch.nn.functional.normalize(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    pos, neg = mine_neighbours(x, labels, num_positives=2, num_negatives=9)
    tri = MinedTriplets(data, pos, neg, augment=TrainAugment(size=8, brightness=0, contrast=0, saturation=0),
                        convention=OFFICIAL_CONVENTION, total_epochs=3, pool_start=9, pool_end=1, seed=0)
    for epoch, pool in ((0, 9), (2, 1)):
        tri.set_epoch(epoch)
        assert tri.pool == pool
        for i in range(12):
            p, n = tri.pick(i)
            assert labels[p] == labels[i] and p != i and labels[n] != labels[i]
            assert n in neg[i, :pool].tolist()
            assert tri.pick(i) == (p, n)
    q, p_img, n_img, label, neg_label = tri[4]
    assert q.shape == p_img.shape == n_img.shape == (3, 8, 8) and label == 1 and neg_label != 1
    assert item_rng(0, 1, 2).random() == item_rng(0, 1, 2).random()


# ------------------------------------------------------------------------------------------------ the loop


class _Toy(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(20, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(20, generator=g)

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class _Crash(RuntimeError):
    pass


def _toy_run(out_dir, *, resume=False, crash_at=None, total=9):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    noise_draws = []

    def step_fn(batch, step):
        if crash_at is not None and step == crash_at:
            raise _Crash
        x, y = batch
        noise = torch.randn(1)  # the global torch RNG is part of the resumed state
        noise_draws.append(float(noise))
        loss = ((model(x).squeeze(1) - y) ** 2).mean() + 0.0 * noise.sum()
        opt.zero_grad()
        (loss + 0.01 * noise.abs().sum() * model.weight.sum()).backward()
        opt.step()
        return {"loss": loss.item()}

    def get_state():
        return {"model": model.state_dict(), "opt": opt.state_dict()}

    def set_state(s):
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])

    cfg = LoopConfig(out_dir=out_dir, batch_size=6, total_steps=total, checkpoint_every=4, log_every=1,
                     num_workers=0, seed=3, progress=False)
    result = run_loop(dataset=_Toy(), env=DistEnv(), cfg=cfg,
                      step_fn=step_fn, get_state=get_state, set_state=set_state, resume=resume)
    return model, result, noise_draws


def test_loop_crash_and_resume_gives_the_uninterrupted_result(tmp_path):
    ref, result, draws = _toy_run(tmp_path / "a")
    assert result.steps == 9 and len(draws) == 9  # 3 steps per epoch, 3 epochs
    with pytest.raises(_Crash):
        _toy_run(tmp_path / "b", crash_at=6)  # checkpoints at 4, crash during step 7 (0-based 6)
    assert load_train_state(tmp_path / "b" / TRAIN_STATE_NAME)["step"] == 4
    resumed, result_b, draws_b = _toy_run(tmp_path / "b", resume=True)
    assert draws_b == draws[4:]
    assert torch.equal(resumed.weight, ref.weight) and torch.equal(resumed.bias, ref.bias)
    steps = [r["step"] for r in read_jsonl(tmp_path / "b" / METRICS_NAME) if "loss" in r]
    assert steps == list(range(1, 10))  # the log holds each step once, crash or not
    losses_a = [r["loss"] for r in read_jsonl(tmp_path / "a" / METRICS_NAME) if "loss" in r]
    losses_b = [r["loss"] for r in read_jsonl(tmp_path / "b" / METRICS_NAME) if "loss" in r]
    assert losses_a == losses_b
    end = [r for r in read_jsonl(tmp_path / "b" / METRICS_NAME) if r.get("event") == "end"]
    assert end and json.dumps(end[-1])
