"""Local stand-ins for the internet in the download tests (127.0.0.1, a free port, no network).

:class:`FakeServer` serves plain files (HTTP Range, 416 past the end, a transfer cut off half-way on request) and
plays Google Drive: a folder view (``/embeddedfolderview``), the large-file confirmation page (``/uc``, a
``download-form`` with hidden inputs, as Drive sends it) and the download endpoint (``/download``, with
``Content-Disposition``). gdown hard-codes Drive's https URLs, so :func:`route_google_to` sends the requests
``requests`` makes to Google's hosts to this server instead, at the transport (adapter) level: gdown's own code
runs unchanged. :func:`official_checkpoint` writes tiny files in the official checkpoint format.
"""
from __future__ import annotations

import html
import io
import re
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

GOOGLE_HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")
DOWNLOAD_ACTION = "https://drive.usercontent.google.com/download"
UUID = "5d1c6a8e-0f4b-4e7a-9c1d-2b3a4f5e6d7c"


class _Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def _send(self, code: int, body: bytes, content_type: str = "text/html; charset=utf-8", headers=()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        parts = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()}
        self.server.log.append((parts.path, self.headers.get("Range")))
        drive_id = query.get("id", "")
        if parts.path == "/embeddedfolderview" and drive_id in self.server.drive_folders:
            return self._send(200, self.server.folder_view(drive_id).encode())
        if parts.path == "/uc" and drive_id in self.server.drive_files:
            return self._send(200, self.server.confirmation_page(drive_id).encode())
        if parts.path == "/download" and drive_id in self.server.drive_files:
            if query.get("confirm") != "t" or query.get("uuid") != UUID:
                return self._send(200, b"<html><body>no</body></html>")
            name, data = self.server.drive_files[drive_id]
            return self._file(data, [("Content-Disposition", f'attachment; filename="{name}"')])
        if self.path in self.server.files:
            return self._file(self.server.files[self.path])
        return self._send(404, b"<html><body>Not Found</body></html>")

    def _file(self, data: bytes, headers=()) -> None:
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(m.group(1)) if m and self.server.honour_range else 0
        if start >= len(data) > 0:
            return self._send(416, b"", "text/plain", [("Content-Range", f"bytes */{len(data)}")])
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        try:
            if self.server.cut_once:
                self.server.cut_once = False
                self.wfile.write(body[: len(body) // 2])  # then the connection closes: an interrupted transfer
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (gdown re-requests by Range)
            self.close_connection = True

    def log_message(self, *args):
        pass


class FakeServer(ThreadingHTTPServer):
    """The server and its content. ``files``: request path (query included) -> bytes; ``drive_files``: Drive file
    id -> (name, bytes); ``drive_folders``: folder id -> (title, [file ids]). ``log`` records (path, Range header)
    per request; ``cut_once`` cuts the next file transfer half-way; ``honour_range`` False ignores Range."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.files: dict[str, bytes] = {}
        self.drive_files: dict[str, tuple[str, bytes]] = {}
        self.drive_folders: dict[str, tuple[str, list[str]]] = {}
        self.log: list[tuple[str, str | None]] = []
        self.cut_once = False
        self.honour_range = True
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)

    def folder_view(self, folder_id: str) -> str:
        """Drive's embedded folder view: the title, then one link per file."""
        title, ids = self.drive_folders[folder_id]
        rows = "".join(f'<div class="flip-entry"><a href="https://drive.google.com/file/d/{fid}/view?usp=drive_web"'
                       f' target="_blank"><div class="flip-entry-title">{html.escape(self.drive_files[fid][0])}'
                       "</div></a></div>" for fid in ids)
        return f"<!DOCTYPE html><html><head><title>{html.escape(title)}</title></head><body>{rows}</body></html>"

    def confirmation_page(self, file_id: str) -> str:
        """Drive's "can't scan this file for viruses" page (its current form: the real URL in hidden inputs)."""
        name = html.escape(self.drive_files[file_id][0])
        return ('<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>'
                f'<p class="uc-warning-subcaption">{name} is too large for Google to scan for viruses.</p>'
                f'<form id="download-form" action="{DOWNLOAD_ACTION}" method="get"><input type="submit" '
                f'value="Download anyway"/><input type="hidden" name="id" value="{file_id}"><input type="hidden" '
                'name="export" value="download"><input type="hidden" name="confirm" value="t"><input '
                f'type="hidden" name="uuid" value="{UUID}"></form></body></html>\n')


def route_google_to(monkeypatch, base_url: str) -> None:
    """Send every request that ``requests`` makes to a Google host (gdown's) to ``base_url``, path and query
    kept, for the rest of the test."""
    import requests
    from requests.adapters import HTTPAdapter

    target = urllib.parse.urlsplit(base_url)

    class Rerouting(HTTPAdapter):
        def send(self, request, **kwargs):
            parts = urllib.parse.urlsplit(request.url)
            request.url = urllib.parse.urlunsplit(parts._replace(scheme=target.scheme, netloc=target.netloc))
            kwargs["proxies"] = {}
            return super().send(request, **kwargs)

    adapter = Rerouting()
    original = requests.Session.get_adapter

    def get_adapter(self, url):
        return adapter if urllib.parse.urlsplit(url).hostname in GOOGLE_HOSTS else original(self, url)

    monkeypatch.setattr(requests.Session, "get_adapter", get_adapter)


def closed_port() -> int:
    """A local port nothing listens on (a connection to it is refused: an unreachable server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def official_checkpoint(depth: int, fill: float = 0.5) -> bytes:
    """A ``torch.save``d file in the official layout (``{'model_state': {official key: tensor}}``, every key of
    CVNet-Rerank and CVNet-Global of that depth, each shape right) that takes a few hundred kB: every tensor is
    the one value ``fill`` expanded to its shape, so only one element per tensor is stored. It loads strictly."""
    from models import CVNetGlobal, CVNetRerank
    from models.checkpoint import official_state_dict

    with torch.device("meta"):  # the key layout and shapes, without initialising weights
        models = [CVNetGlobal(depth=depth), CVNetRerank(depth=depth)]
    state = {k: v for m in models for k, v in official_state_dict(m.to_empty(device="cpu")).items()}
    tiny = {k: torch.full((), fill, dtype=v.dtype).expand(v.shape) for k, v in state.items()}
    buf = io.BytesIO()
    torch.save({"model_state": tiny}, buf)
    return buf.getvalue()
