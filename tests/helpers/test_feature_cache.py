"""helpers.feature_cache: pieces whose boundaries follow the set's size alone, every rank's even share of them, the
resume after a crash (under the same or another number of ranks), and two real gloo ranks that hash a slice of the
files each and give one process's descriptors bit for bit."""
import json
import sys
from pathlib import Path

import pytest
import torch

import helpers.feature_cache as FC
from datasets.revisited import RevisitedDataset
from helpers.cache_keys import ContentHashes, feature_cache_key
from helpers.extraction import ImageArrays, extract_global_descriptors
from helpers.feature_cache import cached_global_descriptors, extract_sharded, piece_ranges
from tests.support.launch import run_two_cpu_ranks
from tests.support.tiny_sets import BatchSensitiveNet, Recording, TinyNet, write_layout

pytestmark = pytest.mark.usefixtures("one_thread")

SAME_SIZE = [(64, 80)] * 7  # one size: batches of three form, so what a batch holds shows in its descriptors


@pytest.fixture
def layout(tmp_path):
    return write_layout(tmp_path / "data", sizes=SAME_SIZE)


def _sizes(pieces):
    return [len(p) for p in pieces]


def test_pieces_cover_the_set_evenly_and_follow_its_size_alone():
    for n, kw, sizes in [
        (7, {"batch_size": 2}, [2, 2, 2, 1]),        # ceil(7/2) = 4 pieces
        (7, {"batch_size": 3}, [4, 3]),              # ceil(7/3) = 3: the largest count of PIECE_COUNTS below is 2
        (12, {"batch_size": 8}, [6, 6]),             # the built-in benchmark's 12 queries: one piece per rank of 2
        (136, {"batch_size": 8}, [12] * 4 + [11] * 8),
        (1, {"batch_size": 8}, [1]),                 # fewer images than ranks
        (0, {}, []),
        (25, {"shard_size": 2, "batch_size": 8}, [2] * 12 + [1]),  # shard_size bounds a piece
    ]:
        pieces = piece_ranges(n, **kw)
        assert _sizes(pieces) == sizes, (n, kw)
        assert [i for p in pieces for i in p] == list(range(n))
    # the 5k / 6k sets: 240 pieces of about 21 images; R1M: 240 pieces too, 4167 images each (< shard_size)
    assert len(piece_ranges(4993, shard_size=20000, batch_size=8)) == 240
    assert set(_sizes(piece_ranges(1_000_000, shard_size=20000, batch_size=8))) == {4166, 4167}
    assert len(piece_ranges(10_000_000, shard_size=20000, batch_size=8)) == 500
    for bad in ({"shard_size": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=">= 1"):
            piece_ranges(5, **bad)


def test_a_batch_never_spans_two_pieces(layout):
    torch.manual_seed(0)
    ds = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,))
    done = []
    kw = {"model": BatchSensitiveNet().eval(), "dataset": ds, "batch_size": 3, "progress": False}
    pieced = extract_global_descriptors(pieces=[4, 3], on_piece=lambda k, rows: done.append((k, rows.clone())), **kw)
    assert [k for k, _ in done] == [0, 1] and torch.equal(torch.cat([r for _, r in done]), pieced)
    # piece by piece gives the same bits; one piece batches 3 + 1 across the boundary, which shows
    alone = torch.cat([extract_global_descriptors(indices=list(p), **kw) for p in (range(4), range(4, 7))])
    assert torch.equal(pieced, alone)
    assert not torch.equal(pieced, extract_global_descriptors(**kw))
    with pytest.raises(ValueError, match="pieces"):
        extract_global_descriptors(pieces=[4, 4], **kw)


def test_a_crashed_run_extracts_only_its_missing_pieces(layout, tmp_path):
    torch.manual_seed(0)
    model = TinyNet().eval()
    base = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,))
    key = feature_cache_key(model=model, dataset=base)
    shard_dir = tmp_path / "shards"
    kw = {"model": model, "key": key, "shard_dir": shard_dir, "batch_size": 2, "progress": False}
    full = extract_sharded(dataset=base, **kw)
    files = sorted(shard_dir.iterdir())
    assert [f.name for f in files] == [f"piece-{a:09d}-{b:09d}.pt" for a, b in ((0, 2), (2, 4), (4, 6), (6, 7))]
    files[2].unlink()  # the crash: a later piece never got written
    rec = Recording(base)
    again = extract_sharded(dataset=rec, **kw)
    assert sorted(rec.read_indices) == [4, 5]
    assert torch.equal(again, full)
    assert torch.equal(full, cached_global_descriptors(model=model, dataset=base, batch_size=2, progress=False))


def _simulated_ranks(monkeypatch, dataset, world_size, **kw):
    """``extract_sharded`` as each rank of ``world_size`` runs it, one after the other in this process; the plan
    they share is rank 0's view of the folder before any of them wrote (what the broadcast gives them)."""
    plan = [i for i, p in enumerate(piece_ranges(len(dataset), batch_size=kw["batch_size"]))
            if not FC._piece_path(kw["shard_dir"], p).is_file()]
    monkeypatch.setattr(FC, "broadcast_object", lambda obj, env: list(plan))
    reads, out = [], None
    for rank in reversed(range(world_size)):  # rank 0 last: it merges once every share is on disk
        rec = Recording(dataset)
        got = extract_sharded(dataset=rec, rank=rank, world_size=world_size, **kw)
        assert (got is None) == (rank != 0)
        reads.insert(0, sorted(rec.read_indices))
        out = got
    return reads, out


def test_ranks_extract_even_shares_and_resume_under_another_world_size(layout, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = BatchSensitiveNet().eval()
    base = RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,))
    one = cached_global_descriptors(model=model, dataset=base, batch_size=3, progress=False)
    kw = {"model": model, "key": "k", "batch_size": 3, "progress": False}
    # 7 images, batches of 3: pieces [0, 4) and [4, 7), one per rank; the same bits as one process
    reads, two = _simulated_ranks(monkeypatch, base, 2, shard_dir=tmp_path / "two", **kw)
    assert reads == [[0, 1, 2, 3], [4, 5, 6]] and torch.equal(two, one)
    # batches of 1: 6 pieces (2 images, then 1 each), 3 ranks take 2, 3 and 2 images
    reads, three = _simulated_ranks(monkeypatch, base, 3, shard_dir=tmp_path / "three", **{**kw, "batch_size": 1})
    assert [len(r) for r in reads] == [2, 3, 2] and sorted(sum(reads, [])) == list(range(7))
    # a 3-rank run that crashed after rank 2 wrote its pieces, resumed by 2 ranks: they split the 5 images left
    shard_dir = tmp_path / "resume"
    shard_dir.mkdir()
    pieces = piece_ranges(7, batch_size=1)
    written = pieces[4:]
    for p in written:
        FC._save_features(FC._piece_path(shard_dir, p), "k", three[p.start : p.stop].clone(), start=p.start,
                          stop=p.stop)
    reads, resumed = _simulated_ranks(monkeypatch, base, 2, shard_dir=shard_dir, **{**kw, "batch_size": 1})
    assert reads == [[0, 1], [2, 3, 4]] and torch.equal(resumed, three)
    # ranks splitting by image count (3 + 4) and batching within their blocks would not give the same bits
    assert not torch.equal(extract_global_descriptors(model=model, dataset=base, indices=range(3, 7), batch_size=3,
                                                      progress=False), one[3:])


def test_several_ranks_need_a_cache_dir_and_a_valid_rank(layout):
    ds = RevisitedDataset(layout, "roxford5k", "db")
    with pytest.raises(ValueError, match="cache_dir"):
        cached_global_descriptors(model=TinyNet(), dataset=ds, world_size=2, rank=0, progress=False)
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        extract_sharded(model=TinyNet(), dataset=ds, key="k", shard_dir=layout / "s", rank=2, world_size=2)
    for rank in (0, 1):  # an empty set: refused on every rank alike, before any of them waits for another
        with pytest.raises(ValueError, match="nothing to extract for empty"):
            cached_global_descriptors(model=TinyNet(), dataset=ImageArrays([]), cache_dir=layout / "c", label="empty",
                                      rank=rank, world_size=2)


@pytest.mark.slow
def test_two_gloo_ranks_hash_a_slice_each_and_give_one_process_bits(layout, tmp_path):
    """Two real ranks: each reads its slice of the files to hash (no rank waits while the other hashes: CUDA
    review finding 13) and its share of the pieces; rank 0 returns the single process's descriptors bit for bit,
    then a hit without reading an image, the other rank None."""
    out = tmp_path / "out"
    out.mkdir()
    script = Path(__file__).resolve().parents[1] / "support" / "two_rank_cache.py"
    run_two_cpu_ranks([sys.executable, str(script), str(layout), str(tmp_path / "cache"), str(out)], timeout=240)
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    torch.manual_seed(0)
    model = BatchSensitiveNet().eval()
    ds = Recording(RevisitedDataset(layout, "roxford5k", "db", scales=(1.0,)))  # as the ranks saw it
    single = ContentHashes(tmp_path / "memo-single")
    assert seen[0]["key"] == seen[1]["key"] == feature_cache_key(model=model, dataset=ds, hashes=single)
    assert [s["hashed"] for s in seen] == [3, 4] and single.hashed == 7  # a slice each
    assert seen[0]["read"] == [0, 1, 2, 3] and seen[1]["read"] == [4, 5, 6]
    assert seen[0]["read_again"] == seen[1]["read_again"] == []  # the second call is a hit
    assert [s["first_is_none"] for s in seen] == [False, True] and [s["second_is_none"] for s in seen] == [False, True]
    got = torch.load(out / "descriptors.pt", weights_only=True)
    one = cached_global_descriptors(model=model, dataset=ds, batch_size=3, progress=False)
    assert torch.equal(got["first"], one) and torch.equal(got["second"], one)
    assert not list((tmp_path / "cache").glob("*.shards"))  # merged pieces are cleaned up
