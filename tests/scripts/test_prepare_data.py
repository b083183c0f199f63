"""``prepare_data.py weights`` against a local Drive-like HTTP server on 127.0.0.1 (no real network): the
large-file confirmation page, an interrupted transfer resumed by HTTP Range, the strict load, SHA256SUMS; and
the one-line errors when offline, when the Drive id is unknown, or when the file is not a checkpoint."""
import hashlib
import http.server
import io
import re
import socket
import threading
import urllib.parse

import pytest
import torch

import models.weights as download_module
from helpers.builders import build_model
from models.checkpoint import official_state_dict
from prepare_data import main

FILE_ID = "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"
UUID = "5d1c6a8e-0f4b-4e7a-9c1d-2b3a4f5e6d7c"
# the page Drive sends instead of a file too large to scan (its 2024 form: hidden inputs of the real URL)
CONFIRM_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<div class="uc-main"><div id="uc-text"><p class="uc-warning-caption">Google Drive can't scan this file for
viruses.</p><p class="uc-warning-subcaption"><span class="uc-name-size"><a href="/open?id={id}">
CVPR2022_CVNet_R50.pyth</a> (52M)</span> is too large for Google to scan for viruses. Would you still like to
download this file?</p><form id="download-form" action="{base}/download" method="get"><input type="submit"
id="uc-download-link" value="Download anyway"/><input type="hidden" name="id" value="{id}"><input type="hidden"
name="export" value="download"><input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid"
value="{uuid}"></form></div></div></body></html>"""


@pytest.fixture(scope="module")
def official_r50() -> bytes:
    """A checkpoint in the layout of CVPR2022_CVNet_R50.pyth (random weights, float16 to halve its size)."""
    rerank = build_model("cvnet_rerank", seed=1, warn_random=False)
    full = build_model("cvnet_global", seed=2, warn_random=False)
    state = {k: v.half() for k, v in {**official_state_dict(full), **official_state_dict(rerank)}.items()}
    buf = io.BytesIO()
    torch.save({"model_state": state}, buf)
    return buf.getvalue()


class _Drive(http.server.BaseHTTPRequestHandler):
    """/uc -> the confirmation page; /download (with its confirm and uuid) -> the file, with Range, cut off
    half-way the first time when ``server.cut_once``; /plain/<name> -> ``server.files[name]`` as a plain server."""

    def _send(self, code, body, content_type="application/octet-stream", extra=()):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        parts = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parts.query)
        self.server.log.append((parts.path, self.headers.get("Range")))
        if parts.path == "/uc" and query.get("id") == [FILE_ID]:
            page = CONFIRM_PAGE.format(base=self.server.url, id=FILE_ID, uuid=UUID)
            return self._send(200, page.encode(), "text/html; charset=utf-8")
        if parts.path == "/download" and query.get("id") == [FILE_ID]:
            if query.get("confirm") != ["t"] or query.get("uuid") != [UUID]:
                return self._send(200, b"<html>no</html>", "text/html")
            return self._file(self.server.payload)
        if parts.path.startswith("/plain/") and parts.path[7:] in self.server.files:
            return self._file(self.server.files[parts.path[7:]])
        return self._send(404, b"not found", "text/plain")

    def _file(self, data):
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(m.group(1)) if m else 0
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_once:
            self.server.cut_once = False
            self.wfile.write(body[: len(body) // 2])  # then the connection closes: an interrupted transfer
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def drive(monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drive)
    httpd.daemon_threads = True
    httpd.log, httpd.files, httpd.payload, httpd.cut_once = [], {}, b"", False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(download_module, "DRIVE_DOWNLOAD_URL", httpd.url + "/uc?export=download&id={id}")
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_weights_through_drive_confirmation_resumed_checked_and_recorded(tmp_path, drive, official_r50, capsys):
    drive.payload, drive.cut_once = official_r50, True
    root = tmp_path / "weights"
    link = f"https://drive.google.com/file/d/{FILE_ID}/view?usp=sharing"  # a share link, as the README gives
    assert main(["weights", "r50", "--root", str(root), "--url", link, "--timeout", "20", "--no-progress"]) == 0
    dest = root / "CVPR2022_CVNet_R50.pyth"
    assert dest.read_bytes() == official_r50 and not (root / "CVPR2022_CVNet_R50.pyth.part").exists()
    half = len(official_r50) // 2
    # confirmation page, the file cut off half-way, then the page again and the rest by a Range request
    assert drive.log == [("/uc", None), ("/download", None), ("/uc", f"bytes={half}-"),
                         ("/download", f"bytes={half}-")]
    digest = hashlib.sha256(official_r50).hexdigest()
    assert (root / "SHA256SUMS").read_text() == f"{digest}  CVPR2022_CVNet_R50.pyth\n"  # sha256sum -c format
    # a second run finds the file, checks it again and fetches nothing
    drive.log.clear()
    assert main(["weights", "R50", "--root", str(root), "--no-progress"]) == 0
    assert drive.log == [] and (root / "SHA256SUMS").read_text() == f"{digest}  CVPR2022_CVNet_R50.pyth\n"
    assert not any(p.name.endswith(".tmp") for p in root.iterdir())


def test_a_file_that_is_not_the_checkpoint_is_rejected(tmp_path, drive, official_r50, capsys):
    drive.files.update({"page.pyth": b"<html>sign in</html>" * 10, "r50.pyth": official_r50})
    root = tmp_path / "weights"
    assert main(["weights", "R50", "--root", str(root), "--url", f"{drive.url}/plain/page.pyth",
                 "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "not a loadable CVNet ResNet-50 checkpoint" in err and "CVPR2022_CVNet_R50.pyth.rejected" in err
    assert not (root / "CVPR2022_CVNet_R50.pyth").exists() and not (root / "SHA256SUMS").exists()
    # the R50 file fetched as R101 fails the strict load too
    assert main(["weights", "R101", "--root", str(root), "--url", f"{drive.url}/plain/r50.pyth",
                 "--no-progress"]) == 2
    assert "not a loadable CVNet ResNet-101 checkpoint" in _one_line_error(capsys)


def test_offline_and_unknown_drive_id_give_one_line_with_the_manual_steps(tmp_path, monkeypatch, capsys):
    root = tmp_path / "weights"
    # the table has no Drive ids yet: without --url, say where the link is and how to pass it
    assert download_module.OFFICIAL_WEIGHTS["R50"].gdrive_id is None
    assert main(["weights", "R50", "--root", str(root)]) == 2
    err = _one_line_error(capsys)
    assert "https://github.com/sungonce/CVNet" in err and "--url <link>" in err and "CVPR2022_CVNet_R50.pyth" in err
    port = _closed_port()
    assert main(["weights", "R50", "--root", str(root), "--url", f"http://127.0.0.1:{port}/w.pyth"]) == 2
    err = _one_line_error(capsys)
    assert f"cannot reach 127.0.0.1:{port}" in err and "offline?" in err
    assert "https://github.com/sungonce/CVNet" in err and f"by hand into {root}/" in err
    monkeypatch.setitem(download_module.OFFICIAL_WEIGHTS, "R50",
                        download_module.OfficialWeights("R50", 50, "CVPR2022_CVNet_R50.pyth", gdrive_id=FILE_ID))
    monkeypatch.setattr(download_module, "DRIVE_DOWNLOAD_URL", f"http://127.0.0.1:{port}/uc?id={{id}}")
    assert main(["weights", "R50", "--root", str(root)]) == 2
    assert "offline?" in _one_line_error(capsys)
    assert not root.exists() or not any(root.iterdir())


def test_url_names_one_file(tmp_path, capsys):
    assert main(["weights", "R50", "R101", "--root", str(tmp_path), "--url", "https://example.org/w.pyth"]) == 2
    assert "--url gives one file" in _one_line_error(capsys)
    assert main(["weights", "R50", "--root", str(tmp_path), "--url", "ftp://example.org/w.pyth"]) == 2
    assert "http(s)" in _one_line_error(capsys)
