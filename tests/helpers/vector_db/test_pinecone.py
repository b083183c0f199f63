"""PineconeVectorDB through the real Pinecone SDK, against the local server in tests/support/pinecone_server.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("pinecone", reason="the Pinecone SDK is not installed (pip install pinecone)")

from helpers.vector_db.pinecone import (  # noqa: E402
    MAX_UPSERT_BYTES,
    PineconeVectorDB,
    PineconeWriteError,
    default_batch_size,
    id_to_str,
    is_transient,
    plan_batches,
    str_to_id,
)
from tests.support.pinecone_server import FakePinecone

D = 16
KEY = "test-key"


def unit_rows(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake():
    with FakePinecone(D, api_key=KEY) as server:
        yield server


def connect(server, **kwargs) -> PineconeVectorDB:
    kwargs = {"max_retries": 2, "backoff": 0.001, "progress": False, **kwargs}
    return PineconeVectorDB(server.dim, host=server.host, api_key=KEY, **kwargs)


def brute_force(xb, xb_ids, xq, k):
    sims = xq.astype(np.float64) @ xb.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), xb_ids[order]


def test_upsert_search_get_delete_against_numpy(fake):
    xb, xq = unit_rows(150), unit_rows(6, seed=1)
    db = connect(fake)
    ids = np.arange(150) * 7 + 3
    assert db.add(torch.from_numpy(xb), ids=ids).tolist() == ids.tolist()
    assert len(db) == 150 and len(fake.stored()) == 150
    scores, got = db.search(xq, 10)
    ref_s, ref_i = brute_force(xb, ids, xq, 10)
    assert scores.dtype == torch.float32 and got.dtype == torch.int64
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-5)
    assert np.array_equal(got.numpy(), ref_i)
    np.testing.assert_allclose(db.get(ids[[4, 0, 9]]).numpy(), xb[[4, 0, 9]], atol=1e-6)

    dead = ids[::3]
    db.delete(dead)
    keep = ~np.isin(ids, dead)
    assert len(db) == int(keep.sum()) and sorted(map(int, fake.stored())) == sorted(ids[keep].tolist())
    scores, got = db.search(xq, 10)
    ref_s, ref_i = brute_force(xb[keep], ids[keep], xq, 10)
    np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-5)
    assert np.array_equal(got.numpy(), ref_i)
    with pytest.raises(KeyError, match=str(int(dead[1]))):
        db.get(dead[1:2])


def test_vectors_round_trip_through_a_fresh_client_without_cache(fake):
    xb = unit_rows(40)
    connect(fake).add(xb, metadata=[{"path": f"img{i}.jpg"} for i in range(40)])
    reader = connect(fake, cache_vectors=False)
    np.testing.assert_allclose(reader.get([39, 0, 5]).numpy(), xb[[39, 0, 5]], atol=1e-6)
    assert reader.get_metadata([2, 3]) == [{"path": "img2.jpg"}, {"path": "img3.jpg"}]
    assert reader.ids().tolist() == list(range(40))
    assert reader.add(unit_rows(2, seed=3)).tolist() == [40, 41]  # next free ids, found by listing
    with pytest.raises(KeyError, match=r"\[77\]"):
        reader.delete([1, 77])
    assert len(reader) == 42  # nothing deleted


def test_int64_ids_are_decimal_strings_on_the_server(fake):
    db = connect(fake)
    big = [2**62 + 5, 0, 123456789012]
    db.add(unit_rows(3), ids=big)
    assert sorted(fake.stored()) == sorted(str(i) for i in big)
    assert db.search(unit_rows(3)[:1], 1)[1].item() == big[0]
    assert [str_to_id(id_to_str(i)) for i in big] == big
    for bad in ("007", "abc", "-1", "1.5", "", "99999999999999999999"):
        with pytest.raises(ValueError, match="not an int64 id"):
            str_to_id(bad)


def test_batches_respect_explicit_size_and_request_limits(fake):
    db = connect(fake, batch_size=7)
    db.add(unit_rows(30))
    sizes = sorted(r.n_records for r in fake.requests_to("/vectors/upsert"))
    assert sizes == [2, 7, 7, 7, 7]
    # fetch and delete: at most 1,000 ids a request
    db2 = connect(fake, namespace="big", batch_size=1000)
    db2.add(unit_rows(1500, seed=2))
    assert max(r.n_records for r in fake.requests_to("/vectors/upsert")) == 1000
    reader = connect(fake, namespace="big", cache_vectors=False)
    assert reader.get(np.arange(1500)).shape == (1500, D)
    assert sorted(r.n_records for r in fake.requests_to("/vectors/fetch")) == [500, 1000]
    db2.delete(np.arange(1500))
    assert sorted(r.n_records for r in fake.requests_to("/vectors/delete")) == [500, 1000]
    assert len(db2) == 0


def test_default_batches_stay_under_two_megabytes_at_d2048():
    d = 2048
    assert 50 <= default_batch_size(d) <= 100
    with FakePinecone(d, api_key=KEY) as server:
        db = connect(server)
        db.add(unit_rows(130, d=d), metadata=[{"name": "x" * 50}] * 130)
        ups = server.requests_to("/vectors/upsert")
        assert all(r.status == 200 and r.body_bytes <= MAX_UPSERT_BYTES for r in ups)
        assert max(r.body_bytes for r in ups) > MAX_UPSERT_BYTES // 2  # batches are not needlessly small
        assert sum(r.n_records for r in ups) == 130 and len(server.stored()) == 130


def test_plan_batches_obeys_both_limits():
    sizes = [10, 10, 30, 5, 5, 5, 40, 1]
    batches = plan_batches(sizes, max_records=3, max_bytes=40)
    assert [list(b) for b in batches] == [[0, 1], [2, 3, 4], [5], [6], [7]]
    for b in batches:
        assert len(b) <= 3 and (sum(sizes[i] for i in b) <= 40 or len(b) == 1)


def test_transient_failure_of_a_batch_is_retried_until_written(fake):
    db = connect(fake, batch_size=10, max_retries=8)
    fake.fail_ids = {"5": 1, "25": 6}  # "25" outlasts the SDK's own retries, so this class's retry is needed
    db.add(unit_rows(40))
    assert sorted(map(int, fake.stored())) == list(range(40))
    attempts = [r for r in fake.requests_to("/vectors/upsert") if "25" in r.ids]
    assert len(attempts) == 7 and [r.status for r in attempts][-1] == 200


def test_persistent_failure_names_exactly_the_ids_not_written(fake):
    db = connect(fake, batch_size=10)
    fake.fail_ids = {"13": math.inf, "31": math.inf}
    xb = unit_rows(40)
    with pytest.raises(PineconeWriteError, match="20 of 40") as info:
        db.add(xb)
    lost = list(range(10, 20)) + list(range(30, 40))
    assert info.value.failed_ids.tolist() == lost
    assert str(lost) in str(info.value)
    assert sorted(map(int, fake.stored())) == list(range(10)) + list(range(20, 30))
    # the local cache holds only what was written
    with pytest.raises(KeyError):
        db.get([10])
    np.testing.assert_allclose(db.get([29]).numpy(), xb[29:30], atol=1e-6)


def test_verify_catches_acknowledged_but_lost_writes(fake):
    fake.drop_ids = {"3", "8"}
    with pytest.raises(PineconeWriteError, match="does not hold 2 ids") as info:
        connect(fake).add(unit_rows(10))
    assert info.value.failed_ids.tolist() == [3, 8]


def test_ids_the_server_did_not_store_are_not_served_from_the_local_cache(fake):
    """Issue 11.11: a vector acknowledged but not stored was named as failed, yet `5 in db` was True and
    get([5]) answered from the local cache."""
    fake.drop_ids = {"5"}
    db = connect(fake)
    xb = unit_rows(10)
    with pytest.raises(PineconeWriteError, match=r"does not hold 1 ids: \[5\]") as info:
        db.add(xb)
    assert info.value.failed_ids.tolist() == [5]
    assert 5 not in db and 4 in db and 6 in db
    with pytest.raises(KeyError, match=r"\[5\]"):
        db.get([5])
    with pytest.raises(KeyError, match=r"\[5\]"):
        db.get_metadata([5])
    np.testing.assert_allclose(db.get([4, 6]).numpy(), xb[[4, 6]], atol=1e-6)
    assert 5 not in db.ids().tolist() and len(db) == 9


def test_top400_with_vectors_never_asks_queries_for_values(fake):
    xb, xq = unit_rows(500), unit_rows(5, seed=4)
    ids = np.arange(500) + 10_000
    for cache in (True, False):
        namespace = f"cache-{cache}"
        writer = connect(fake, namespace=namespace, cache_vectors=cache)
        writer.add(xb, ids=ids)
        db = writer if cache else connect(fake, namespace=namespace, cache_vectors=False)
        n_fetch = len(fake.requests_to("/vectors/fetch"))
        scores, got, vecs = db.search_with_vectors(xq, 400)
        assert vecs.shape == (5, 400, D)
        ref_s, ref_i = brute_force(xb, ids, xq, 400)
        np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-5)
        assert np.array_equal(got.numpy(), ref_i)
        np.testing.assert_allclose(vecs.numpy(), xb[got.numpy() - 10_000], atol=1e-6)
        fetches = fake.requests_to("/vectors/fetch")[n_fetch:]
        assert (len(fetches) == 0) == cache  # the cache answers, or the vectors are fetched
        assert all(r.n_records <= 1000 for r in fetches)
        assert sum(r.n_records for r in fetches) == (0 if cache else len(np.unique(got.numpy())))
    queries = fake.requests_to("/query")
    assert len(queries) == 10 and all(r.include_values is False and r.top_k == 400 for r in queries)


def test_padding_when_k_exceeds_the_namespace(fake):
    db = connect(fake)
    db.add(unit_rows(3))
    scores, ids, vecs = db.search_with_vectors(unit_rows(2, seed=1), 5)
    assert ids[:, 3:].eq(-1).all() and torch.isneginf(scores[:, 3:]).all() and vecs[:, 3:].eq(0).all()
    with pytest.raises(ValueError, match="top_k=10000"):
        db.search(unit_rows(1), 10_001)


def test_namespaces_are_separate_and_len_reads_stats(fake):
    default, other = connect(fake), connect(fake, namespace="other")
    default.add(unit_rows(4))
    other.add(unit_rows(7))
    assert len(default) == 4 and len(other) == 7
    assert default.search(unit_rows(7)[:1], 3)[1].eq(-1).sum() == 0


def test_bad_input_is_rejected_before_any_request(fake):
    db = connect(fake)
    x = unit_rows(5)
    x[2] *= 2
    with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
        db.add(x)
    with pytest.raises(ValueError, match="dimension"):
        db.add(unit_rows(5, d=D + 1))
    assert fake.requests_to("/vectors/upsert") == [] and len(db) == 0


def test_configuration_from_arguments_and_environment(fake, monkeypatch):
    monkeypatch.delenv("PINECONE_API_KEY", raising=False)
    monkeypatch.delenv("PINECONE_HOST", raising=False)
    monkeypatch.delenv("PINECONE_INDEX", raising=False)
    with pytest.raises(ValueError, match="PINECONE_API_KEY"):
        PineconeVectorDB(D, host=fake.host)
    with pytest.raises(ValueError, match="PINECONE_HOST"):
        PineconeVectorDB(D, api_key=KEY)
    monkeypatch.setenv("PINECONE_API_KEY", KEY)
    monkeypatch.setenv("PINECONE_HOST", fake.host)
    db = PineconeVectorDB(D, backoff=0.001, progress=False)
    db.add(unit_rows(2))
    assert len(fake.stored()) == 2
    with pytest.raises(ValueError, match="dimension 16"):
        PineconeVectorDB(D * 2)
    with pytest.raises(Exception, match="(?i)api key|unauthori"):  # a wrong key is not retried
        PineconeVectorDB(D, api_key="wrong-key", max_retries=0)


def test_save_and_load_are_not_implemented(fake, tmp_path):
    db = connect(fake)
    with pytest.raises(NotImplementedError, match="lives on the server"):
        db.save(tmp_path / "x")
    with pytest.raises(NotImplementedError, match="reconnect"):
        PineconeVectorDB.load(tmp_path / "x")


def test_transient_error_classification():
    from pinecone.errors import (
        ApiError,
        NotFoundError,
        PineconeConnectionError,
        PineconeTimeoutError,
        RateLimitError,
        ServiceError,
    )

    assert is_transient(PineconeConnectionError("refused"))
    assert is_transient(PineconeTimeoutError("slow"))
    assert is_transient(RateLimitError())
    assert is_transient(ServiceError(message="unavailable", status_code=503))
    assert not is_transient(ApiError(message="bad request", status_code=400))
    assert not is_transient(NotFoundError(message="no index", status_code=404))
    assert not is_transient(ValueError("bug"))


def test_a_wrong_api_key_is_one_line_that_never_prints_the_key(fake):
    """Issue 19.9: a wrong key was a raw UnauthorizedError traceback. Now one PineconeServiceError line (a
    ProjectError: the scripts print it and exit 2) naming the host and the status, never the key."""
    from common.errors import ProjectError
    from helpers.vector_db.pinecone import PineconeServiceError

    secret = "pcsk_wrong-secret-0123456789"
    with pytest.raises(PineconeServiceError) as caught:
        PineconeVectorDB(D, host=fake.host, api_key=secret, max_retries=0, progress=False)
    message = str(caught.value)
    assert isinstance(caught.value, ProjectError) and "\n" not in message
    assert "refused the API key" in message and fake.host in message and "401" in message
    assert secret not in message and secret not in repr(caught.value.__cause__) and caught.value.__cause__ is None


def test_an_unreachable_host_is_one_line(monkeypatch):
    """Issue 19.9: a host that is gone was a raw PineconeConnectionError traceback."""
    import socket
    import time

    from helpers.vector_db.pinecone import PineconeServiceError

    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the SDK's and our backoffs, not the test's time
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(PineconeServiceError, match=rf"cannot reach Pinecone at {host} \(describe_index_stats") as e:
        PineconeVectorDB(D, host=host, api_key=KEY, max_retries=0, timeout=2.0, progress=False)
    assert "\n" not in str(e.value) and KEY not in str(e.value)


def test_clear_empties_the_namespace_only(fake):
    db, other = connect(fake), connect(fake, namespace="other")
    db.add(unit_rows(5))
    other.add(unit_rows(3))
    db.clear()
    assert len(db) == 0 and fake.stored() == {} and len(fake.stored("other")) == 3
    assert db.add(unit_rows(2)).tolist() == [0, 1]  # the next free id starts over
    with pytest.raises(KeyError):
        db.get([4])  # not answered from the local cache either
