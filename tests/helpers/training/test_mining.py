"""Mining: neighbours against a brute-force loop, the curriculum, the training triplets, and the cached
``mine_pairs`` (a second call reads the cache; another backbone file misses it)."""
import numpy as np
import pytest
import torch

from common.convention import OFFICIAL_CONVENTION
from datasets.augment import TrainAugment, item_rng
from helpers.distributed import DistEnv
from helpers.training.data import LabelledData
from helpers.training.mining import (
    MINING_NAME,
    MinedTriplets,
    curriculum_progress,
    linear_ramp,
    mine_neighbours,
    mine_pairs,
    mining_tiles,
    negative_pool_size,
)
from models.checkpoint import save_official_checkpoint
from models.cvnet import CVNetGlobal

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


@pytest.mark.parametrize("chunk,block", [(3, None), (1000, None), (3, 4), (2, 1), (1000, 5)])
def test_mined_neighbours_match_a_brute_force_loop(chunk, block):
    """Tiles of ``chunk`` queries x ``block`` database rows, each tile's top-k merged: the same neighbours as one
    sort of every row (block=1: merges that hold fewer than k, left for the final sort)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(17, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5, 5, 5, 5, 5])
    valid = torch.ones(17, dtype=torch.bool)
    valid[6] = False
    pos, neg = mine_neighbours(x, labels, valid=valid, num_positives=3, num_negatives=5, chunk=chunk, block=block)
    ref_pos, ref_neg = _reference_neighbours(x.numpy(), labels.numpy(), valid.numpy(), 3, 5)
    assert np.array_equal(pos.numpy(), ref_pos) and np.array_equal(neg.numpy(), ref_neg)
    assert pos[9].tolist() == [-1, -1, -1]  # label 3 has a single image
    assert (neg != 6).all() and (pos != 6).all()


def test_mining_tiles_hold_the_memory_budget_with_large_gemms():
    """GLDv2's 1.58M images, 1 GB: 65536 database rows by 1024 queries a tile (16 bytes an entry), instead of
    the 42 queries against all 1.58M rows a step that made 40k small steps."""
    block, chunk = mining_tiles(1_580_000, 1 << 30)
    assert (block, chunk) == (65536, 1024) and 16 * block * chunk <= 1 << 30
    assert mining_tiles(17, 1 << 30) == (17, 4096) and mining_tiles(17, 1 << 30, block=4, chunk=3) == (4, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fits", [True, False])
def test_mining_on_a_gpu_finds_the_cpu_s_neighbours(fits, monkeypatch):
    """On the GPU with the descriptors copied there, and streamed from host memory when they do not fit."""
    import helpers.training.mining as mining

    monkeypatch.setattr(mining, "fits_on_device", lambda nbytes, device: fits)
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    labels = torch.randint(0, 20, (300,), generator=g)
    kw = {"num_positives": 4, "num_negatives": 10, "chunk": 64, "block": 100}
    cpu = mine_neighbours(x, labels, **kw)
    gpu = mine_neighbours(x, labels, device="cuda", **kw)
    assert torch.equal(gpu[0], cpu[0]) and torch.equal(gpu[1], cpu[1])


def test_curriculum_makes_negatives_harder_and_hides_more():
    pools = [negative_pool_size(curriculum_progress(e, 5), start=100, end=10) for e in range(5)]
    assert pools[0] == 100 and pools[-1] == 10 and pools == sorted(pools, reverse=True)
    assert pools[2] == round(100 * (10 / 100) ** 0.5)
    assert linear_ramp(curriculum_progress(2, 5), start=0.0, end=0.4) == pytest.approx(0.2)
    assert curriculum_progress(0, 1) == 1.0


def test_mined_triplets_draw_within_the_curriculum_pool(constant_images):
    data = constant_images(12)
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


class _ColouredImages(torch.utils.data.Dataset):
    """Item i: a (32, 32) uint8 BGR image whose colour depends on its label i // 4 (plus a little per item)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        colour = np.array([60 * (i // 4), 200 - 60 * (i // 4), 30 + 5 * i], dtype=np.uint8)
        return np.broadcast_to(colour, (32, 32, 3)).copy(), i // 4


def test_mine_pairs_mines_once_then_reads_its_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    backbone = CVNetGlobal(50, 16)
    path = tmp_path / "backbone.pyth"
    save_official_checkpoint(backbone, path)
    ckpt = torch.load(path, weights_only=True)
    labels = np.arange(12) // 4
    data = LabelledData(_ColouredImages(), labels, 3, "toy")
    args = dict(backbone=ckpt, backbone_path=str(path), depth=50, dim=16, data=data, convention=OFFICIAL_CONVENTION,
                env=DistEnv(), out_dir=tmp_path, progress=False,
                mining_cfg={"image_size": 32, "batch_size": 6, "num_positives": 3, "num_negatives": 4})
    pos, neg = mine_pairs(**args)
    assert pos.shape == (12, 3) and neg.shape == (12, 4)
    t = torch.as_tensor(labels)
    assert (t[pos] == t[:, None]).all() and (pos != torch.arange(12)[:, None]).all()  # 3 other views each
    assert (t[neg] != t[:, None]).all()
    assert (tmp_path / MINING_NAME).is_file()

    def no_model(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr("helpers.training.mining.build_model", no_model)
    pos2, neg2 = mine_pairs(**args)
    assert torch.equal(pos, pos2) and torch.equal(neg, neg2)
    with pytest.raises(AssertionError, match="cache"):  # other settings: another key, mined afresh
        mine_pairs(**{**args, "mining_cfg": {**args["mining_cfg"], "num_negatives": 5}})


def test_nan_descriptors_stop_mining_naming_the_weights():
    from helpers.extraction import NonFiniteDescriptorError
    from helpers.training.mining import extract_descriptors

    torch.manual_seed(0)
    model = CVNetGlobal(50).eval()
    with torch.no_grad():
        model.head.fc.weight[0, 0] = float("nan")
    items = [(torch.randn(3, 64, 64), 0), (torch.randn(3, 64, 64), 1)]
    with pytest.raises(NonFiniteDescriptorError, match=r"2 image\(s\).*weights: backbone\.pyth"):
        extract_descriptors(model, items, batch_size=2, progress=False, weights_source="backbone.pyth")
