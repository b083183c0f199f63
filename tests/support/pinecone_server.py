"""A small in-memory stand-in for a Pinecone index's data plane, for tests of the real SDK code path.

It speaks the REST calls the SDK makes (upsert, query, fetch, delete, describe_index_stats, list), keeps
vectors in memory per namespace, answers queries by brute-force inner product, enforces Pinecone's request
limits (1,000 records and 2 MB per upsert, 1,000 ids per fetch/delete, 4 MB per query response), records every
request, and can inject faults: an upsert request holding an id listed in ``fail_ids`` is answered with HTTP
503 while that id's failure count lasts (``math.inf`` = forever), and an id in ``drop_ids`` is acknowledged
but not stored. It binds 127.0.0.1 on a free port.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

MAX_UPSERT_RECORDS = 1000
MAX_UPSERT_BYTES = 2 * 1024 * 1024
MAX_IDS = 1000
MAX_QUERY_RESPONSE_BYTES = 4 * 1024 * 1024


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    status: int
    body_bytes: int
    n_records: int = 0  # upsert records / fetch or delete ids
    top_k: int | None = None
    include_values: bool | None = None
    ids: list[str] = field(default_factory=list)


class FakePinecone:
    """The index state plus an HTTP server over it. Use as a context manager; ``host`` is its base URL."""

    def __init__(self, dim: int, *, api_key: str = "test-key") -> None:
        self.dim = dim
        self.api_key = api_key
        self.namespaces: dict[str, dict[str, tuple[np.ndarray, dict | None]]] = {}
        self.requests: list[Request] = []
        self.fail_ids: dict[str, float] = {}
        self.drop_ids: set[str] = set()  # acknowledged but never stored: a silent loss to detect
        self.lock = threading.Lock()
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> FakePinecone:
        state = self

        class Handler(_Handler):
            fake = state

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ------------------------------------------------------------------ inspection helpers
    def stored(self, namespace: str = "") -> dict[str, np.ndarray]:
        with self.lock:
            return {k: v for k, (v, _) in self.namespaces.get(namespace, {}).items()}

    def requests_to(self, path: str, *, ok_only: bool = False) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path and (r.status == 200 or not ok_only)]

    # ------------------------------------------------------------------ the REST calls
    def upsert(self, body: dict[str, Any], raw_len: int) -> tuple[int, dict[str, Any]]:
        records = body.get("vectors", [])
        ids = [r["id"] for r in records]
        log = Request("POST", "/vectors/upsert", 200, raw_len, n_records=len(records), ids=ids)
        with self.lock:
            self.requests.append(log)
            if len(records) > MAX_UPSERT_RECORDS or raw_len > MAX_UPSERT_BYTES:
                log.status = 400 if len(records) > MAX_UPSERT_RECORDS else 413
                return log.status, {"code": 3, "message": f"request too large: {len(records)} records, {raw_len} B"}
            poisoned = [i for i in ids if self.fail_ids.get(i, 0) > 0]
            if poisoned:
                for i in poisoned:
                    self.fail_ids[i] -= 1
                log.status = 503
                return 503, {"code": 14, "message": "injected failure"}
            for r in records:
                if len(r["values"]) != self.dim:
                    log.status = 400
                    return 400, {"code": 3, "message": f"vector dimension {len(r['values'])} != {self.dim}"}
            ns = self.namespaces.setdefault(body.get("namespace", ""), {})
            for r in records:
                if r["id"] not in self.drop_ids:
                    ns[r["id"]] = (np.asarray(r["values"], dtype=np.float32), r.get("metadata"))
        return 200, {"upsertedCount": len(records)}

    def query(self, body: dict[str, Any], raw_len: int) -> tuple[int, dict[str, Any]]:
        top_k, include_values = int(body["topK"]), bool(body.get("includeValues", False))
        log = Request("POST", "/query", 200, raw_len, top_k=top_k, include_values=include_values)
        namespace = body.get("namespace", "")
        with self.lock:
            self.requests.append(log)
            items = list(self.namespaces.get(namespace, {}).items())
        q = np.asarray(body["vector"], dtype=np.float64)
        if q.shape != (self.dim,):
            log.status = 400
            return 400, {"code": 3, "message": "query vector has the wrong dimension"}
        if not items:
            return 200, {"matches": [], "namespace": namespace}
        ids = [i for i, _ in items]
        mat = np.stack([v for _, (v, _) in items]).astype(np.float64)
        scores = mat @ q
        order = np.argsort(-scores, kind="stable")[:top_k]
        matches = []
        for j in order:
            match: dict[str, Any] = {"id": ids[j], "score": float(scores[j])}
            if include_values:
                match["values"] = mat[j].astype(np.float32).tolist()
            if body.get("includeMetadata") and items[j][1][1] is not None:
                match["metadata"] = items[j][1][1]
            matches.append(match)
        response = {"matches": matches, "namespace": namespace}
        if len(json.dumps(response)) > MAX_QUERY_RESPONSE_BYTES:
            log.status = 400
            return 400, {"code": 3, "message": "response size exceeds the 4 MB limit; lower topK or drop values"}
        return 200, response

    def fetch(self, params: dict[str, list[str]], raw_len: int) -> tuple[int, dict[str, Any]]:
        ids = params.get("ids", [])
        namespace = params.get("namespace", [""])[0]
        log = Request("GET", "/vectors/fetch", 200, raw_len, n_records=len(ids), ids=ids)
        with self.lock:
            self.requests.append(log)
            if len(ids) > MAX_IDS:
                log.status = 400
                return 400, {"code": 3, "message": f"at most {MAX_IDS} ids per fetch"}
            ns = self.namespaces.get(namespace, {})
            vectors = {}
            for i in ids:
                if i in ns:
                    values, metadata = ns[i]
                    entry: dict[str, Any] = {"id": i, "values": values.tolist()}
                    if metadata is not None:
                        entry["metadata"] = metadata
                    vectors[i] = entry
        return 200, {"vectors": vectors, "namespace": namespace}

    def delete(self, body: dict[str, Any], raw_len: int) -> tuple[int, dict[str, Any]]:
        ids = body.get("ids", [])
        log = Request("POST", "/vectors/delete", 200, raw_len, n_records=len(ids), ids=ids)
        with self.lock:
            self.requests.append(log)
            if len(ids) > MAX_IDS:
                log.status = 400
                return 400, {"code": 3, "message": f"at most {MAX_IDS} ids per delete"}
            ns = self.namespaces.get(body.get("namespace", ""), {})
            if body.get("deleteAll"):
                ns.clear()
            for i in ids:
                ns.pop(i, None)
        return 200, {}

    def describe_index_stats(self, raw_len: int) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests.append(Request("POST", "/describe_index_stats", 200, raw_len))
            namespaces = {(name or "__default__"): {"vectorCount": len(ns)}
                          for name, ns in self.namespaces.items() if ns}
        total = sum(ns["vectorCount"] for ns in namespaces.values())
        return 200, {"dimension": self.dim, "totalVectorCount": total, "namespaces": namespaces,
                     "indexFullness": 0.0}

    def list_ids(self, params: dict[str, list[str]], raw_len: int) -> tuple[int, dict[str, Any]]:
        namespace = params.get("namespace", [""])[0]
        limit = int(params.get("limit", ["100"])[0])
        start = int(params.get("paginationToken", ["0"])[0])
        with self.lock:
            self.requests.append(Request("GET", "/vectors/list", 200, raw_len))
            ids = sorted(self.namespaces.get(namespace, {}))
        page = ids[start : start + limit]
        response: dict[str, Any] = {"vectors": [{"id": i} for i in page], "namespace": namespace}
        if start + limit < len(ids):
            response["pagination"] = {"next": str(start + limit)}
        return 200, response


class _QuietServer(ThreadingHTTPServer):
    """A client that drops its connection (a client closed by the garbage collector, often in a later test,
    whose output would then show the server's traceback) is not an error worth printing."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall
    fake: FakePinecone

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", "0")  # the SDK's own retry then waits no time
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Api-Key") != self.fake.api_key:
            self._reply(401, {"code": 16, "message": "invalid API key"})
            return False
        return True

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        if not self._authorised():
            return
        body = json.loads(raw or b"{}")
        route = urlsplit(self.path).path
        handlers = {
            "/vectors/upsert": lambda: self.fake.upsert(body, len(raw)),
            "/query": lambda: self.fake.query(body, len(raw)),
            "/vectors/delete": lambda: self.fake.delete(body, len(raw)),
            "/describe_index_stats": lambda: self.fake.describe_index_stats(len(raw)),
        }
        if route not in handlers:
            self._reply(404, {"code": 5, "message": f"no route {route}"})
            return
        self._reply(*handlers[route]())

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorised():
            return
        parts = urlsplit(self.path)
        params = parse_qs(parts.query, keep_blank_values=True)
        if parts.path == "/vectors/fetch":
            self._reply(*self.fake.fetch(params, len(self.path)))
        elif parts.path == "/vectors/list":
            self._reply(*self.fake.list_ids(params, len(self.path)))
        else:
            self._reply(404, {"code": 5, "message": f"no route {parts.path}"})
