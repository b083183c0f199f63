"""Fetching a file over HTTP(S): resumable through a ``.part`` file (HTTP Range), one clear error per failure kind,
and Google Drive's share links and large-file confirmation page."""
from __future__ import annotations

import html
import http.client
import http.cookiejar
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from tqdm import tqdm

from common.errors import ProjectIOError

logger = logging.getLogger(__name__)


def _total_from_content_range(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(m.group(1)) if m else None


class DownloadError(ProjectIOError):
    """A transfer that failed; the message names the URL."""


class UnreachableError(DownloadError):
    """The server could not be reached at all (offline, DNS failure, connection refused)."""


class InterruptedDownloadError(DownloadError):
    """The connection dropped or timed out before the whole file came; the ``.part`` file keeps what arrived,
    and a new call resumes from it."""
#: Bytes of an HTML answer read to look for a way on (Google Drive's confirmation page is a few kB).
_HTML_LIMIT = 2 << 20


def _is_html(response) -> bool:
    return (response.headers.get("Content-Type") or "").split(";")[0].strip().lower() == "text/html"


def fetch(
    url: str,
    path: str,
    *,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    progress: bool = True,
    opener: urllib.request.OpenerDirector | None = None,
    follow_html: Callable[[str, str], str | None] | None = None,
) -> None:
    """Download ``url`` to ``path`` through ``path + '.part'``, resuming a partial ``.part`` by HTTP Range.

    A server that ignores Range (answers 200) restarts the file from zero; a 416 with the .part already at the
    full length counts as complete. ``opener`` (e.g. one with a cookie jar) makes the requests. With
    ``follow_html``, an HTML answer is not the file: ``follow_html(page, page_url)`` returns the URL to request
    instead (Google Drive's large-file confirmation page, see :func:`drive_confirm_url`), or None, which is an
    error. Raises :class:`UnreachableError` when the server cannot be reached,
    :class:`InterruptedDownloadError` when the transfer stops early (run again to resume), :class:`DownloadError`
    on an HTTP error.
    """
    part = path + ".part"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    open_url = opener.open if opener is not None else urllib.request.urlopen
    for _hop in range(5):
        request = urllib.request.Request(url, headers={"User-Agent": "cvnet-superglobal-downloader"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = open_url(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset and _total_from_content_range(e.headers.get("Content-Range")) == offset:
                os.replace(part, path)
                return
            raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            raise UnreachableError(f"download of {url} failed: {e.reason} (offline? fetch it by hand to {path})"
                                   ) from e
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise InterruptedDownloadError(f"download of {url} was interrupted ({type(e).__name__}: {e}); run "
                                           "again to resume") from e
        if follow_html is None or not _is_html(response):
            break
        with response:
            page = response.read(_HTML_LIMIT).decode("utf-8", errors="replace")
            page_url = response.geturl()
        next_url = follow_html(page, page_url)
        if next_url is None:
            raise DownloadError(f"download of {url} failed: the server answered with an HTML page, not the file "
                                "(a sign-in, quota or error page)")
        logger.info("%s answered with a confirmation page; following it", url)
        url = next_url
    else:
        raise DownloadError(f"download of {url} failed: too many HTML pages before the file")
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
#: Drive's direct-download endpoint; a large file answers it with a confirmation page (see drive_confirm_url).
DRIVE_DOWNLOAD_URL = "https://drive.google.com/uc?export=download&id={id}"
_DRIVE_HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")
_DRIVE_ID = re.compile(r"[0-9A-Za-z_-]{10,}")


def drive_file_id(url: str) -> str | None:
    """The file id of a Google Drive link (``.../file/d/<id>/view``, ``open?id=<id>``, ``uc?id=<id>``,
    ``drive.usercontent.google.com/download?id=<id>``); None for any other URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in _DRIVE_HOSTS:
        return None
    m = re.search(r"/file/d/([^/?#]+)", parts.path)
    candidate = m.group(1) if m else (urllib.parse.parse_qs(parts.query).get("id") or [None])[0]
    return candidate if candidate is not None and _DRIVE_ID.fullmatch(candidate) else None


def is_drive_folder(url: str) -> bool:
    """Whether ``url`` is a Google Drive folder link (``.../drive/folders/<id>``, ``.../folderview?id=<id>``)."""
    parts = urllib.parse.urlsplit(url)
    return parts.hostname in _DRIVE_HOSTS and ("/folders/" in parts.path or parts.path.endswith("/folderview"))


def _attributes(tag: str) -> dict[str, str]:
    return {k.lower(): html.unescape(v) for k, v in re.findall(r'([\w-]+)\s*=\s*"([^"]*)"', tag)}


def drive_confirm_url(page: str, page_url: str, cookies: http.cookiejar.CookieJar | None = None) -> str | None:
    """Where Google Drive's "can't scan this file for viruses" page says to download the file; None when the
    page offers no way on (not shared, quota exceeded, a sign-in page).

    Drive answers a large file's download URL with an HTML page instead of the file. Its current form is a
    ``<form action=".../download">`` whose hidden inputs (id, export, confirm, uuid) make the real download URL;
    older pages carry a link with ``confirm=<token>``, or set a ``download_warning_*`` cookie whose value is the
    confirm token.
    """
    for form in re.finditer(r"<form\b([^>]*)>(.*?)</form>", page, flags=re.S | re.I):
        action = _attributes(form.group(1)).get("action")
        if not action:
            continue
        fields = []
        for tag in re.findall(r"<input\b[^>]*>", form.group(2), flags=re.I):
            attrs = _attributes(tag)
            if attrs.get("type", "").lower() == "hidden" and "name" in attrs:
                fields.append((attrs["name"], attrs.get("value", "")))
        if any(name == "confirm" for name, _ in fields):
            target = urllib.parse.urljoin(page_url, action)
            return target + ("&" if "?" in target else "?") + urllib.parse.urlencode(fields)
    m = re.search(r'href="([^"]*[?&](?:amp;)?confirm=[^"]*)"', page)
    if m:
        return urllib.parse.urljoin(page_url, html.unescape(m.group(1)))
    for cookie in cookies or ():
        if cookie.name.startswith("download_warning"):
            parts = urllib.parse.urlsplit(page_url)
            query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "confirm"]
            query.append(("confirm", cookie.value))
            return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    return None
