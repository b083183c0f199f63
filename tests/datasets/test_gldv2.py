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
