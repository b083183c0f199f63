"""helpers.extraction: multi-scale aggregation, size buckets, pieces, the feature cache as the engine feeds it,
re-ranking maps, and images held in memory (the retrieval API's) through the same engine."""
import copy
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from common.constants import CVNET_TEST_SCALES
from datasets.revisited import RevisitedDataset
from helpers.cache_keys import dataset_signature, feature_cache_key, state_dict_hash
from helpers.extraction import ImageArrays, ReducedMapStore, bucket_batches, extract_global_descriptors
from helpers.feature_cache import cached_global_descriptors
from models import OFFICIAL_CONVENTION, CVNetGlobal, CVNetRerank, SuperGlobal
from models.functional import aggregate_scales
from models.inference import fast_runner
from tests.support.spies import recording
from tests.support.tiny_sets import DB_SIZES, TinyNet, write_layout

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def layout(tmp_path):
    return write_layout(tmp_path / "data")


def test_aggregate_scales_is_l2_mean_of_l2():
    g = torch.Generator().manual_seed(0)
    descs = [torch.randn(4, 16, generator=g) * (s + 1) for s in range(3)]
    expected = torch.stack([d / d.norm(dim=1, keepdim=True) for d in descs]).mean(0)
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(aggregate_scales(descs), expected)
    one = F.normalize(descs[0], dim=1)
    torch.testing.assert_close(aggregate_scales([one]), one)  # SuperGlobal's single scale passes through


def test_bucket_batches_groups_identical_sizes():
    items = [(i, [torch.zeros(3, h, w), torch.zeros(3, 2 * h, 2 * w)]) for i, (h, w) in enumerate(DB_SIZES * 3)]
    batches = list(bucket_batches(iter(items), batch_size=2, max_pending=3))
    seen = [i for idx, _ in batches for i in idx]
    assert sorted(seen) == list(range(len(items)))
    for idx, per_scale in batches:
        assert len(idx) <= 2 and len(per_scale) == 2
        assert per_scale[0].shape[0] == len(idx)
        assert all(tuple(items[i][1][0].shape) == tuple(per_scale[0].shape[1:]) for i in idx)
    assert any(len(idx) == 2 for idx, _ in batches)


def test_cvnet_multiscale_descriptor_matches_direct_computation(layout):
    torch.manual_seed(0)
    model = CVNetGlobal(50).eval()
    ds = RevisitedDataset(layout, "roxford5k", "db", scales=CVNET_TEST_SCALES)
    subset = [0, 2, 5]  # 0 and 2 share a size (one batch of 2), 5 is alone
    got = extract_global_descriptors(model=model, dataset=ds, indices=subset, batch_size=2, progress=False)

    mean = np.array(OFFICIAL_CONVENTION.mean, dtype=np.float32)
    std = np.array(OFFICIAL_CONVENTION.std, dtype=np.float32)
    for row, i in enumerate(subset):
        img = cv2.imread(ds.image_paths[i], cv2.IMREAD_COLOR)  # BGR uint8, as the release reads it
        per_scale = []
        for s in CVNET_TEST_SCALES:
            interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
            im = img if s == 1 else cv2.resize(img, None, fx=s, fy=s, interpolation=interp)
            x = torch.from_numpy(((im.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1).copy())
            with torch.no_grad():
                d = model(x[None])[0]
            per_scale.append(d / d.norm())
        ref = torch.stack(per_scale).mean(0)
        torch.testing.assert_close(got[row], ref / ref.norm(), atol=2e-5, rtol=1e-4)


def test_feature_cache_hit_miss_and_weight_invalidation(layout, tmp_path):
    torch.manual_seed(0)
    model = TinyNet().eval()
    ds = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0, 0.7071))
    cache = tmp_path / "cache"
    first = cached_global_descriptors(model=model, dataset=ds, cache_dir=cache, label="db", progress=False)
    assert model.seen == 2 * len(ds)  # two scales per image
    files = sorted(p.name for p in cache.iterdir() if p.is_file())  # (content-sha256/ holds the hash memo)
    assert len(files) == 1 and not any(name.endswith(".tmp") for name in files)

    again = cached_global_descriptors(model=model, dataset=ds, cache_dir=cache, label="db", progress=False)
    assert model.seen == 2 * len(ds)  # hit: nothing re-extracted
    torch.testing.assert_close(again, first)

    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] += 0.5  # new weights -> new key -> re-extracted
    changed = cached_global_descriptors(model=model, dataset=ds, cache_dir=cache, label="db", progress=False)
    assert model.seen == 4 * len(ds)
    assert not torch.allclose(changed, first)
    assert len(list(cache.glob("*.pt"))) == 2


def test_cache_key_depends_on_config_and_image_list(layout):
    model = TinyNet()
    ds = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,))
    key = feature_cache_key(model=model, dataset=ds)
    assert key == feature_cache_key(model=model, dataset=RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,)))
    assert key != feature_cache_key(model=model, dataset=RevisitedDataset(layout, "roxford5k", "db",
                                                                          scales=(1.0, 0.7071)))
    assert key != feature_cache_key(model=model, dataset=RevisitedDataset(layout, "roxford5k", "query"))
    assert key != feature_cache_key(model=model, dataset=ds, kind="maps")
    with open(ds.image_paths[3], "ab") as f:  # a changed file (size) changes the key
        f.write(b"\0")
    assert key != feature_cache_key(model=model, dataset=ds)


def test_state_dict_hash_tracks_weights_only():
    torch.manual_seed(0)
    a, b = TinyNet(), TinyNet()
    b.load_state_dict(a.state_dict())
    assert state_dict_hash(a) == state_dict_hash(b)
    with torch.no_grad():
        b.conv.bias[0] += 1e-3
    assert state_dict_hash(a) != state_dict_hash(b)


def test_missing_image_names_file_and_dataset(layout):
    ds = RevisitedDataset(layout, "roxford5k", "db")
    os.remove(ds.image_paths[2])
    with pytest.raises(FileNotFoundError, match=r"img2\.jpg.*roxford5k"):
        dataset_signature(ds)
    with pytest.raises(FileNotFoundError, match=r"img2\.jpg"):
        extract_global_descriptors(model=TinyNet(), dataset=ds, progress=False)


def test_reduced_map_store_computes_once_and_reloads_from_disk(layout, tmp_path):
    torch.manual_seed(0)
    model = CVNetRerank(50).eval()
    ds = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,))
    store = ReducedMapStore(model=model, dataset=ds, cache_dir=tmp_path / "maps", max_items=3, batch_size=4)
    store.prefetch([0, 2, 1])
    assert store.computed == 3
    got = store.get(2)
    with torch.no_grad():
        ref = model.reduce_featuremap(model.extract_featuremap(ds[2][0][None]))
    assert len(got) == len(ref) == 3
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    store.get(0)
    store.get(1)
    assert store.computed == 3  # reused, not recomputed
    store.get(4)  # a fourth image evicts the least recently used one from memory (bounded)
    assert len(store._memory) == 3

    fresh = ReducedMapStore(model=model, dataset=ds, cache_dir=tmp_path / "maps")
    for g, r in zip(fresh.get(2), ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert fresh.computed == 0 and fresh.loaded == 1


def test_images_in_memory_go_through_the_engine_like_the_reference():
    """ImageArrays: uint8 BGR arrays resized with OpenCV per scale; the engine's descriptors equal the model run by
    hand (within the fast path's 1e-5), with the runner made once or per call, and SuperGlobal at scale 1.0."""
    torch.manual_seed(0)
    model = CVNetGlobal(50).eval()
    rng = np.random.default_rng(3)
    images = [cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 1.5)
              for h, w in ((96, 112), (112, 96), (96, 112))]  # two of a size: one batch of 2
    ds = ImageArrays(images, scales=CVNET_TEST_SCALES, convention=model.input_convention)
    assert len(ds) == 3 and [tuple(t.shape) for t in ds[0]] == [(3, 68, 79), (3, 96, 112), (3, 136, 158)]
    got = extract_global_descriptors(model=model, dataset=ds, batch_size=2, progress=False)
    kept = extract_global_descriptors(model=model, dataset=ds, batch_size=2, progress=False,
                                      runner=fast_runner(model))
    torch.testing.assert_close(kept, got, atol=0, rtol=0)
    with torch.no_grad():
        for row, img in enumerate(images):
            per_scale = []
            for s in CVNET_TEST_SCALES:
                interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
                im = img if s == 1 else cv2.resize(img, None, fx=s, fy=s, interpolation=interp)
                x = torch.from_numpy(((im.astype(np.float32) / 255 - np.float32(OFFICIAL_CONVENTION.mean))
                                      / np.float32(OFFICIAL_CONVENTION.std)).transpose(2, 0, 1).copy())
                per_scale.append(F.normalize(model(x[None])[0], dim=0))
            ref = F.normalize(torch.stack(per_scale).mean(0), dim=0)
            torch.testing.assert_close(got[row], ref, atol=1e-5, rtol=0)

    torch.manual_seed(1)
    sg = SuperGlobal(depth=50, scales=(1.0,)).eval()
    one = ImageArrays(images, convention=sg.input_convention)  # scale 1.0 only: Scale-GeM resizes inside
    with torch.no_grad():
        ref = torch.cat([sg(one[i][0][None]) for i in range(3)])
    torch.testing.assert_close(extract_global_descriptors(model=sg, dataset=one, progress=False), ref,
                               atol=1e-5, rtol=0)


def test_reduced_map_store_by_key_forgets_and_reports_what_it_holds():
    """A store over any key -> [image] mapping (the retrieval API keys it by database id): LRU order, forget."""
    torch.manual_seed(0)
    model = CVNetRerank(50).eval()
    g = torch.Generator().manual_seed(2)
    by_id = {10: [torch.randn(3, 64, 64, generator=g)], 42: [torch.randn(3, 64, 80, generator=g)],
             7: [torch.randn(3, 64, 64, generator=g)]}
    store = ReducedMapStore(model=model, dataset=by_id, max_items=2, batch_size=2)
    store.prefetch([42, 10])
    assert store.cached_indices() == [42, 10] and store.in_memory(10) and not store.in_memory(7)
    store.get(42)
    store.get(7)  # evicts 10, the least recently used
    assert store.cached_indices() == [42, 7] and store.computed == 3
    store.forget([42, 99])
    assert store.cached_indices() == [7]
    with torch.no_grad():
        ref = model.reduce_featuremap(model.extract_featuremap(by_id[42][0][None]))
    for got, r in zip(store.get(42), ref):
        torch.testing.assert_close(got, r, atol=1e-6, rtol=0)
    assert store.computed == 4  # recomputed after being forgotten


# ------------------------------------------------------------------------------------- nothing silently wrong


def _replace_keeping_size_and_mtime(path: str, seed: int) -> None:
    """Overwrite a JPEG with another picture of exactly the same byte size and restore its mtime: what a size
    (or size + mtime) keyed cache cannot see. The new JPEG is padded after its end marker, which decoders skip."""
    before = os.stat(path)
    h, w = cv2.imread(path).shape[:2]
    rng = np.random.default_rng(seed)
    for quality in range(95, 5, -5):
        ok, data = cv2.imencode(".jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                                [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok and len(data) <= before.st_size:
            break
    data = data.tobytes() + b"\0" * (before.st_size - len(data))
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_nan_descriptors_raise_naming_the_images_and_the_weights(layout, tmp_path):
    """Issue 11.1: NaN weights gave a believable table. Descriptors are checked where they are made."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("nan")
    ds = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,))
    with pytest.raises(ValueError, match=r"NaN/Inf descriptors for \d image\(s\): .*roxford5k/jpg/img\d\.jpg.*"
                                         r"weights: weights/broken\.pth"):
        extract_global_descriptors(model=model, dataset=ds, progress=False, weights_source="weights/broken.pth")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"NaN/Inf.*weights: weights/broken\.pth"):
        cached_global_descriptors(model=model, dataset=ds, cache_dir=cache, progress=False,
                                  weights_source="weights/broken.pth")
    assert not list(cache.glob("*.pt"))  # nothing cached

    reranker = CVNetRerank(50).eval()
    with torch.no_grad():
        reranker.conv2ds[0].weight.fill_(float("inf"))
    store = ReducedMapStore(model=reranker, dataset=ds, weights_source="random (seed 0)")
    with pytest.raises(ValueError, match=r"re-ranking maps.*img2\.jpg.*random \(seed 0\)"):
        store.get(2)


def test_an_image_too_small_for_the_model_is_named_with_the_fix(layout):
    """Issue 11.6: SuperGlobal's Regional-GeM reflection padding on a short side <= 92 px was a RuntimeError
    that named no file."""
    torch.manual_seed(0)
    sg = SuperGlobal(depth=50, scales=(1.0,)).eval()
    ds = RevisitedDataset(layout, "roxford5k", "db", convention=sg.input_convention)  # 64-96 px, no min_side
    with pytest.raises(ValueError, match=r"roxford5k/jpg/img\d\.jpg.*too small.*data\.min_side: 96.*--min-side 96"):
        extract_global_descriptors(model=sg, dataset=ds, indices=[0], progress=False)
    arrays = ImageArrays([np.zeros((40, 300, 3), np.uint8)], names=["photos/strip.jpg"])
    with pytest.raises(ValueError, match=r"photos/strip\.jpg.*40x300"):
        extract_global_descriptors(model=sg, dataset=arrays, progress=False)


def test_replaced_image_of_the_same_size_invalidates_the_cache(layout, tmp_path):
    """Issue 11.7: the cache key used file sizes, so a replaced image of the same size gave stale descriptors."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    ds = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,))
    cache = tmp_path / "cache"
    first = cached_global_descriptors(model=model, dataset=ds, cache_dir=cache, label="db", progress=False)
    _replace_keeping_size_and_mtime(ds.image_paths[3], seed=7)
    seen = model.seen
    again = cached_global_descriptors(model=model, dataset=ds, cache_dir=cache, label="db", progress=False)
    assert model.seen == seen + len(ds)  # a miss: extracted afresh
    fresh = extract_global_descriptors(model=model, dataset=ds, progress=False)
    torch.testing.assert_close(again, fresh)
    assert not torch.allclose(again[3], first[3])
    torch.testing.assert_close(again[[0, 1, 2, 4, 5, 6]], first[[0, 1, 2, 4, 5, 6]])


def test_content_hashes_read_each_file_once_until_it_changes(layout, tmp_path, monkeypatch):
    """The memo: unchanged files are not read again (key: path, size, mtime_ns, ctime_ns, inode), a rewritten one
    is, even with its size and mtime restored; maps on disk follow the content too."""
    import helpers.cache_keys as cache_keys

    monkeypatch.setattr(cache_keys, "_RACY_NS", 0)  # the test's files are seconds old, not minutes
    ds = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,))
    memo = tmp_path / "cache" / cache_keys.HASH_MEMO_DIR
    model = TinyNet()
    key = feature_cache_key(model=model, dataset=ds, hashes=cache_keys.ContentHashes(memo))
    again = cache_keys.ContentHashes(memo)  # a later run: a new process reads the memo
    assert feature_cache_key(model=model, dataset=ds, hashes=again) == key and again.hashed == 0
    _replace_keeping_size_and_mtime(ds.image_paths[5], seed=3)
    third = cache_keys.ContentHashes(memo)
    assert feature_cache_key(model=model, dataset=ds, hashes=third) != key and third.hashed == 1
    assert feature_cache_key(model=model, dataset=ds) == feature_cache_key(model=model, dataset=ds, hashes=third)

    torch.manual_seed(0)
    reranker = CVNetRerank(50).eval()
    store = ReducedMapStore(model=reranker, dataset=ds, cache_dir=tmp_path / "maps")
    store.prefetch([4])
    _replace_keeping_size_and_mtime(ds.image_paths[4], seed=11)
    fresh = ReducedMapStore(model=reranker, dataset=ds, cache_dir=tmp_path / "maps")
    fresh.get(4)
    assert (fresh.loaded, fresh.computed) == (0, 1)  # the old maps on disk are not this image's


def test_flip_tta_is_l2_of_original_plus_mirrored_multiscale_descriptor(layout):
    """flip=True: L2(desc(x) + desc(flip x)), desc the multi-scale descriptor, every scale mirrored."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    ds = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0, 0.7071))
    plain = extract_global_descriptors(model=model, dataset=ds, batch_size=2, progress=False, fast=False)
    flipped = extract_global_descriptors(model=model, dataset=ds, batch_size=2, progress=False, fast=False,
                                         flip=True)
    fast = extract_global_descriptors(model=model, dataset=ds, batch_size=2, progress=False, flip=True)
    conv = copy.deepcopy(model.conv).double()  # the reference in float64

    def desc(xs):
        return F.normalize(torch.stack([F.normalize(conv(x).mean(dim=(2, 3)), dim=-1)[0] for x in xs]).mean(0),
                           dim=-1)

    with torch.no_grad():
        for i in range(len(ds)):
            per_scale = [t[None].double() for t in ds[i]]
            ref = F.normalize(desc(per_scale) + desc([torch.flip(x, dims=(-1,)) for x in per_scale]), dim=-1)
            torch.testing.assert_close(flipped[i].double(), ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(plain[i].double(), desc(per_scale), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast, flipped, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, flipped, atol=1e-3)  # noise images are not mirror-symmetric


def test_flip_is_part_of_the_feature_cache_key_and_off_leaves_it_unchanged(layout, tmp_path):
    model = TinyNet().eval()
    ds = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,))
    key = feature_cache_key(model=model, dataset=ds)
    assert feature_cache_key(model=model, dataset=ds, flip=False) == key
    assert feature_cache_key(model=model, dataset=ds, flip=True) != key
    cache = tmp_path / "cache"
    plain = cached_global_descriptors(model=model, dataset=ds, cache_dir=cache, label="db", progress=False)
    flipped = cached_global_descriptors(model=model, dataset=ds, cache_dir=cache, label="db", progress=False,
                                        flip=True)
    assert len(list(cache.glob("*.pt"))) == 2 and not torch.allclose(plain, flipped)
    seen = model.seen
    again = cached_global_descriptors(model=model, dataset=ds, cache_dir=cache, label="db", progress=False,
                                      flip=True)
    assert model.seen == seen  # a hit
    torch.testing.assert_close(again, flipped)


def test_skip_errors_leave_zero_rows_and_name_the_indices():
    from datasets.transforms import CorruptImageError

    class _Flaky(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            if i == 2:
                raise CorruptImageError("broken.jpg")
            return [torch.full((3, 8, 8), float(i))]

    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    skipped: list[int] = []
    out = extract_global_descriptors(model=model, dataset=_Flaky(), batch_size=2, progress=False, fast=False,
                                     combine=lambda per_scale: per_scale[0], skip_errors=(CorruptImageError,),
                                     skipped=skipped)
    assert skipped == [2] and torch.equal(out[2], torch.zeros(4))
    with torch.no_grad():  # the other rows: the model's output as given (combine passes the one scale through)
        assert torch.equal(out[3], model(torch.full((1, 3, 8, 8), 3.0))[0])
    with pytest.raises(CorruptImageError):
        extract_global_descriptors(model=model, dataset=_Flaky(), progress=False, fast=False)


def test_descriptors_made_on_a_gpu_and_on_the_cpu_are_never_served_to_each_other(layout, tmp_path, monkeypatch):
    """The device (and, on a GPU, the TF32 policy) enters the feature cache key and the map cache's folder; the
    CPU's keys are those of caches written before."""
    import helpers.feature_cache as feature_cache

    model = TinyNet().eval()
    ds = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,))
    key = feature_cache_key(model=model, dataset=ds)
    assert feature_cache_key(model=model, dataset=ds, device="cpu") == key
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        gpu = feature_cache_key(model=model, dataset=ds, device="cuda:1")
        assert gpu != key and gpu == feature_cache_key(model=model, dataset=ds, device=torch.device("cuda", 0))
        maps_gpu = ReducedMapStore(model=model, dataset=ds, cache_dir=tmp_path, device="cuda")._dir
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert feature_cache_key(model=model, dataset=ds, device="cuda") not in (key, gpu)
        maps_tf32 = ReducedMapStore(model=model, dataset=ds, cache_dir=tmp_path, device="cuda")._dir
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    maps_cpu = ReducedMapStore(model=model, dataset=ds, cache_dir=tmp_path)._dir
    assert len({maps_cpu, maps_gpu, maps_tf32}) == 3
    # the engine keys its cache by the device it extracts on
    calls: list = []
    monkeypatch.setattr(feature_cache, "feature_cache_key", recording(calls, feature_cache_key))
    cached_global_descriptors(model=model, dataset=ds, cache_dir=tmp_path / "cache", label="db", progress=False,
                              device="cpu")
    assert calls[0]["device"] == "cpu"
