"""helpers.retrieval.images: the folder listing follows symlinked folders once (a loop is skipped and said), says
when the index folder inside the image folder held the images, and load_bgr reads through the one reader."""
import logging
import os

import cv2
import numpy as np
import pytest

from datasets.transforms import CorruptImageError
from helpers.retrieval.images import list_images, load_bgr
from tests.support.hostile_images import bomb_png


def _write(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8))


def test_a_symlinked_folder_is_followed_and_a_loop_is_skipped_and_said(tmp_path, caplog):
    """Issue 19.13: 'indexed 3 images' of 6 reachable: a symlinked sub-folder was never entered, and nothing
    said so. Now it is walked; a link back to a folder already walked is skipped with a warning."""
    top, real = tmp_path / "photos", tmp_path / "elsewhere"
    for i in range(3):
        _write(top / f"a{i}.jpg", i)
        _write(real / f"b{i}.jpg", 3 + i)
    (top / "linked").symlink_to(real, target_is_directory=True)
    (top / "loop").symlink_to(top, target_is_directory=True)
    (top / "again").symlink_to(real, target_is_directory=True)  # a second way into the same folder
    with caplog.at_level(logging.WARNING, logger="helpers.retrieval.images"):
        files = list_images(top)
    assert [p.relative_to(top).as_posix() for p in files] == [
        "a0.jpg", "a1.jpg", "a2.jpg", "again/b0.jpg", "again/b1.jpg", "again/b2.jpg"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "loop" in said and os.fspath(top / "linked") in said and os.fspath(top / "loop") in said


def test_an_index_folder_holding_the_images_is_said(tmp_path, caplog):
    """Issue 19.16: with --index equal to --images every image lay inside the index folder, was left out, and
    the error said only 'no images found'."""
    for i in range(2):
        _write(tmp_path / "photos" / f"{i}.jpg", i)
    with pytest.raises(FileNotFoundError, match=r"2 image file\(s\) there lie inside the index folder .*photos"):
        list_images(tmp_path / "photos", exclude=tmp_path / "photos")
    _write(tmp_path / "photos" / "idx" / "x.jpg")
    with caplog.at_level(logging.WARNING, logger="helpers.retrieval.images"):
        assert len(list_images(tmp_path / "photos", exclude=tmp_path / "photos" / "idx")) == 2
    assert "left out 1 image file(s) inside the index folder" in caplog.text


def test_load_bgr_reads_through_the_one_reader_with_its_limit(tmp_path):
    bomb_png(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(CorruptImageError, match="over the limit"):
        load_bgr(tmp_path / "bomb.png")
    _write(tmp_path / "ok.png")
    with pytest.raises(CorruptImageError, match="768 pixels is over the limit of 700"):
        load_bgr(tmp_path / "ok.png", max_pixels=700)
    assert load_bgr(tmp_path / "ok.png", max_pixels=768).shape == (24, 32, 3)
