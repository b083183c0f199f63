"""A tiny revisitop-format dataset written on the fly: paths, cropping, the restricted unpickler, error messages."""
import os
import pickle

import cv2
import numpy as np
import pytest
import torch

from datasets.revisited import (
    RevisitedDataset,
    Revisitop1M,
    load_ground_truth,
    shard_range,
)
from datasets.transforms import to_tensor
from models.checkpoint import OFFICIAL_CONVENTION

DB = ["all_souls_000001", "ashmolean_000002", "balliol_000003", "bodleian_000004", "christ_church_000005"]
QUERIES = ["all_souls_000001", "bodleian_000004"]


def _write_dataset(root, name="roxford5k", protocol=4):
    rng = np.random.default_rng(0)
    folder = root / name / "jpg"
    folder.mkdir(parents=True)
    for i, n in enumerate(DB):
        img = rng.integers(0, 256, size=(40 + i, 50 + 2 * i, 3), dtype=np.uint8)
        # PNG bytes under a .jpg name keep pixels exact; cv2.imread decodes by content, not extension
        ok, buf = cv2.imencode(".png", img)
        (folder / f"{n}.jpg").write_bytes(buf.tobytes())
    gnd = [
        # numpy scalars inside lists, as some re-saved gnd files have them
        {"bbx": [np.float64(3.7), 5.2, 30.9, np.float64(25.99)],
         "easy": np.array([0, 2], dtype=np.int64),
         "hard": np.array([4], dtype=np.int32), "junk": np.array([], dtype=np.int64)},
        {"bbx": np.array([0.0, 1.5, 10.2, 12.8]), "easy": [], "hard": np.array([1, 3]), "junk": [np.int64(2)]},
    ]
    cfg = {"imlist": DB, "qimlist": QUERIES, "gnd": gnd}
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(cfg, f, protocol=protocol)
    return root


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_load_ground_truth_all_protocols(tmp_path, protocol):
    _write_dataset(tmp_path, protocol=protocol)
    cfg = load_ground_truth(tmp_path / "roxford5k" / "gnd_roxford5k.pkl")
    assert cfg["imlist"] == DB and cfg["qimlist"] == QUERIES
    g0, g1 = cfg["gnd"]
    np.testing.assert_array_equal(g0["bbx"], [3.7, 5.2, 30.9, 25.99])
    assert g0["easy"].tolist() == [0, 2] and g0["hard"].tolist() == [4] and g0["junk"].tolist() == []
    assert g1["hard"].dtype == np.int64 and g1["hard"].tolist() == [1, 3] and g1["junk"].tolist() == [2]


def test_numpy1_pickles_load_without_importing_numpy_core(tmp_path):
    # the released gnd files predate numpy 2 and name numpy.core.multiarray (GLOBAL opcodes are plain text)
    _write_dataset(tmp_path, protocol=2)
    path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray\n" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    cfg = load_ground_truth(path)
    assert cfg["gnd"][0]["easy"].tolist() == [0, 2] and cfg["gnd"][1]["hard"].tolist() == [1, 3]


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("make", ["system", "eval"])
def test_malicious_pickle_is_refused(tmp_path, make):
    marker = tmp_path / "pwned"
    payload = _Evil(marker) if make == "system" else _EvalEvil()
    path = tmp_path / "gnd_roxford5k.pkl"
    with open(path, "wb") as f:
        pickle.dump({"imlist": DB, "qimlist": [], "gnd": [], "x": payload}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        load_ground_truth(path)
    assert not marker.exists()


def test_ground_truth_validation(tmp_path):
    path = tmp_path / "g.pkl"
    path.write_bytes(pickle.dumps({"imlist": DB, "gnd": []}))
    with pytest.raises(ValueError, match="qimlist"):
        load_ground_truth(path)
    bad_index = {"bbx": [0, 0, 1, 1], "easy": [7], "hard": [], "junk": []}
    path.write_bytes(pickle.dumps({"imlist": DB, "qimlist": ["a"], "gnd": [bad_index]}))
    with pytest.raises(ValueError, match="outside"):
        load_ground_truth(path)
    path.write_bytes(pickle.dumps({"imlist": DB, "qimlist": ["a", "b"], "gnd": [bad_index]}))
    with pytest.raises(ValueError, match="2 queries"):
        load_ground_truth(path)


def test_database_split_paths_and_tensors(tmp_path):
    _write_dataset(tmp_path)
    ds = RevisitedDataset(tmp_path, "roxford5k", "db", scales=(1.0, 0.7071))
    assert len(ds) == 5
    assert ds.image_paths == [str(tmp_path / "roxford5k" / "jpg" / f"{n}.jpg") for n in DB]
    assert ds.imlist == DB and ds.qimlist == QUERIES and len(ds.gnd) == 2
    item = ds[2]
    assert isinstance(item, list) and len(item) == 2
    raw = cv2.imread(ds.image_paths[2], cv2.IMREAD_COLOR)
    assert torch.equal(item[0], to_tensor(raw, OFFICIAL_CONVENTION))  # database images are never cropped
    assert item[1].shape == (3, round(42 * 0.7071), round(54 * 0.7071))


def test_query_split_crops_once(tmp_path):
    _write_dataset(tmp_path, name="rparis6k")
    ds = RevisitedDataset(tmp_path, "rparis6k", split="query")
    assert ds.image_paths == [str(tmp_path / "rparis6k" / "jpg" / f"{n}.jpg") for n in QUERIES]
    full = cv2.imread(ds.image_paths[0], cv2.IMREAD_COLOR)
    # bbx (3.7, 5.2, 30.9, 25.99) -> rows 5..24, cols 3..29
    expected = full[5:25, 3:30]
    assert np.array_equal(ds.read(0), expected)
    (t,) = ds[0]
    assert t.shape == (3, 20, 27) and torch.equal(t, to_tensor(expected, OFFICIAL_CONVENTION))
    # a second crop of the crop would shrink it again; the query image is cropped exactly once
    assert ds[1][0].shape == (3, 11, 10)


def test_min_side_guard_applies(tmp_path):
    _write_dataset(tmp_path)
    ds = RevisitedDataset(tmp_path, "roxford5k", "query", min_side=16)
    assert ds[1][0].shape == (3, 18, 16)  # crop (H 11, W 10): W raised to 16, H to round(11 * 1.6)


def test_missing_image_names_file_and_dataset(tmp_path):
    _write_dataset(tmp_path)
    os.remove(tmp_path / "roxford5k" / "jpg" / f"{DB[3]}.jpg")
    ds = RevisitedDataset(tmp_path, "roxford5k")
    assert ds.missing_images() == [ds.image_paths[3]]
    with pytest.raises(FileNotFoundError, match=rf"{DB[3]}\.jpg.*roxford5k"):
        ds[3]


def test_missing_dataset_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        RevisitedDataset(tmp_path, "rparis6k")
    msg = str(e.value)
    assert "http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl" in msg
    assert "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz" in msg
    assert "paris_2-v1.tgz" in msg and str(tmp_path / "rparis6k" / "jpg") in msg
    (tmp_path / "roxford5k" / "jpg").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="gnd_roxford5k.pkl is missing") as e:
        RevisitedDataset(tmp_path, "roxford5k")
    assert "oxbuild_images-v1.tgz" in str(e.value)
    # any name is a dataset in the same layout; a missing one says which files make it
    with pytest.raises(FileNotFoundError, match="revisitop layout") as e:
        RevisitedDataset(tmp_path, "mybuildings")
    assert "gnd_mybuildings.pkl" in str(e.value)
    with pytest.raises(ValueError, match="invalid dataset name"):
        RevisitedDataset(tmp_path, "..")
    with pytest.raises(ValueError, match="split"):
        RevisitedDataset(tmp_path, "roxford5k", "train")


def _write_r1m(root, n=7, missing=(2, 5)):
    folder = root / "revisitop1m"
    lines = []
    rng = np.random.default_rng(1)
    for i in range(n):
        rel = f"{i % 3}/{i}/img_{i:04d}.jpg"
        lines.append(rel)
        if i in missing:
            continue
        (folder / "jpg" / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / "jpg" / rel), rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8))
    (folder / "revisitop1m.txt").write_text("\n".join(lines) + "\n")
    return lines


def test_revisitop1m_paths_shards_and_completeness(tmp_path):
    lines = _write_r1m(tmp_path)
    (tmp_path / "revisitop1m" / "jpg" / "stray.jpg").write_bytes(b"x")
    ds = Revisitop1M(tmp_path)
    assert len(ds) == 7 and ds.image_paths[3] == str(tmp_path / "revisitop1m" / "jpg" / lines[3])
    assert ds[0][0].shape == (3, 20, 24)
    with pytest.raises(FileNotFoundError, match=r"img_0002\.jpg.*revisitop1m"):
        ds[2]
    report = ds.check_complete(progress=False)
    assert report.n_listed == 7 and report.n_on_disk == 6 and report.unlisted == 1
    assert report.missing == [os.path.normpath(lines[2]), os.path.normpath(lines[5])] and not report.complete
    shards = [ds.shard(i, 3) for i in range(3)]
    assert [list(s) for s in shards] == [[0, 1], [2, 3], [4, 5, 6]]


def test_shard_range_partitions():
    for total in (0, 1, 10, 1001001):
        for n in (1, 3, 7):
            rs = [shard_range(i, n, total) for i in range(n)]
            assert rs[0].start == 0 and rs[-1].stop == total
            assert all(a.stop == b.start for a, b in zip(rs, rs[1:]))
            assert max(len(r) for r in rs) - min(len(r) for r in rs) <= 1
    with pytest.raises(ValueError):
        shard_range(3, 3, 10)


def test_revisitop1m_missing_list_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="revisitop1m.txt") as e:
        Revisitop1M(tmp_path)
    assert "http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt" in str(e.value)


# ---------------------------------------------------------------------------------------------- naming items


def test_describe_item_names_the_file_through_concat_and_subset(tmp_path):
    from torch.utils.data import ConcatDataset, Subset

    from datasets.revisited import describe_item

    _write_dataset(tmp_path)
    lines = _write_r1m(tmp_path, n=4, missing=())
    db = RevisitedDataset(tmp_path, "roxford5k", "db")
    query = RevisitedDataset(tmp_path, "roxford5k", "query", min_side=16)
    r1m = Revisitop1M(tmp_path)
    text = describe_item(query, 1)
    assert query.image_paths[1] in text and "roxford5k (query) item 1" in text
    assert "bbx (0.0, 1.5, 10.2, 12.8)" in text and "min_side 16" in text
    assert describe_item(db, 2) == f"roxford5k (db) item 2: {db.image_paths[2]}"
    both = ConcatDataset([db, r1m])
    assert describe_item(both, 6).endswith(os.path.join("revisitop1m", "jpg", lines[1]))
    assert describe_item(Subset(both, [4, 0]), 1) == describe_item(db, 0)
    assert describe_item([1, 2, 3], 2) == "item 2 of a list"


# ---------------------------------------------------------------------------------------------- hostile gnd


class _Reduce:
    """Pickles as ``func(*args)``: how a hostile file asks the unpickler to call something."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


_numpy_scalar = _numpy_scalar()


def _gnd(**over):
    cfg = {"imlist": list(DB), "qimlist": ["all_souls_000001"],
           "gnd": [{"bbx": [1.0, 2.0, 30.0, 25.0], "easy": np.array([0, 2]), "hard": np.array([4]),
                    "junk": np.array([], dtype=np.int64)}]}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload", [
    _Reduce(bytes, 100_000_000),                 # 100 MB out of a file of a few bytes
    _Reduce(bytearray, 100_000_000),
    _Reduce(np.ndarray, (100_000, 1000)),        # an uninitialised 800 MB array, just as cheaply
    _Reduce(_numpy_scalar, np.dtype(("V", 100_000_000))),  # a 100 MB numpy scalar of nothing
])
def test_allocation_bombs_are_refused(tmp_path, payload, protocol):
    import tracemalloc

    from datasets.revisited import GroundTruthError

    path = tmp_path / "gnd_x.pkl"
    path.write_bytes(pickle.dumps(_gnd(extra=payload), protocol=protocol))
    assert path.stat().st_size < 2000
    tracemalloc.start()
    try:
        with pytest.raises(GroundTruthError, match=r"gnd_x\.pkl") as err:
            load_ground_truth(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000 and isinstance(err.value, pickle.UnpicklingError)


def test_empty_and_truncated_files_name_the_path(tmp_path):
    from datasets.revisited import GroundTruthError

    empty = tmp_path / "gnd_empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(GroundTruthError, match=r"gnd_empty\.pkl.*empty"):
        load_ground_truth(empty)
    cut = tmp_path / "gnd_cut.pkl"
    raw = pickle.dumps(_gnd(), protocol=4)
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(GroundTruthError, match=r"gnd_cut\.pkl.*(truncated|damaged)"):
        load_ground_truth(cut)
    with pytest.raises(FileNotFoundError, match=r"gnd_none\.pkl"):
        load_ground_truth(tmp_path / "gnd_none.pkl")


@pytest.mark.parametrize("over,field", [
    ({"imlist": "all_souls_000001"}, "'imlist'"),                    # a string is not a list of names
    ({"qimlist": "all_souls_000001"}, "'qimlist'"),
    ({"imlist": [b"all_souls_000001"]}, r"'imlist'\[0\]"),
    ({"qimlist": [7]}, r"'qimlist'\[0\]"),
    ({"gnd": {"bbx": [0, 0, 1, 1]}}, "'gnd'"),
    ({"gnd": [{"bbx": [0, 0, 1], "easy": [], "hard": [], "junk": []}]}, r"gnd\[0\]\['bbx'\]"),
    ({"gnd": [{"bbx": [0, 0, float("nan"), 1], "easy": [], "hard": [], "junk": []}]}, r"gnd\[0\]\['bbx'\]"),
    ({"gnd": [{"bbx": ["a", 0, 1, 1], "easy": [], "hard": [], "junk": []}]}, r"gnd\[0\]\['bbx'\]"),
    ({"gnd": [{"bbx": [0, 0, 1, 1], "easy": [0.5], "hard": [], "junk": []}]}, r"gnd\[0\]\['easy'\]"),
    ({"gnd": [{"bbx": [0, 0, 1, 1], "easy": "12", "hard": [], "junk": []}]}, r"gnd\[0\]\['easy'\]"),
    ({"gnd": [{"bbx": [0, 0, 1, 1], "easy": [], "hard": [-1], "junk": []}]}, r"gnd\[0\]\['hard'\]"),
    ({"gnd": [{"bbx": [0, 0, 1, 1], "easy": [], "hard": [], "junk": [5]}]}, r"gnd\[0\]\['junk'\]"),
    ({"gnd": [{"bbx": [0, 0, 1, 1], "easy": [[0, 1], [2, 3]], "hard": [], "junk": []}]}, r"gnd\[0\]\['easy'\]"),
])
def test_malformed_fields_are_named(tmp_path, over, field):
    from datasets.revisited import GroundTruthError

    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(pickle.dumps(_gnd(**over), protocol=4))
    with pytest.raises(GroundTruthError, match=rf"gnd_bad\.pkl.*{field}"):
        load_ground_truth(path)


def test_well_formed_files_still_load_unchanged(tmp_path):
    path = tmp_path / "gnd_ok.pkl"
    cfg = _gnd(extra={"note": "kept", "n": 3})
    path.write_bytes(pickle.dumps(cfg, protocol=2))
    out = load_ground_truth(path)
    assert out["extra"] == {"note": "kept", "n": 3} and out["imlist"] == DB
    path.write_bytes(pickle.dumps(_gnd(imlist=np.array(DB)), protocol=4))  # names as a numpy array of str
    assert load_ground_truth(path)["imlist"] == DB
    assert out["gnd"][0]["easy"].dtype == np.int64 and out["gnd"][0]["junk"].shape == (0,)
    np.testing.assert_array_equal(out["gnd"][0]["bbx"], [1.0, 2.0, 30.0, 25.0])
