"""Fetching a file: over plain HTTP(S), resumable through a ``.part`` file (HTTP Range), with one clear error per
failure kind; and from a public Google Drive folder through gdown (the folder's listing, a file by id through
Drive's large-file confirmation page, resumed)."""
from __future__ import annotations

import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from common.errors import MissingDependencyError, ProjectIOError

logger = logging.getLogger(__name__)


def _total_from_content_range(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(m.group(1)) if m else None


class DownloadError(ProjectIOError):
    """A transfer that failed; the message names what was fetched."""


class UnreachableError(DownloadError):
    """The server could not be reached at all (offline, DNS failure, connection refused); ``host`` names it."""

    def __init__(self, message: str, *, host: str) -> None:
        super().__init__(message)
        self.host = host


class InterruptedDownloadError(DownloadError):
    """The connection dropped or timed out before the whole file came; what arrived is kept, and a new call
    resumes from it."""


def _with_attempts(fetch_once: Callable[[], None], attempts: int) -> None:
    """``fetch_once()``, called again (to resume) after an :class:`InterruptedDownloadError`, ``attempts`` calls
    at most."""
    for attempt in range(1, attempts + 1):
        try:
            fetch_once()
            return
        except InterruptedDownloadError as exc:
            if attempt >= attempts:
                raise
            logger.warning("%s; resuming (attempt %d of %d)", exc, attempt + 1, attempts)


def fetch(
    url: str,
    path: str,
    *,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    progress: bool = True,
    attempts: int = 1,
) -> None:
    """Download ``url`` to ``path`` through ``path + '.part'``, resuming a partial ``.part`` by HTTP Range.

    A server that ignores Range (answers 200) restarts the file from zero; a 416 with the .part already at the
    full length counts as complete. A transfer that breaks off is resumed, ``attempts`` tries in all. Raises
    :class:`UnreachableError` when the server cannot be reached, :class:`InterruptedDownloadError` when the
    transfer stops early every time (run again to resume), :class:`DownloadError` on an HTTP error.
    """
    _with_attempts(lambda: _fetch_once(url, path, timeout=timeout, chunk_size=chunk_size, progress=progress),
                   attempts)


def _fetch_once(url: str, path: str, *, timeout: float, chunk_size: int, progress: bool) -> None:
    part = path + ".part"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "cvnet-superglobal-downloader"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset and _total_from_content_range(e.headers.get("Content-Range")) == offset:
            os.replace(part, path)
            return
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise UnreachableError(f"download of {url} failed: {e.reason} (offline? fetch it by hand to {path})",
                               host=urllib.parse.urlsplit(url).netloc) from e
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise InterruptedDownloadError(f"download of {url} was interrupted ({type(e).__name__}: {e}); run "
                                       "again to resume") from e
    with response:
        if offset and response.status != 206:
            logger.warning("%s: server ignored the Range request; restarting from zero", url)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=os.path.basename(path),
            disable=not progress,
        ) as bar:
            while True:
                try:
                    chunk = response.read(chunk_size)
                except (OSError, http.client.HTTPException) as e:  # a reset or a timeout: keep what came
                    raise InterruptedDownloadError(
                        f"download of {url} broke off at {f.tell()} bytes ({type(e).__name__}: {e}); run again "
                        f"to resume from {part}") from e
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    got = os.path.getsize(part)
    if total is not None and got != total:
        raise InterruptedDownloadError(f"download of {url} stopped at {got} of {total} bytes; run again to resume "
                                      f"from {part}")
    os.replace(part, path)


# --------------------------------------------------------------------------------------------------------------
# Google Drive (public folders and files, through gdown)
# --------------------------------------------------------------------------------------------------------------

DRIVE_HOST = "drive.google.com"
DRIVE_HOSTS = (DRIVE_HOST, "docs.google.com", "drive.usercontent.google.com")
_DRIVE_ID = re.compile(r"[0-9A-Za-z_-]{10,}")


def _valid_id(candidate: str | None) -> str | None:
    return candidate if candidate is not None and _DRIVE_ID.fullmatch(candidate) else None


def drive_file_id(url: str) -> str | None:
    """The file id of a Google Drive link (``.../file/d/<id>/view``, ``open?id=<id>``, ``uc?id=<id>``,
    ``drive.usercontent.google.com/download?id=<id>``); None for any other URL, a folder's link included."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in DRIVE_HOSTS or drive_folder_id(url) is not None:
        return None
    m = re.search(r"/file/(?:u/\d+/)?d/([^/?#]+)", parts.path)
    return _valid_id(m.group(1) if m else (urllib.parse.parse_qs(parts.query).get("id") or [None])[0])


def drive_folder_id(url: str) -> str | None:
    """The folder id of a Google Drive folder link (``.../drive/folders/<id>``, ``.../drive/u/0/folders/<id>``,
    ``folderview?id=<id>``); None for any other URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in DRIVE_HOSTS:
        return None
    m = re.search(r"/folders/([^/?#]+)", parts.path)
    if m:
        return _valid_id(m.group(1))
    if parts.path.endswith("/folderview"):
        return _valid_id((urllib.parse.parse_qs(parts.query).get("id") or [None])[0])
    return None


def _gdown() -> Any:
    try:
        import gdown
    except ImportError:
        raise MissingDependencyError("Google Drive downloads need gdown: pip install gdown (it is in "
                                     "requirements.txt)") from None
    return gdown


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _drive_error(exc: Exception, what: str) -> DownloadError:
    """A failure of gdown (or of the ``requests`` under it) as this module's error kinds."""
    import gdown.exceptions
    import requests
    from urllib3.exceptions import NewConnectionError

    cause = exc.__cause__ if isinstance(exc, gdown.exceptions.DownloadError) else exc
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(exc, requests.exceptions.ConnectTimeout) or isinstance(reason, NewConnectionError):
        return UnreachableError(f"{what} failed: cannot reach {DRIVE_HOST} ({_one_line(reason or exc)})",
                                host=DRIVE_HOST)
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        return DownloadError(f"{what} failed: HTTP {exc.response.status_code} {exc.response.reason}")
    if isinstance(exc, gdown.exceptions.FileURLRetrievalError):
        # gdown's message is a paragraph; what it means fits in one line
        return DownloadError(f"{what} failed: Drive gave no download link (no such file, not shared publicly, "
                             "or its download quota is used up for now: try again later)")
    if isinstance(cause, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          requests.exceptions.ChunkedEncodingError)):
        return InterruptedDownloadError(f"{what} was interrupted ({_one_line(exc)}); run again to resume")
    return DownloadError(f"{what} failed: {_one_line(exc)}")


def list_drive_folder(folder_id: str, *, timeout: float = 60.0) -> dict[str, str]:
    """The files of the public Google Drive folder ``folder_id`` (sub-folders included): path inside the folder
    ('a/b.pyth') -> file id. One request per folder, nothing downloaded; gdown reads Drive's folder view.
    Raises :class:`UnreachableError` offline, :class:`DownloadError` when the folder cannot be listed."""
    gdown = _gdown()
    import requests

    try:
        files = gdown.download_folder(id=folder_id, skip_download=True, quiet=True, use_cookies=False,
                                      timeout=timeout)
    except (requests.exceptions.RequestException, gdown.exceptions.DownloadError) as exc:
        raise _drive_error(exc, f"listing the Google Drive folder {folder_id}") from exc
    return {f.path.replace(os.sep, "/"): f.id for f in files}


def fetch_drive_file(file_id: str, path: str, *, timeout: float = 60.0, attempts: int = 1,
                     progress: bool = True) -> None:
    """Download the public Google Drive file ``file_id`` to ``path`` with gdown, through Drive's large-file
    confirmation page; a transfer that breaks off is resumed from gdown's partial file, ``attempts`` tries in all,
    and a later call for the same id resumes it too (the partial file, ``<name>.drive-<id>XXXXXXXX.part`` beside
    ``path``, is named after the id, so that another id for the same name never continues it).

    No cookies are read or written (the confirmation page needs none). Raises :class:`UnreachableError` offline,
    :class:`InterruptedDownloadError` when every try broke off, :class:`DownloadError` otherwise (not shared, quota
    used up, HTTP error).
    """
    gdown = _gdown()
    import requests

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    staged = f"{path}.drive-{file_id}"

    def once() -> None:
        try:
            gdown.download(id=file_id, output=staged, quiet=not progress, use_cookies=False, resume=True,
                           timeout=timeout)
        except (requests.exceptions.RequestException, gdown.exceptions.DownloadError) as exc:
            raise _drive_error(exc, f"download of Google Drive file {file_id}") from exc

    _with_attempts(once, attempts)
    os.replace(staged, path)
