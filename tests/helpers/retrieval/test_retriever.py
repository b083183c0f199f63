"""Retriever: index then query (self first, with each re-ranker), re-ranking equations against direct
computations, descriptors against the models called by hand (the Retriever runs the evaluation's engine), the
CVNet map cache keyed by database id, ids/metadata, save/load, and the error paths.

Random ResNet-50 weights give nearly collinear descriptors (cosine ~0.999 between any two images), so the
shared models have their BatchNorm statistics re-estimated on the test images (a test-only step): descriptors
then differ (cosine ~0.98), which leaves the re-rankers a real ordering to get right.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasets.transforms import to_tensor
from helpers.builders import build_model
from helpers.postprocess import PostProcessing, post_scores
from helpers.retrieval.commands import reranker_for_index
from helpers.retrieval.images import list_images, prepare_image
from helpers.retrieval.retriever import Retriever
from helpers.retrieval.saved import CONFIG_FILE
from helpers.vector_db.tensor import TensorVectorDB
from models.cvnet import CVNetGlobal, CVNetRerank
from models.superglobal import SuperGlobal, SuperGlobalRerank
from tests.support.concurrency import hammer

N_IMAGES = 4


def _image(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth random colour field (uint8 BGR), different for every seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)


def _calibrate_bn(net: torch.nn.Module, images: list[np.ndarray], forward) -> None:
    """Re-estimate BatchNorm running statistics on ``images`` (cumulative average), then eval mode."""
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    net.train()
    batch = torch.stack([to_tensor(cv2.resize(img, (96, 96)), net.input_convention) for img in images])
    with torch.no_grad():
        forward(batch)
    net.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[list[np.ndarray], list[Path]]:
    folder = tmp_path_factory.mktemp("images")
    arrays = [_image(i, 96, 96 + 8 * i) for i in range(N_IMAGES)]
    paths = []
    for i, img in enumerate(arrays):
        path = folder / f"img{i}.png"
        assert cv2.imwrite(str(path), img)
        paths.append(path)
    return arrays, paths


@pytest.fixture(scope="module")
def sg_model(images) -> SuperGlobal:
    torch.manual_seed(0)
    model = SuperGlobal(depth=50, scales=(1.0,))  # one scale keeps the file fast; Scale-GeM is tested in models/
    _calibrate_bn(model, images[0], model)
    return model


@pytest.fixture(scope="module")
def cv_reranker(images) -> CVNetRerank:
    torch.manual_seed(1)
    reranker = CVNetRerank(depth=50)
    _calibrate_bn(reranker, images[0], reranker.extract_featuremap)
    return reranker


@pytest.fixture(scope="module")
def cvnet_global() -> CVNetGlobal:
    torch.manual_seed(2)
    return CVNetGlobal(depth=50).eval()


@pytest.fixture(scope="module")
def indexed(sg_model, images) -> tuple[TensorVectorDB, torch.Tensor]:
    """A database of the five image files, shared read-only by the tests (ids 0..4)."""
    db = TensorVectorDB(2048)
    ids = Retriever(sg_model, db).index(images[1], progress=False)
    return db, ids


def _reranker(kind: str, cv_reranker: CVNetRerank):
    return {"none": None, "superglobal": SuperGlobalRerank(M=400, K=2, beta=0.15), "cvnet": cv_reranker}[kind]


# ------------------------------------------------------------------------------------------------------ search


@pytest.mark.parametrize("kind", ["none", "superglobal", "cvnet"])
def test_query_with_an_indexed_image_finds_it_first(kind, sg_model, cv_reranker, indexed, images):
    db, ids = indexed
    retriever = Retriever(sg_model, db, reranker=_reranker(kind, cv_reranker), rerank_top_k=4)
    for q in (0, 3):
        hits = retriever.query(images[1][q], k=4)
        assert [h.id for h in hits][0] == int(ids[q])
        assert len({h.id for h in hits}) == 4
        assert hits[0].global_score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].path == str(images[1][q].resolve())
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        if kind == "none":
            assert hits[0].score == pytest.approx(1.0, abs=1e-5)
            assert all(h.score == h.global_score for h in hits)
        else:
            assert hits[1].global_score < 0.999  # the images really differ, so the order is not trivial


def test_cvnet_rerank_is_global_plus_mix_times_pair_score(sg_model, cv_reranker, indexed, images):
    db, ids = indexed
    arrays, paths = images
    retriever = Retriever(sg_model, db, reranker=cv_reranker, rerank_top_k=3, mix=0.5, map_cache_size=2)
    hits = retriever.query(paths[1], k=N_IMAGES)

    # reference: global cosine ranking, CVNet score of the top 3 from the maps computed by hand, re-sorted
    with torch.no_grad():
        xq = sg_model(to_tensor(arrays[1], sg_model.input_convention)[None])[0]
        glob = db.get(ids) @ xq
        order = torch.argsort(glob, descending=True, stable=True)

        def maps(img):
            x = to_tensor(img, cv_reranker.input_convention)[None]
            return cv_reranker.reduce_featuremap(cv_reranker.extract_featuremap(x))

        pair = torch.stack([cv_reranker.score_reduced(maps(arrays[1]), maps(arrays[int(j)]))[0] for j in order[:3]])
    head = glob[order[:3]] + 0.5 * pair
    head_order = torch.argsort(head, descending=True, stable=True)
    expected_ids = [int(ids[j]) for j in order[:3][head_order]] + [int(ids[j]) for j in order[3:]]
    expected_scores = torch.cat([head[head_order], glob[order[3:]]])

    assert [h.id for h in hits] == expected_ids
    torch.testing.assert_close(torch.tensor([h.score for h in hits]), expected_scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor([h.global_score for h in hits]),
                               torch.tensor([float(glob[h.id]) for h in hits]), atol=1e-6, rtol=0)
    # LRU cache of reduced maps: capacity 2, the two most recently computed of the three candidates
    cached = retriever.cached_map_ids()
    assert len(cached) == 2 and set(cached) <= {int(ids[j]) for j in order[:3]}
    assert [h.id for h in retriever.query(paths[1], k=N_IMAGES)] == expected_ids  # same with the cache warm


def test_superglobal_rerank_equals_reranking_the_descriptor_tensor(sg_model, indexed, images):
    db, ids = indexed
    reranker = SuperGlobalRerank(M=3, K=1, beta=0.15)
    retriever = Retriever(sg_model, db, reranker=reranker)
    hits = retriever.query(images[0][2], k=N_IMAGES)

    with torch.no_grad():
        xq = sg_model(to_tensor(images[0][2], sg_model.input_convention)[None])
    xb = db.get(ids)
    scores, rows = reranker.rerank(xq, xb)  # the tensor path, over the first M = 3 of the global ranking
    glob_rows = torch.argsort((xb @ xq[0]), descending=True, stable=True).tolist()
    tail = [r for r in glob_rows if r not in rows[0].tolist()]
    assert [h.id for h in hits] == [int(ids[r]) for r in rows[0].tolist() + tail]
    torch.testing.assert_close(torch.tensor([h.score for h in hits[:3]]), scores[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([h.score for h in hits[3:]]), (xb @ xq[0])[tail], atol=1e-5, rtol=0)


def test_query_batch_equals_single_queries_and_bbox_equals_cropping(sg_model, indexed, images):
    db, _ = indexed
    arrays = images[0]
    retriever = Retriever(sg_model, db)
    box = (10.7, 5.2, 90.9, 80.0)
    batch = retriever.query_batch([arrays[1], arrays[2]], k=3, bboxes=[None, box])
    single = retriever.query(arrays[1], k=3)
    cropped = retriever.query(np.ascontiguousarray(arrays[2][5:80, 10:90]), k=3)
    assert [h.id for h in batch[0]] == [h.id for h in single]
    assert [h.score for h in batch[0]] == pytest.approx([h.score for h in single], abs=1e-6)
    assert [h.id for h in batch[1]] == [h.id for h in cropped]
    assert [h.score for h in batch[1]] == pytest.approx([h.score for h in cropped], abs=1e-6)


# ------------------------------------------------------------------------------------------------ descriptors


def test_descriptors_equal_the_models_called_by_hand(sg_model, cvnet_global, images):
    # the engine runs the model with BatchNorm folded into the convs: the same descriptors within 1e-5
    img = images[0][3]
    retriever = Retriever(sg_model, TensorVectorDB(2048))
    with torch.no_grad():
        expected = sg_model(to_tensor(img, sg_model.input_convention)[None])
    torch.testing.assert_close(retriever.describe([img]), expected, atol=1e-5, rtol=0)
    # an RGB array is accepted only when declared, and then means the same image
    rgb = np.ascontiguousarray(img[:, :, ::-1])
    torch.testing.assert_close(retriever.describe([rgb], channel_order="RGB"), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(retriever.describe([rgb]), expected, atol=1e-3)

    # CVNet-Global: OpenCV resize per scale (INTER_AREA down, INTER_LINEAR up), L2 each, mean, L2
    cvnet = cvnet_global
    per_scale = []
    for s, interp in ((0.7071, cv2.INTER_AREA), (1.0, None), (1.4142, cv2.INTER_LINEAR)):
        scaled = img if interp is None else cv2.resize(img, (0, 0), fx=s, fy=s, interpolation=interp)
        with torch.no_grad():
            per_scale.append(F.normalize(cvnet(to_tensor(scaled, cvnet.input_convention)[None]), dim=-1))
    reference = F.normalize(torch.stack(per_scale).mean(0), dim=-1)
    got = Retriever(cvnet, TensorVectorDB(2048)).describe([img])
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_prepare_image_downscales_then_crops_the_scaled_box_then_enlarges():
    img = _image(7, 200, 160)
    got = prepare_image(img, max_side=100, min_side=None, bbox=(40, 20, 160, 180))
    reference = cv2.resize(img, (80, 100), interpolation=cv2.INTER_AREA)[10:90, 20:80]
    np.testing.assert_array_equal(got, reference)
    assert prepare_image(img, max_side=None, min_side=None) is img
    small = prepare_image(_image(8, 64, 80), max_side=1024, min_side=96)
    assert small.shape == (96, 120, 3)


def test_cvnet_maps_are_cached_by_id_and_dropped_when_an_id_is_reindexed(sg_model, cv_reranker, images, tmp_path):
    arrays, paths = images
    db = TensorVectorDB(2048)
    retriever = Retriever(sg_model, db, reranker=cv_reranker, rerank_top_k=2, map_cache_size=8)
    retriever.index(paths[:3], progress=False)
    first = retriever.query(arrays[0], k=3)
    held = retriever.cached_map_ids()
    assert sorted(held) == sorted(h.id for h in first[:2])  # the two re-scored candidates, nothing else

    def reduced(img):
        with torch.no_grad():
            return cv_reranker.reduce_featuremap(cv_reranker.extract_featuremap(
                to_tensor(img, cv_reranker.input_convention)[None]))

    stored = retriever.database_maps([held[0]])[0]  # served from the cache, keyed by database id
    for got, ref in zip(stored, reduced(arrays[held[0]])):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # id held[0] now shows another image: its cached maps must not be used for it any more
    other = tmp_path / "other.png"
    assert cv2.imwrite(str(other), arrays[3])
    retriever.index([other], ids=[held[0]], progress=False)
    assert held[0] not in retriever.cached_map_ids()
    for got, ref in zip(retriever.database_maps([held[0]])[0], reduced(arrays[3])):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    retriever.clear_cache()
    assert retriever.cached_map_ids() == []


def test_a_map_cache_of_zero_keeps_nothing_and_ranks_alike(sg_model, cv_reranker, indexed, images):
    db, _ = indexed
    cached = Retriever(sg_model, db, reranker=cv_reranker, rerank_top_k=3)
    uncached = Retriever(sg_model, db, reranker=cv_reranker, rerank_top_k=3, map_cache_size=0)
    expected = [(h.id, h.score) for h in cached.query(images[1][2], k=N_IMAGES)]
    assert [(h.id, h.score) for h in uncached.query(images[1][2], k=N_IMAGES)] == expected
    assert uncached.cached_map_ids() == [] and len(cached.cached_map_ids()) == 3


def test_list_images_is_recursive_sorted_and_skips_the_index_folder(tmp_path):
    names = ["img0.png", "sub/img1.jpg", "sub/deeper/img2.PNG"]  # nested, mixed and upper-case extensions
    for i, name in enumerate(names):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(tmp_path / name), _image(i, 32, 32))
    (tmp_path / "notes.txt").write_text("not an image")
    assert list_images(tmp_path) == sorted(tmp_path / n for n in names)
    inside = tmp_path / "idx_inside"
    inside.mkdir()
    assert cv2.imwrite(str(inside / "grid.png"), _image(5, 32, 32))
    assert len(list_images(tmp_path, exclude=inside)) == len(names)
    assert len(list_images(tmp_path)) == len(names) + 1
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path / "sub" / "deeper", extensions=(".jpg",))
    with pytest.raises(FileNotFoundError, match="not found"):
        list_images(tmp_path / "nope")


# --------------------------------------------------------------------------------------- ids, metadata, persist


def test_ids_and_metadata_round_trip_and_upsert(sg_model, images):
    arrays, paths = images
    db = TensorVectorDB(2048)
    retriever = Retriever(sg_model, db)
    ids = retriever.index([arrays[0], arrays[1], paths[2]], ids=[10, 20, 30],
                          metadata=[{"label": "a"}, None, {"label": "c"}], progress=False)
    assert ids.tolist() == [10, 20, 30]
    assert db.get_metadata([10, 20, 30]) == [{"label": "a"}, None, {"label": "c", "path": str(paths[2].resolve())}]
    hit = retriever.query(arrays[1], k=1)[0]
    assert (hit.id, hit.metadata, hit.path) == (20, None, None)
    # upsert: indexing under an existing id replaces that entry
    retriever.index([arrays[0]], ids=[20], progress=False)
    assert len(db) == 3
    top = retriever.query(arrays[0], k=2)
    assert {h.id for h in top} == {10, 20} and all(h.global_score == pytest.approx(1.0, abs=1e-5) for h in top)
    # ids continue after the largest stored one by default
    assert retriever.index([arrays[3]], progress=False).tolist() == [31]


@pytest.mark.parametrize("backend", ["tensor", "faiss"])
def test_save_then_load_gives_identical_results(backend, sg_model, indexed, images, tmp_path):
    db, ids = indexed
    if backend == "faiss":
        from helpers.vector_db.faiss import FaissVectorDB

        copy = FaissVectorDB(2048, index="flat")
        copy.add(db.get(ids), ids, db.get_metadata(ids))
        db = copy
    retriever = Retriever(sg_model, db, rerank_top_k=7, max_side=512)
    before = retriever.query_batch([images[1][0], images[1][3]], k=4)
    retriever.save(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["model"]["class"] == "SuperGlobal" and config["model"]["depth"] == 50
    assert config["database"]["backend"] == backend and config["count"] == N_IMAGES

    loaded = Retriever.load(tmp_path, sg_model)
    assert (loaded.rerank_top_k, loaded.max_side) == (7, 512)
    after = loaded.query_batch([images[1][0], images[1][3]], k=4)
    assert [[(h.id, h.score, h.metadata) for h in hits] for hits in after] == \
        [[(h.id, h.score, h.metadata) for h in hits] for hits in before]


def test_load_rebuilds_a_seeded_random_model(images, tmp_path):
    model = build_model("superglobal", depth=50, seed=3, options={"scales": [1.0]})
    retriever = Retriever(model, TensorVectorDB(2048), seed=3)
    retriever.index(images[1][:2], progress=False)
    before = retriever.query(images[0][1], k=2)
    retriever.save(tmp_path)
    loaded = Retriever.load(tmp_path)  # no model given: rebuilt from the recorded seed and options
    assert loaded.model is not model and loaded.model.scales == (1.0,)
    assert [(h.id, h.score) for h in loaded.query(images[0][1], k=2)] == [(h.id, h.score) for h in before]


def test_load_refuses_another_model(sg_model, cvnet_global, indexed, tmp_path):
    db, _ = indexed
    Retriever(sg_model, db).save(tmp_path)
    torch.manual_seed(5)
    other_weights = SuperGlobal(depth=50, scales=(1.0,))
    with pytest.raises(ValueError, match="fingerprint"):
        Retriever.load(tmp_path, other_weights)
    assert len(Retriever.load(tmp_path, other_weights, check_weights=False)) == N_IMAGES
    with pytest.raises(ValueError, match="class"):
        Retriever.load(tmp_path, cvnet_global)
    with pytest.raises(ValueError, match="options"):  # other scales: other descriptors
        Retriever.load(tmp_path, SuperGlobal(depth=50))


# ------------------------------------------------------------------------------------------------------ errors


def test_errors(sg_model, cv_reranker, images, tmp_path):
    arrays, paths = images
    with pytest.raises(ValueError, match=r"128-d.*2048-d"):
        Retriever(sg_model, TensorVectorDB(128))
    with pytest.raises(TypeError, match="CVNetGlobal, SuperGlobal, TimmGlobal, got CVNetRerank"):
        Retriever(cv_reranker, TensorVectorDB(2048))

    retriever = Retriever(sg_model, TensorVectorDB(2048), reranker=cv_reranker)
    with pytest.raises(ValueError, match="empty"):
        retriever.query(arrays[0])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.jpg"):
        retriever.index([paths[0], broken], progress=False)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        retriever.index([tmp_path / "missing.png"], progress=False)
    assert len(retriever.database) == 0  # nothing written by a failing batch
    ids = retriever.index([broken, paths[0]], on_error="skip", progress=False)
    assert ids.tolist() == [-1, 0] and len(retriever.database) == 1

    retriever.index([arrays[1]], progress=False)  # id 1, indexed from an array: no path to re-read
    with pytest.raises(ValueError, match="database id 1 has no stored image path"):
        retriever.query(arrays[1], k=2)

    with pytest.raises(ValueError, match="ids"):
        retriever.index([arrays[0], arrays[1]], ids=[3], progress=False)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        retriever.index([arrays[0][:, :, 0]], progress=False)
    with pytest.raises(ValueError, match="channel_order"):
        retriever.describe([arrays[0]], channel_order="GRB")
    with pytest.raises(ValueError, match="k must be"):
        retriever.query(arrays[0], k=0)
    with pytest.raises(ValueError, match="bbox"):
        retriever.query(arrays[0], bbox=(1, 2, 3))


# ------------------------------------------------------------------------------------- nothing silently wrong


@pytest.mark.parametrize("kind", ["none", "superglobal"])
def test_a_huge_k_is_capped_at_the_database_size(kind, sg_model, cv_reranker, indexed, images):
    """Issue 19.10: --k 1000000000000 tried to allocate 4 TB (the search padded its result to k). A query asks
    for at most what the database holds."""
    db, _ = indexed
    retriever = Retriever(sg_model, db, reranker=_reranker(kind, cv_reranker))
    hits = retriever.query(images[0][2], k=10**12)
    assert len(hits) == N_IMAGES and hits[0].id == 2
    assert [h.id for h in hits] == [h.id for h in retriever.query(images[0][2], k=N_IMAGES)]


def test_an_image_over_the_pixel_limit_is_skipped_and_counted(sg_model, images, tmp_path, caplog):
    """Issue 19.6: an image OpenCV refused (cv2.error) aborted a --skip-unreadable build; an image over the
    limit is skipped and counted like any unreadable one, and refused with one error without it."""
    from tests.support.hostile_images import bomb_png

    bomb_png(tmp_path / "bomb.png", 40000, 40000)
    retriever = Retriever(sg_model, TensorVectorDB(2048))
    with caplog.at_level("WARNING", logger="helpers.retrieval.retriever"):
        ids = retriever.index([images[1][0], tmp_path / "bomb.png"], on_error="skip", progress=False)
    assert ids.tolist() == [0, -1] and "1 of 2 images were skipped" in caplog.text
    with pytest.raises(ValueError, match=r"bomb\.png.*over the limit"):
        retriever.index([tmp_path / "bomb.png"], progress=False)
    small = Retriever(sg_model, TensorVectorDB(2048), max_pixels=96 * 96)
    with pytest.raises(ValueError, match=r"img1\.png: 104 x 96 = 9,984 pixels is over the limit of 9,216"):
        small.index([images[1][1]], progress=False)
    with pytest.raises(ValueError, match="max_pixels"):
        Retriever(sg_model, TensorVectorDB(2048), max_pixels=0)



def _hits(hit_lists):
    return [[(h.id, round(h.score, 6)) for h in hits] for hits in hit_lists]


@pytest.mark.parametrize("kind", ["none", "superglobal", "cvnet_seeded", "cvnet_unknown"])
def test_save_and_load_restore_the_reranker(kind, sg_model, cv_reranker, indexed, images, tmp_path):
    """Issue 11.4: the re-ranker came back as None. Kind and settings (SuperGlobal's M, K, beta; CVNet's weights
    source and seed, or its weights saved with the index) are restored."""
    db, _ = indexed
    extra = {}
    if kind == "superglobal":
        reranker = SuperGlobalRerank(M=3, K=2, beta=0.3)
    elif kind == "cvnet_seeded":
        reranker = build_model("cvnet_rerank", depth=50, seed=4)
        extra = {"rerank_seed": 4}
    else:
        reranker = None if kind == "none" else cv_reranker  # cv_reranker: of unknown origin (seed + BN fit)
    retriever = Retriever(sg_model, db, reranker=reranker, rerank_top_k=3, **extra)
    queries = [images[0][1], images[0][2]]
    before = retriever.query_batch(queries, k=3)
    retriever.save(tmp_path)
    for given in (sg_model, None):  # None: the model too is rebuilt (from its weights saved with the index)
        loaded = Retriever.load(tmp_path, given)
        assert loaded.rerank_top_k == 3
        if kind == "none":
            assert loaded.reranker is None
        elif kind == "superglobal":
            assert isinstance(loaded.reranker, SuperGlobalRerank)
            assert (loaded.reranker.M, loaded.reranker.K, loaded.reranker.beta) == (3, 2, 0.3)
        else:
            assert isinstance(loaded.reranker, CVNetRerank) and loaded.reranker is not cv_reranker
            assert loaded.rerank_seed == (4 if kind == "cvnet_seeded" else None)
        assert _hits(loaded.query_batch(queries, k=3)) == _hits(before)
    assert Retriever.load(tmp_path, reranker=None).reranker is None  # an explicit choice still wins


def test_an_index_of_a_model_of_unknown_origin_loads(sg_model, indexed, images, tmp_path):
    """Issue 11.4: an index built with random weights could not be loaded unless a seed was recorded; with no
    file and no seed known, the weights are saved with the index."""
    db, _ = indexed
    retriever = Retriever(sg_model, db)  # sg_model: random weights, BN re-estimated; no weights=, no seed=
    before = retriever.query(images[0][1], k=3)
    retriever.save(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["model"]["checkpoint"] in config["files"]
    loaded = Retriever.load(tmp_path)
    assert loaded.model is not sg_model
    assert _hits([loaded.query(images[0][1], k=3)]) == _hits([before])
    seeded = Retriever(build_model("superglobal", depth=50, seed=3, options={"scales": [1.0]}), TensorVectorDB(2048),
                       seed=3)
    seeded.save(tmp_path / "seeded")
    assert json.loads((tmp_path / "seeded" / CONFIG_FILE).read_text())["model"]["checkpoint"] is None  # seed: enough


def _save_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != ".retriever.lock")


@pytest.mark.parametrize("backend", ["tensor", "faiss"])
def test_a_save_killed_before_retriever_json_leaves_the_old_save(backend, indexed, images, tmp_path, monkeypatch):
    """Issue 11.3: Retriever.save wrote the database, then retriever.json; killed between the two, the folder held
    the new database under the old description. Now the old save loads whole, and the next save tidies up."""
    import helpers.retrieval.saved as saved_format
    from helpers.builders import make_database

    model = build_model("superglobal", depth=50, seed=3, options={"scales": [1.0]})
    retriever = Retriever(model, make_database(backend, 2048), seed=3, rerank_top_k=5)
    retriever.index(images[1][:2], progress=False)
    retriever.save(tmp_path)
    saved = _save_files(tmp_path)
    retriever.index(images[1][2:], progress=False)
    retriever.rerank_top_k = 9
    monkeypatch.setattr(saved_format, "atomic_write", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        retriever.save(tmp_path)  # dies after writing the new database, before retriever.json names it
    monkeypatch.undo()
    loaded = Retriever.load(tmp_path, model)
    assert (len(loaded), loaded.rerank_top_k) == (2, 5)
    assert len(_save_files(tmp_path)) == len(saved) + 1  # the new database, named by nothing
    retriever.save(tmp_path)
    assert len(_save_files(tmp_path)) == len(saved)  # the old save's files and the orphan are gone
    assert (len(Retriever.load(tmp_path, model)), Retriever.load(tmp_path, model).rerank_top_k) == (4, 9)


def test_concurrent_saves_and_loads_never_fail_or_mix(images, tmp_path, monkeypatch):
    """Issue 11.3: two writers saving into one folder while a reader loads: no load fails, and each is one save
    whole (its database with its settings)."""
    import helpers.retrieval.saved as saved_format

    monkeypatch.setattr(saved_format, "state_dict_hash", lambda model: "fixed")  # hashing 100 MB costs time
    model = build_model("superglobal", depth=50, seed=3, options={"scales": [1.0]})
    vectors = F.normalize(torch.randn(5, 2048, generator=torch.Generator().manual_seed(0)), dim=1)
    writers = []
    for n, top_k in ((2, 3), (5, 7)):
        db = TensorVectorDB(2048)
        db.add(vectors[:n])
        writers.append(Retriever(model, db, seed=3, rerank_top_k=top_k))
    writers[0].save(tmp_path)

    def check(loaded):
        assert len(loaded) == {3: 2, 7: 5}[loaded.rerank_top_k]

    loads, failures = hammer(lambda: writers[0].save(tmp_path), lambda: writers[1].save(tmp_path),
                              lambda: Retriever.load(tmp_path, model), check, seconds=3.0, max_loads=150)
    assert loads >= 10 and failures == [], f"{len(failures)} of {loads} loads failed: {failures[:3]}"
    assert len(_save_files(tmp_path)) == 2  # retriever.json and one database: nothing left behind


def test_max_side_holds_after_min_side_upscaling(sg_model):
    """Issue 11.6: a 10 x 4000 image became 96 x 32768 (104 s, 3 GB). The short side is enlarged only as far as
    the long side allows, then padded with its edge pixels."""
    strip = np.tile(np.arange(4000, dtype=np.uint8)[None, :, None], (10, 1, 3))
    out = prepare_image(strip, max_side=1024, min_side=96)
    assert out.shape == (96, 1024, 3)
    described = Retriever(sg_model, TensorVectorDB(2048)).describe([strip])
    assert described.shape == (1, 2048) and bool(torch.isfinite(described).all())
    assert prepare_image(strip.transpose(1, 0, 2), max_side=1024, min_side=96).shape == (1024, 96, 3)
    # within the aspect limit nothing changes: min_size_guard's enlargement, exactly
    from datasets.transforms import min_size_guard

    wide = _image(0, 40, 300)
    assert np.array_equal(prepare_image(wide, max_side=1024, min_side=96), min_size_guard(wide, 96))
    assert prepare_image(wide, max_side=None, min_side=96).shape == (96, 720, 3)
    # the padding repeats the edge rows: the middle rows are the resized picture
    from datasets.transforms import enlarge_within

    thin = _image(1, 8, 800)
    fitted = enlarge_within(thin, min_side=96, max_side=1024)
    assert fitted.shape == (96, 1024, 3)
    content = cv2.resize(thin, (1024, 10), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(fitted[43:53], content)
    assert (fitted[:43] == content[0]).all() and (fitted[53:] == content[-1]).all()


def test_nan_descriptors_name_the_image_and_the_weights(images):
    """Issue 11.1, through the retriever: the engine's check names the file and where the weights came from."""
    model = build_model("superglobal", depth=50, seed=3, options={"scales": [1.0]})
    with torch.no_grad():
        model.backbone.bn1.weight[0] = float("nan")
    retriever = Retriever(model, TensorVectorDB(2048), seed=3)
    with pytest.raises(ValueError, match=rf"NaN/Inf descriptors.*{images[1][0].name}.*random \(seed 3\)"):
        retriever.index([images[1][0]], progress=False)
    assert len(retriever.database) == 0


def test_a_save_of_the_older_layout_loads_and_is_replaced_whole(images, tmp_path):
    """Folders saved before per-save file names (database.pt, retriever.json without file hashes or re-ranker)
    load as before; the next save replaces them and removes the old database file."""
    model = build_model("superglobal", depth=50, seed=3, options={"scales": [1.0]})
    retriever = Retriever(model, TensorVectorDB(2048), seed=3)
    retriever.index(images[1][:2], progress=False)
    retriever.save(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / config["database"]["file"]).rename(tmp_path / "database.pt")
    config["database"]["file"] = "database.pt"
    for key in ("files", "reranker"):
        del config[key]
    del config["model"]["checkpoint"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    loaded = Retriever.load(tmp_path)
    assert len(loaded) == 2 and loaded.reranker is None and loaded.seed == 3
    loaded.save(tmp_path)
    assert not (tmp_path / "database.pt").exists() and len(Retriever.load(tmp_path, model)) == 2


# ------------------------------------------------------------------------- post-processing, timings, flip, timm

POST = PostProcessing(aqe_k=1, aqe_alpha=3.0, dba_k=1, dba_alpha=3.0, kreciprocal=True, k1=3, k2=2, shortlist=3)


@pytest.mark.parametrize("post", [POST, PostProcessing(aqe_k=2, aqe_alpha=0.0, shortlist=N_IMAGES)])
def test_post_processing_reorders_the_global_shortlist_and_reports_its_scores(post, sg_model, indexed, images):
    db, ids = indexed
    retriever = Retriever(sg_model, db)
    timings: dict[str, float] = {}
    hits = retriever.query(images[0][2], k=N_IMAGES, post=post, timings=timings)

    # reference: the global ranking's top `shortlist`, ordered by post_scores of the stored vectors; the rest after
    xq = retriever.describe([images[0][2]])[0]
    xb = db.get(ids)
    glob = xb @ xq
    order = torch.argsort(glob, descending=True, stable=True)
    t = min(post.shortlist, N_IMAGES)
    head = post_scores(xq, xb[order[:t]], post)
    head_order = torch.argsort(head, descending=True, stable=True)
    expected = [int(ids[j]) for j in order[:t][head_order]] + [int(ids[j]) for j in order[t:]]
    assert [h.id for h in hits] == expected
    torch.testing.assert_close(torch.tensor([h.score for h in hits[:t]]), head[head_order], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([h.global_score for h in hits]),
                               torch.tensor([float(glob[int((ids == h.id).nonzero())]) for h in hits]),
                               atol=1e-5, rtol=0)
    assert set(timings) == {"prepare query", "describe query", "search", "post-processing", "metadata"}
    assert all(v >= 0 for v in timings.values())
    # an inactive PostProcessing is the plain global search
    plain = retriever.query(images[0][2], k=N_IMAGES, post=PostProcessing())
    assert [h.id for h in plain] == [int(ids[j]) for j in order]


def test_rerankers_work_over_the_post_processed_order(sg_model, cv_reranker, indexed, images):
    db, ids = indexed
    # SuperGlobal: its re-ranking of the post-processed top M
    sg = SuperGlobalRerank(M=2, K=1, beta=0.15)
    retriever = Retriever(sg_model, db, reranker=sg, post=POST)
    timings: dict[str, float] = {}
    hits = retriever.query(images[0][1], k=N_IMAGES, timings=timings)
    assert "re-ranking" in timings and "post-processing" in timings
    post_only = Retriever(sg_model, db, post=POST).query(images[0][1], k=N_IMAGES)
    xq = retriever.describe([images[0][1]])
    top = torch.tensor([h.id for h in post_only[:2]])
    scores, order = sg.rerank_candidates(xq, db.get(top)[None], top[None])
    assert [h.id for h in hits] == order[0].tolist() + [h.id for h in post_only[2:]]
    torch.testing.assert_close(torch.tensor([h.score for h in hits[:2]]), scores[0], atol=1e-5, rtol=0)
    # CVNet: global cosine + mix * pair score over the post-processed top rerank_top_k, re-sorted among themselves
    retriever = Retriever(sg_model, db, reranker=cv_reranker, rerank_top_k=2, mix=0.5, post=POST)
    hits = retriever.query(images[1][1], k=N_IMAGES)
    post_only = Retriever(sg_model, db, post=POST).query(images[1][1], k=N_IMAGES)
    assert {h.id for h in hits[:2]} == {h.id for h in post_only[:2]}
    assert [h.id for h in hits[2:]] == [h.id for h in post_only[2:]]
    assert hits[0].id == int(ids[1])  # the query image itself
    assert [h.score for h in hits[2:]] == pytest.approx([h.score for h in post_only[2:]], abs=1e-6)
    assert hits[0].score > hits[0].global_score  # the CVNet score of an image with itself is positive


def test_timings_of_each_reranker(sg_model, cv_reranker, indexed, images):
    db, _ = indexed
    for kind, stages in (("none", {"search"}), ("superglobal", {"re-ranking"}),
                         ("cvnet", {"search", "re-ranking"})):
        timings: dict[str, float] = {}
        Retriever(sg_model, db, reranker=_reranker(kind, cv_reranker), rerank_top_k=2).query(
            images[1][0], k=2, timings=timings)
        assert set(timings) == {"prepare query", "describe query", "metadata"} | stages, kind


def test_flip_describes_every_image_as_l2_of_it_and_its_mirror(sg_model, images, tmp_path):
    img = images[0][1]
    plain = Retriever(sg_model, TensorVectorDB(2048))
    flipped = Retriever(sg_model, TensorVectorDB(2048), flip=True)
    mirror = np.ascontiguousarray(img[:, ::-1])
    expected = F.normalize(plain.describe([img]) + plain.describe([mirror]), dim=-1)
    torch.testing.assert_close(flipped.describe([img]), expected, atol=1e-5, rtol=0)
    ids = flipped.index(images[1], progress=False)
    torch.testing.assert_close(flipped.database.get(ids[:1]), flipped.describe([images[1][0]]), atol=1e-6, rtol=0)
    flipped.post = POST
    flipped.save(tmp_path)
    settings = json.loads((tmp_path / CONFIG_FILE).read_text())["settings"]
    assert settings["flip"] is True and settings["post"]["k1"] == 3
    loaded = Retriever.load(tmp_path, sg_model)
    assert loaded.flip and loaded.post == POST


def test_a_timm_model_indexes_queries_saves_and_loads(images, tmp_path):
    model = build_model("timm:resnet18", seed=4, warn_random=False)
    retriever = Retriever(model, TensorVectorDB(512), seed=4, scales=(1.0,))
    ids = retriever.index(images[1], progress=False)
    hits = retriever.query(images[0][2], k=2)
    assert hits[0].id == int(ids[2]) and hits[0].score == pytest.approx(1.0, abs=1e-5)
    retriever.save(tmp_path / "seeded")
    config = json.loads((tmp_path / "seeded" / CONFIG_FILE).read_text())["model"]
    assert config["class"] == "TimmGlobal" and config["options"]["model_name"] == "resnet18"
    loaded = Retriever.load(tmp_path / "seeded")  # rebuilt from the seed
    assert [(h.id, h.score) for h in loaded.query(images[0][2], k=2)] == [(h.id, h.score) for h in hits]
    with pytest.raises(ValueError, match="rerank_weights"):
        reranker_for_index(tmp_path / "seeded", "cvnet")
    unknown = Retriever(model, retriever.database, scales=(1.0,))  # no file, no seed: the weights go with the save
    unknown.save(tmp_path / "unknown")
    again = Retriever.load(tmp_path / "unknown")
    assert [(h.id, h.score) for h in again.query(images[0][2], k=2)] == [(h.id, h.score) for h in hits]


def test_reranker_for_index_builds_each_kind(images, tmp_path):
    model = build_model("superglobal", depth=50, seed=3, options={"scales": [1.0]}, warn_random=False)
    retriever = Retriever(model, TensorVectorDB(2048), seed=3)
    retriever.index(images[1][:2], progress=False)
    retriever.save(tmp_path)
    assert reranker_for_index(tmp_path, "none") is None
    sg = reranker_for_index(tmp_path, "superglobal", M=5, K=2, beta=0.2)
    assert isinstance(sg, SuperGlobalRerank) and (sg.M, sg.K, sg.beta) == (5, 2, 0.2)
    cv = reranker_for_index(tmp_path, "cvnet")  # random like the index: the same seed
    expected = build_model("cvnet_rerank", depth=50, seed=3, warn_random=False)
    assert isinstance(cv, CVNetRerank)
    assert all(torch.equal(a, b) for a, b in zip(cv.state_dict().values(), expected.state_dict().values()))
    with pytest.raises(ValueError, match="rerank must be one of"):
        reranker_for_index(tmp_path, "dino")


def test_the_writer_lock_refuses_a_second_writer_and_is_reentrant_in_its_thread(tmp_path):
    """Issue 19.2: a build holds the folder's writer lock from its 'already holds an index' check to its save."""
    import threading

    from common.errors import ProjectIOError, ProjectRuntimeError
    from helpers.retrieval.saved import writer_lock

    outcome = []
    with writer_lock(tmp_path / "idx", wait=False):
        with writer_lock(tmp_path / "idx"):  # the build's own save: no wait on itself
            pass

        def other() -> None:
            try:
                with writer_lock(tmp_path / "idx", wait=False):
                    outcome.append("entered")
            except ProjectRuntimeError as exc:
                outcome.append(str(exc))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=60)
    assert len(outcome) == 1 and "idx is being written by another build or save" in outcome[0]
    with writer_lock(tmp_path / "idx", wait=False):  # released: the next writer gets it
        pass
    (tmp_path / "file").write_text("")
    with pytest.raises(ProjectIOError, match=r"could not create the folder .*file/idx: \[Errno 20\]"):
        with writer_lock(tmp_path / "file" / "idx"):
            pass


# ------------------------------------------------------------------------------------------------------ devices


class _Stop(Exception):
    pass


@pytest.mark.parametrize("post", [None, PostProcessing(aqe_k=1)])
def test_superglobal_re_ranking_runs_on_the_retriever_s_device_in_both_paths(post, sg_model, indexed, images,
                                                                            monkeypatch):
    """With or without post-processing, SuperGlobal re-ranks on ``Retriever.device`` (a stand-in device here,
    "meta", whose tensors have shapes only: the spies stop the query once the re-ranker has its input)."""
    db, _ = indexed
    reranker = SuperGlobalRerank(M=3, K=1, beta=0.15)
    retriever = Retriever(sg_model, db, reranker=reranker)
    queries = retriever.describe([images[0][1]])
    seen = []

    def spy(queries, *rest):
        seen.append(queries.device)
        raise _Stop

    monkeypatch.setattr(retriever, "_describe_prepared", lambda prepared, names=None: queries)
    monkeypatch.setattr(reranker, "rerank", spy)
    monkeypatch.setattr(reranker, "rerank_candidates", spy)
    retriever.device = torch.device("meta")
    with pytest.raises(_Stop):
        retriever.query(images[0][1], k=3, post=post)
    assert seen == [torch.device("meta")]


def test_a_loaded_database_is_opened_on_the_retriever_s_device(sg_model, indexed, tmp_path, monkeypatch):
    import helpers.retrieval.saved as saved
    from tests.support.spies import recording

    db, _ = indexed
    Retriever(sg_model, db).save(tmp_path)
    calls: list = []
    monkeypatch.setattr(saved, "load_database", recording(calls, saved.load_database))
    loaded = Retriever.load(tmp_path, sg_model, device="cpu")
    assert calls == [{"device": "cpu"}] and loaded.database.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_database_and_both_superglobal_paths_follow_the_model(sg_model, indexed, images, tmp_path):
    db, _ = indexed
    Retriever(sg_model, db).save(tmp_path)
    on_cpu = Retriever.load(tmp_path, sg_model, reranker=SuperGlobalRerank(M=3, K=1, beta=0.15))
    try:
        on_gpu = Retriever.load(tmp_path, sg_model, reranker=SuperGlobalRerank(M=3, K=1, beta=0.15), device="cuda")
        assert on_gpu.database.device.type == "cuda"
        for post in (None, PostProcessing(aqe_k=1)):
            got = on_gpu.query(images[0][1], k=N_IMAGES, post=post)
            want = on_cpu.query(images[0][1], k=N_IMAGES, post=post)
            assert [h.id for h in got] == [h.id for h in want]
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-4)
    finally:
        sg_model.cpu()  # the shared model goes back where the other tests use it
