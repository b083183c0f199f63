"""GLDv2 train split on a tiny generated layout, the download planner, and the folder / CIFAR-10 readers."""
import hashlib
import logging

import cv2
import numpy as np
import pytest

from datasets.folder import CorruptImageError, ImageFolderDataset, cifar10
from datasets.gldv2 import (
    GoogleLandmarksV2,
    gldv2_shard_urls,
    plan_gldv2_download,
    read_exclusion_file,
)
from datasets.paired import PairedDataset

# landmark id -> image ids; 42 is split over two csv rows, 7 has one image
CSV_ROWS = [
    (1000, ["a00000000000000a", "a00000000000000b"]),
    (42, ["b00000000000000a"]),
    (7, ["c00000000000000a"]),
    (42, ["b00000000000000b", "b00000000000000c"]),
]


def _write_layout(root, rows=CSV_ROWS, images=True):
    root.mkdir(parents=True, exist_ok=True)
    lines = ["landmark_id,images"] + [f"{lid},{' '.join(ids)}" for lid, ids in rows]
    (root / "train_clean.csv").write_text("\n".join(lines) + "\n")
    written = {}
    if images:
        rng = np.random.default_rng(0)
        for _, ids in rows:
            for image_id in ids:
                path = root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                img = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
                assert cv2.imwrite(str(path), img)
                written[image_id] = path
    return written


@pytest.fixture()
def gld_root(tmp_path):
    root = tmp_path / "gldv2"
    _write_layout(root)
    return root


def test_labels_are_remapped_in_landmark_id_order(gld_root):
    ds = GoogleLandmarksV2(gld_root)
    assert ds.landmark_ids.tolist() == [7, 42, 1000]
    assert ds.class_to_idx == {7: 0, 42: 1, 1000: 2}
    assert ds.num_classes == 3 and len(ds) == 6
    expected = {}
    for lid, ids in CSV_ROWS:
        for image_id in ids:
            expected[image_id] = ds.class_to_idx[lid]
    assert sorted(ds.targets.tolist()) == sorted(expected.values())
    for i in range(len(ds)):
        image_id = ds.image_id(i)
        assert ds.targets[i] == expected[image_id]
        path = ds.image_path(i)
        assert path == gld_root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        image, label = ds[i]
        assert label == expected[image_id] and isinstance(label, int)
        assert image.dtype == np.uint8 and image.shape == (12, 16, 3)
        assert np.array_equal(image, cv2.imread(str(path), cv2.IMREAD_COLOR))


def test_transform_and_min_class_size(gld_root):
    ds = GoogleLandmarksV2(gld_root, transform=lambda img: img.shape, min_class_size=2)
    assert ds.landmark_ids.tolist() == [42, 1000]  # landmark 7 has a single image
    assert ds[0] == ((12, 16, 3), ds.targets[0])
    with pytest.raises(ValueError, match="min_class_size"):
        GoogleLandmarksV2(gld_root, min_class_size=0)


def test_exclusion_file_drops_landmarks_before_remapping(gld_root, tmp_path, caplog):
    exclude = tmp_path / "rgldv2_exclude.txt"
    exclude.write_text("# landmarks overlapping ROxford/RParis\n42\n\n99999  # not in this csv\n")
    assert read_exclusion_file(exclude) == {42, 99999}
    with caplog.at_level(logging.INFO, logger="datasets.gldv2"):
        ds = GoogleLandmarksV2(gld_root, exclude_revisited=True, exclude_landmarks_file=exclude)
    assert ds.landmark_ids.tolist() == [7, 1000]
    assert ds.class_to_idx == {7: 0, 1000: 1}
    assert len(ds) == 3 and sorted(ds.targets.tolist()) == [0, 1, 1]
    assert not any(ds.image_id(i).startswith("b") for i in range(len(ds)))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 1 landmarks (3 images)" in messages and "1 landmark ids" in messages


def test_exclusion_requires_its_file_and_says_where_to_get_it(gld_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="RGLDv2-clean") as err:
        GoogleLandmarksV2(gld_root, exclude_revisited=True)
    assert "one GLDv2 landmark id per line" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GoogleLandmarksV2(gld_root, exclude_revisited=True, exclude_landmarks_file=tmp_path / "nope.txt")
    listed = tmp_path / "list.txt"
    listed.write_text("42\n")
    with pytest.raises(ValueError, match="exclude_revisited=True"):
        GoogleLandmarksV2(gld_root, exclude_landmarks_file=listed)
    listed.write_text("42\nseven\n")
    with pytest.raises(ValueError, match=r"list.txt:2"):
        read_exclusion_file(listed)


def test_missing_csv_says_what_to_download_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        GoogleLandmarksV2(tmp_path / "empty")
    message = str(err.value)
    assert "https://s3.amazonaws.com/google-landmark/metadata/train_clean.csv" in message
    assert "https://s3.amazonaws.com/google-landmark/train/images_{000..499}.tar" in message
    assert "https://s3.amazonaws.com/google-landmark/md5sum/train/md5.images_{000..499}.txt" in message
    assert str(tmp_path / "empty") in message


def test_bad_csv_header(tmp_path):
    (tmp_path / "train_clean.csv").write_text("id,url\nabc,http://x\n")
    with pytest.raises(ValueError, match="landmark_id,images"):
        GoogleLandmarksV2(tmp_path)


def test_missing_and_corrupt_images(tmp_path):
    root = tmp_path / "gldv2"
    written = _write_layout(root)
    ds = GoogleLandmarksV2(root)
    victim = ds.image_id(0)
    written[victim].write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(CorruptImageError) as err:
        ds[0]
    assert err.value.path == str(written[victim]) and isinstance(err.value, ValueError)
    written[ds.image_id(1)].unlink()
    with pytest.raises(FileNotFoundError, match="shard"):
        ds[1]


def test_paired_dataset_over_gldv2_uses_targets(gld_root):
    ds = GoogleLandmarksV2(gld_root)
    paired = PairedDataset(ds, seed=0)
    assert np.array_equal(paired.labels, ds.targets) and paired.num_single_item_classes == 1
    for i in range(len(ds)):
        j = paired.positive_index(i)
        assert ds.targets[j] == ds.targets[i] and (j != i or ds.landmark_ids[ds.targets[i]] == 7)


# ------------------------------------------------------------------------------------------- download plan


def _md5_line(data, name):
    return f"{hashlib.md5(data).hexdigest()}  {name}\n"


def test_plan_lists_missing_partial_and_corrupt_shards(tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    good = b"complete shard"
    (tars / "images_000.tar").write_bytes(good)
    (tars / "md5.images_000.txt").write_text(_md5_line(good, "images_000.tar"))
    (tars / "images_001.tar.part").write_bytes(b"12345")
    (tars / "images_002.tar").write_bytes(b"truncated")
    (tars / "md5.images_002.txt").write_text(_md5_line(good, "images_002.tar"))
    (tars / "images_003.tar").write_bytes(good)
    (tars / "images_005.extracted").write_text("")
    plan = plan_gldv2_download(tmp_path, shards=range(6))
    assert [(s.shard, s.status) for s in plan] == [
        (1, "partial"), (2, "md5_mismatch"), (3, "no_md5"), (4, "missing"),
    ]
    partial = plan[0]
    assert partial.part_bytes == 5
    assert partial.url == "https://s3.amazonaws.com/google-landmark/train/images_001.tar"
    assert partial.md5_url == "https://s3.amazonaws.com/google-landmark/md5sum/train/md5.images_001.txt"
    assert partial.tar_path == tars / "images_001.tar" and partial.md5_path == tars / "md5.images_001.txt"
    # without hashing, a tar with its md5 file counts as done
    assert [s.shard for s in plan_gldv2_download(tmp_path, shards=[2, 3], verify_md5=False)] == [3]
    # an explicit download_dir; every shard missing there
    other = plan_gldv2_download(tmp_path, shards=[499, 0], download_dir=tmp_path / "elsewhere")
    assert [(s.shard, s.status) for s in other] == [(0, "missing"), (499, "missing")]
    assert gldv2_shard_urls(499)[0].endswith("/train/images_499.tar")
    with pytest.raises(ValueError, match="0..499"):
        plan_gldv2_download(tmp_path, shards=[500])


# ------------------------------------------------------------------------------------------- folder / cifar


def test_image_folder_dataset(tmp_path):
    rng = np.random.default_rng(1)
    images = {}
    for cls, name in (("dog", "b.png"), ("cat", "a.png"), ("cat", "sub/c.png")):
        path = tmp_path / "root" / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
        assert cv2.imwrite(str(path), img)
        images[str(path)] = img
    (tmp_path / "root" / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path / "root")
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 1]
    for i, (path, label) in enumerate(ds.samples):
        image, got = ds[i]
        assert got == label and np.array_equal(image, images[path])  # png: lossless, BGR both ways
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "absent")


def test_cifar10_missing_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        cifar10(tmp_path, train=True)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in str(err.value)
    assert "cifar-10-batches-py" in str(err.value)


def test_bgr_view_of_a_pil_dataset():
    from PIL import Image

    from datasets.folder import _BGRView

    rgb = np.random.default_rng(2).integers(0, 256, size=(4, 3, 3), dtype=np.uint8)

    class FakeCifar:
        targets = [6]
        classes = ["frog"]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return Image.fromarray(rgb), 6

    view = _BGRView(FakeCifar(), transform=None)
    image, label = view[0]
    assert label == 6 and view.targets == [6] and view.classes == ["frog"]
    assert image.dtype == np.uint8 and np.array_equal(image, rgb[:, :, ::-1])


# ---------------------------------------------------------------------------------------------- retrieval test split
#
# The layout of the official download (cvdfoundation/google-landmark): index.csv and test.csv (one column "id"),
# retrieval_solution_v2.1.csv (id,images,Usage: space-separated index ids; Usage Public / Private / Ignored, and
# "None" as the images of an ignored query), recognition_solution_v2.1.csv (id,landmarks,Usage), and the images
# of each split under <split>/a/b/c/<id>.jpg.

INDEX_IDS = ["0a1b2c3d4e5f6a7b", "1b2c3d4e5f6a7b8c", "2c3d4e5f6a7b8c9d", "3d4e5f6a7b8c9d0e", "4e5f6a7b8c9d0e1f"]
TEST_IDS = ["f0e1d2c3b4a59687", "e1d2c3b4a5968778", "d2c3b4a596877869", "c3b4a59687786950"]
SOLUTION = (
    "id,images,Usage\n"
    f"{TEST_IDS[0]},{INDEX_IDS[1]} {INDEX_IDS[3]},Public\n"
    f"{TEST_IDS[1]},None,Ignored\n"
    f"{TEST_IDS[2]},{INDEX_IDS[0]},Private\n"
    f"{TEST_IDS[3]},{INDEX_IDS[4]} {INDEX_IDS[2]} {INDEX_IDS[0]},Private\n"
)
RECOGNITION = (
    "id,landmarks,Usage\n"
    f"{TEST_IDS[0]},123 456,Public\n"
    f"{TEST_IDS[1]},,Private\n"
    f"{TEST_IDS[2]},,Ignored\n"
    f"{TEST_IDS[3]},789,Private\n"
)


def _write_retrieval_layout(root, *, nested_csvs=False):
    """The retrieval test split as the official download leaves it (CSVs at the root, or in the split
    folders as cvdfoundation's download-dataset.sh puts them)."""
    rng = np.random.default_rng(5)
    paths = {}
    for split, ids in (("index", INDEX_IDS), ("test", TEST_IDS)):
        csv_dir = root / split if nested_csvs else root
        csv_dir.mkdir(parents=True, exist_ok=True)
        (csv_dir / f"{split}.csv").write_text("id\n" + "\n".join(ids) + "\n")
        for k, image_id in enumerate(ids):
            path = root / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 256, size=(20 + k, 30, 3), dtype=np.uint8)
            ok, buf = cv2.imencode(".png", img)  # PNG bytes keep the pixels exact; OpenCV decodes by content
            path.write_bytes(buf.tobytes())
            paths[image_id] = (path, img)
    sol_dir = root / "test" if nested_csvs else root
    (sol_dir / "retrieval_solution_v2.1.csv").write_text(SOLUTION)
    (sol_dir / "recognition_solution_v2.1.csv").write_text(RECOGNITION)
    return paths


def test_read_retrieval_solution_has_delf_semantics(tmp_path):
    from datasets.gldv2 import read_recognition_solution, read_retrieval_solution

    _write_retrieval_layout(tmp_path)
    public, private, ignored = read_retrieval_solution(tmp_path / "retrieval_solution_v2.1.csv")
    assert public == {TEST_IDS[0]: [INDEX_IDS[1], INDEX_IDS[3]]}
    assert private == {TEST_IDS[2]: [INDEX_IDS[0]], TEST_IDS[3]: [INDEX_IDS[4], INDEX_IDS[2], INDEX_IDS[0]]}
    assert ignored == [TEST_IDS[1]]
    public, private, ignored = read_recognition_solution(tmp_path / "recognition_solution_v2.1.csv")
    assert public == {TEST_IDS[0]: [123, 456]} and private == {TEST_IDS[1]: [], TEST_IDS[3]: [789]}
    assert ignored == [TEST_IDS[2]]


@pytest.mark.parametrize("text,match", [
    ("id,images\nx,y\n", "Usage"),                                              # a column missing
    ("id,images,Usage\nf0e1d2c3b4a59687,0a1b2c3d4e5f6a7b,Secret\n", r":2: .*Usage 'Secret'"),
    ("id,images,Usage\nf0e1d2c3b4a59687,0a1b2c3d4e5f6a7b,Public\n"
     "f0e1d2c3b4a59687,1b2c3d4e5f6a7b8c,Private\n", r":3: .*f0e1d2c3b4a59687.*twice"),
    ("", "empty"),
])
def test_read_retrieval_solution_names_file_and_line(tmp_path, text, match):
    from datasets.gldv2 import read_retrieval_solution

    path = tmp_path / "retrieval_solution_v2.1.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"retrieval_solution_v2\.1\.csv.*{match}"):
        read_retrieval_solution(path)


@pytest.mark.parametrize("nested", [False, True])
def test_retrieval_test_split_reads_the_real_layout(tmp_path, nested):
    import torch

    from datasets.gldv2 import GLDv2RetrievalTest
    from datasets.revisited import describe_item
    from datasets.transforms import to_tensor
    from models.checkpoint import OFFICIAL_CONVENTION

    paths = _write_retrieval_layout(tmp_path, nested_csvs=nested)
    index = GLDv2RetrievalTest(tmp_path, "index", scales=(1.0, 0.7071))
    assert index.ids == INDEX_IDS and len(index) == 5
    assert index.image_paths[2] == str(tmp_path / "index" / "2" / "c" / "3" / f"{INDEX_IDS[2]}.jpg")
    assert np.array_equal(index.read(2), paths[INDEX_IDS[2]][1])
    item = index[2]
    assert isinstance(item, list) and len(item) == 2
    assert torch.equal(item[0], to_tensor(paths[INDEX_IDS[2]][1], OFFICIAL_CONVENTION))
    assert item[1].shape == (3, round(22 * 0.7071), round(30 * 0.7071))
    assert INDEX_IDS[2] in describe_item(index, 2) and index.image_paths[2] in describe_item(index, 2)
    # the test side: by default the scored queries (Public, then Private, in the solution's order)
    test = GLDv2RetrievalTest(tmp_path, "test")
    assert test.ids == [TEST_IDS[0], TEST_IDS[2], TEST_IDS[3]]
    assert test.solution.ignored == [TEST_IDS[1]]
    assert test.solution.public == {TEST_IDS[0]: [INDEX_IDS[1], INDEX_IDS[3]]}
    assert test.read_recognition_solution().private == {TEST_IDS[1]: [], TEST_IDS[3]: [789]}
    assert GLDv2RetrievalTest(tmp_path, "test", queries="private").ids == [TEST_IDS[2], TEST_IDS[3]]
    assert GLDv2RetrievalTest(tmp_path, "test", queries="all").ids == TEST_IDS
    assert np.array_equal(test.read(1), paths[TEST_IDS[2]][1])
    assert GLDv2RetrievalTest(tmp_path, "test", min_side=32)[0][0].shape == (3, 32, 48)


def test_retrieval_test_split_errors_say_what_to_fetch(tmp_path):
    from datasets.gldv2 import GLDv2RetrievalTest

    with pytest.raises(FileNotFoundError, match=r"(?s)index\.csv.*prepare_data\.py download .*gldv2-retrieval-test"):
        GLDv2RetrievalTest(tmp_path, "index")
    _write_retrieval_layout(tmp_path)
    with pytest.raises(ValueError, match="split"):
        GLDv2RetrievalTest(tmp_path, "train")
    with pytest.raises(ValueError, match="queries"):
        GLDv2RetrievalTest(tmp_path, "test", queries="some")
    index = GLDv2RetrievalTest(tmp_path, "index")
    index_path = index.image_paths[0]
    (tmp_path / "index" / "0" / "a" / "1" / f"{INDEX_IDS[0]}.jpg").unlink()
    assert index.missing_images() == [index_path]
    with pytest.raises(FileNotFoundError, match=rf"{INDEX_IDS[0]}\.jpg.*gldv2"):
        index[0]
    (tmp_path / "index.csv").write_text("id\n" + INDEX_IDS[1] + "\n../../etc/passwd\n")
    with pytest.raises(ValueError, match=r"index\.csv:3: .*passwd"):
        GLDv2RetrievalTest(tmp_path, "index")
    (tmp_path / "index.csv").write_text("image\n" + INDEX_IDS[1] + "\n")
    with pytest.raises(ValueError, match=r"index\.csv.*'id'"):
        GLDv2RetrievalTest(tmp_path, "index")


def test_downloader_knows_the_retrieval_test_files(tmp_path):
    from datasets.download import DOWNLOADS, plan_downloads

    files = DOWNLOADS["gldv2-retrieval-test"]
    urls = {f.url: f for f in files}
    base = "https://s3.amazonaws.com/google-landmark"
    assert urls[f"{base}/metadata/index.csv"].dest == "gldv2/index.csv"
    assert urls[f"{base}/metadata/test.csv"].dest == "gldv2/test.csv"
    assert urls[f"{base}/ground_truth/retrieval_solution_v2.1.csv"].dest == "gldv2/retrieval_solution_v2.1.csv"
    assert f"{base}/ground_truth/recognition_solution_v2.1.csv" in urls
    index_tars = [f for f in files if f.url.startswith(f"{base}/index/")]
    test_tars = [f for f in files if f.url.startswith(f"{base}/test/")]
    assert [f.url for f in index_tars] == [f"{base}/index/images_{i:03d}.tar" for i in range(100)]
    assert [f.url for f in test_tars] == [f"{base}/test/images_{i:03d}.tar" for i in range(20)]
    assert index_tars[7].md5_url == f"{base}/md5sum/index/md5.images_007.txt"
    assert test_tars[19].md5_url == f"{base}/md5sum/test/md5.images_019.txt"
    assert all(f.extract_to == "gldv2/index" and not f.flatten for f in index_tars)
    assert all(f.extract_to == "gldv2/test" and not f.flatten for f in test_tars)
    plan = plan_downloads(tmp_path, ["gldv2-retrieval-test"])
    assert len(plan) == 4 + 100 + 20 and all(p.action == "download" for p in plan)
