"""The demo's query function on a tiny index (no browser): k results captioned rank / score / file name, the
stage timings, re-ranking and post-processing choices, and errors (bad box, unreadable upload, no image) as a
message for the page instead of an exception. The page itself is tested in tests/browser/test_demo.py."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers.retrieval.commands import build_index
from helpers.retrieval.demo_app import DemoState, index_examples, parse_box, post_settings, preview, run_query
from helpers.retrieval.retriever import Retriever

N = 5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> DemoState:
    root = tmp_path_factory.mktemp("demo")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(N):
        coarse = rng.integers(0, 256, size=(12, 14, 3), dtype=np.uint8)
        img = cv2.resize(coarse, (112, 96), interpolation=cv2.INTER_LINEAR)
        assert cv2.imwrite(str(root / "images" / f"img{i}.png"), img)
    build_index(images=root / "images", index_dir=root / "index", scales=[1.0], device="cpu", progress=False)
    retriever = Retriever.load(root / "index")
    return DemoState(index_dir=root / "index", retriever=retriever, examples=index_examples(retriever),
                     random_weights=True)


@pytest.mark.parametrize("rerank,post", [("none", []), ("superglobal", ["α-QE"]),
                                         ("cvnet", ["α-DBA", "k-reciprocal"])])
def test_a_query_gives_k_captioned_results_and_stage_timings(state, rerank, post):
    query = state.examples[1][0]
    gallery, timings, message = run_query(state, query, "", rerank, post, 3)
    assert len(gallery) == 3, message
    ranks, scores, names = zip(*(caption.split("  ") for _, caption in gallery))
    assert ranks == ("#1", "#2", "#3") and names[0] == Path(query).name  # the query image finds itself first
    assert all(len(s.split(".")[1]) >= 4 for s in scores) and len(set(scores)) == 3
    assert all(img.ndim == 3 and img.dtype == np.uint8 for img, _ in gallery)
    for stage in ("read image", "describe query", "metadata", "thumbnails", "total"):
        assert f"| {stage} |" in timings or f"**{stage}**" in timings
    if post:
        assert "| post-processing |" in timings and post_settings(post).describe() in message
    if rerank != "none":
        assert "| re-ranking |" in timings


def test_errors_come_back_as_a_message(state, tmp_path):
    query = state.examples[0][0]
    for box in ("1,2,3", "5,5,5,9", "a,b,c,d"):
        gallery, timings, message = run_query(state, query, box, "none", [], 3)
        assert gallery == [] and timings == "" and "Could not run this query" in message and "box" in message
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    gallery, _, message = run_query(state, str(broken), "", "none", [], 3)
    assert gallery == [] and "Could not run this query" in message and "broken.jpg" in message
    assert run_query(state, None, "", "none", [], 3)[2].startswith("Pick an example")
    assert preview(str(broken), "") is None


def test_a_box_crops_the_query_and_is_drawn_in_the_preview(state):
    query = state.examples[0][0]
    assert parse_box(" 4, 4, 90 ,80") == (4.0, 4.0, 90.0, 80.0) and parse_box("") is None
    whole = run_query(state, query, "", "none", [], N)[0]
    cropped = run_query(state, query, "4,4,60,50", "none", [], N)[0]
    assert [c for _, c in whole] != [c for _, c in cropped]  # the crop is no exact duplicate any more
    plain, boxed = preview(query, ""), preview(query, "4,4,60,50")
    assert plain.shape == boxed.shape and not np.array_equal(plain, boxed)


def test_an_upload_is_decoded_once_by_the_one_reader(state, tmp_path, monkeypatch):
    """Issue 19.5: the demo decoded an upload for the preview and again on Search (a 30000 x 30000 PNG took it
    from 1.95 to 6.39 GB, twice); a PNG over OpenCV's limit came back as OpenCV's assertion text. Now the upload
    goes through the project's reader (the pixel count checked from the header) and is decoded once."""
    import datasets.transforms as transforms
    from tests.support.hostile_images import bomb_png

    decoded, imdecoded = [], []
    real_decode, real_imdecode = transforms.decode_image, cv2.imdecode
    monkeypatch.setattr(transforms, "decode_image",
                        lambda data, **kw: decoded.append(os.fspath(kw["name"])) or real_decode(data, **kw))
    monkeypatch.setattr(cv2, "imdecode", lambda *args: imdecoded.append(1) or real_imdecode(*args))
    upload = tmp_path / "upload.png"
    upload.write_bytes(Path(state.examples[0][0]).read_bytes())
    assert preview(str(upload), "", state) is not None
    gallery, _, message = run_query(state, str(upload), "", "none", [], 2)
    assert len(gallery) == 2, message
    assert decoded.count(str(upload)) == 1, decoded  # the preview's decoding served the search
    before = len(imdecoded)
    for side in (30000, 40000):
        bomb = tmp_path / f"bomb{side}.png"
        bomb_png(bomb, side, side)
        assert preview(str(bomb), "", state) is None
        gallery, _, message = run_query(state, str(bomb), "", "none", [], 2)
        assert gallery == [] and f"{side} x {side}" in message and "is over the limit of 134,217,728" in message
        assert "cv2" not in message and "Assertion" not in message
    assert len(imdecoded) == before  # refused from the header: the decoder never ran on them
