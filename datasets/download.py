"""The documented downloads: what to fetch, where it goes, resumable transfers, checksums and extraction.

Command line: ``python prepare_data.py download --root DATA --datasets roxford5k rparis6k [revisitop1m]
[gldv2-retrieval-test] [--dry-run]``.

Every file is written to ``<dest>.part`` and renamed when complete, so an interrupted transfer resumes
from the size of its ``.part`` with an HTTP Range request. Archives are extracted (then deleted unless asked
to keep them) and leave a marker ``.<archive name>.extracted`` in their folder, which is how a later plan
knows they are done.
"""
from __future__ import annotations

import hashlib
import html
import http.client
import http.cookiejar
import logging
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from common.io import file_sha256  # noqa: F401  (re-exported: the downloader verifies with it)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file. ``dest`` is relative to the data root; ``extract_to`` (relative too) marks an
    archive; ``flatten`` puts every member file directly in ``extract_to`` (the Oxford/Paris image tars nest
    them in sub-folders, the revisitop lists expect a flat ``jpg/``). The expected md5 is ``md5`` when known
    here, or read from a published md5sum file ``md5_url`` (GLDv2 has one per tar), fetched beside ``dest``."""

    dataset: str
    url: str
    dest: str
    md5: str | None = None
    extract_to: str | None = None
    flatten: bool = False
    md5_url: str | None = None


#: Where revisitop and the Oxford VGG pages publish the files (also quoted by datasets.revisited's error hints).
GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/gnd_{name}.pkl"
IMAGE_URLS = {
    "roxford5k": ("https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",),
    "rparis6k": (
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz",
    ),
}
R1M_LIST_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt"
R1M_TAR_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.{i}.tar.gz"
FEATURES_URL = "http://cmp.felk.cvut.cz/revisitop/data/features/{name}_resnet_rsfm120k_gem.mat"

#: Google Landmarks v2 (cvdfoundation/google-landmark): CSVs under metadata/ and ground_truth/, each split's
#: images in numbered tars (members a/b/c/<id>.jpg) with one md5sum file per tar under md5sum/<split>/.
GLDV2_BASE_URL = "https://s3.amazonaws.com/google-landmark"
GLDV2_NUM_TARS = {"train": 500, "index": 100, "test": 20}
GLDV2_RETRIEVAL_SOLUTION = "retrieval_solution_v2.1.csv"
GLDV2_RECOGNITION_SOLUTION = "recognition_solution_v2.1.csv"


def gldv2_tar_urls(split: str, shard: int) -> tuple[str, str]:
    """(tar url, md5sum file url) of image tar ``shard`` of GLDv2 split 'train' (500), 'index' (100) or 'test'
    (20)."""
    if split not in GLDV2_NUM_TARS:
        raise ValueError(f"GLDv2 splits are {sorted(GLDV2_NUM_TARS)}, got {split!r}")
    if not 0 <= shard < GLDV2_NUM_TARS[split]:
        raise ValueError(f"GLDv2 {split} shards are 0..{GLDV2_NUM_TARS[split] - 1}, got {shard}")
    return (f"{GLDV2_BASE_URL}/{split}/images_{shard:03d}.tar",
            f"{GLDV2_BASE_URL}/md5sum/{split}/md5.images_{shard:03d}.txt")


def _build_table() -> dict[str, tuple[RemoteFile, ...]]:
    # md5: None everywhere -- neither revisitop nor the Oxford VGG pages publish checksums for these files,
    # and a guessed value would reject good downloads. Integrity is then the HTTP length and a readable tar.
    table: dict[str, tuple[RemoteFile, ...]] = {}
    for name, archives in IMAGE_URLS.items():
        gnd = RemoteFile(name, GND_URL.format(name=name), f"{name}/gnd_{name}.pkl")
        tars = tuple(RemoteFile(name, url, f"{name}/{url.rsplit('/', 1)[1]}", extract_to=f"{name}/jpg",
                                flatten=True) for url in archives)
        table[name] = (gnd, *tars)
    table["revisitop1m"] = (
        RemoteFile("revisitop1m", R1M_LIST_URL, "revisitop1m/revisitop1m.txt"),
        *(RemoteFile("revisitop1m", R1M_TAR_URL.format(i=i), f"revisitop1m/tars/revisitop1m.{i}.tar.gz",
                     extract_to="revisitop1m/jpg")
          for i in range(1, 101)),
    )
    # revisitop's precomputed R-GeM features: the metric regression fixture (tests/helpers/test_evaluation.py)
    table["revisitop-features"] = tuple(
        RemoteFile("revisitop-features", FEATURES_URL.format(name=name), f"features/{name}_resnet_rsfm120k_gem.mat")
        for name in ("roxford5k", "rparis6k")
    )
    # the GLDv2 retrieval test split (datasets.gldv2.GLDv2RetrievalTest reads <root>/gldv2): its id lists, both
    # solutions (retrieval mAP@100, recognition GAP), and the index and test images
    name = "gldv2-retrieval-test"
    table[name] = (
        RemoteFile(name, f"{GLDV2_BASE_URL}/metadata/index.csv", "gldv2/index.csv"),
        RemoteFile(name, f"{GLDV2_BASE_URL}/metadata/test.csv", "gldv2/test.csv"),
        *(RemoteFile(name, f"{GLDV2_BASE_URL}/ground_truth/{csv}", f"gldv2/{csv}")
          for csv in (GLDV2_RETRIEVAL_SOLUTION, GLDV2_RECOGNITION_SOLUTION)),
        *(RemoteFile(name, tar, f"gldv2/tars/{split}/images_{i:03d}.tar", extract_to=f"gldv2/{split}", md5_url=md5)
          for split in ("index", "test") for i in range(GLDV2_NUM_TARS[split])
          for tar, md5 in [gldv2_tar_urls(split, i)]),
    )
    return table


DOWNLOADS: dict[str, tuple[RemoteFile, ...]] = _build_table()


@dataclass(frozen=True)
class PlannedDownload:
    """One step of a plan. ``action``: 'download' (from scratch), 'resume' (from ``offset`` bytes of the
    .part), 'redownload' (the file on disk fails its md5), or 'extract' (the archive is here, not yet
    extracted)."""

    remote: RemoteFile
    path: str
    action: str
    offset: int = 0
    reason: str = ""

    @property
    def part_path(self) -> str:
        return self.path + ".part"


def extraction_marker(root: str | os.PathLike, remote: RemoteFile) -> str:
    """Path of the marker written once ``remote`` (an archive) has been fully extracted."""
    name = os.path.basename(remote.dest)
    folder = remote.extract_to or os.path.dirname(remote.dest)
    return os.path.join(os.fspath(root), folder, f".{name}.extracted")


def file_md5(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def read_md5_file(path: str | os.PathLike) -> str:
    """The digest of an md5sum-format file (``<32 hex>  <name>``), lower case."""
    words = Path(path).read_text(encoding="utf-8").split()
    if not words or not re.fullmatch(r"[0-9a-fA-F]{32}", words[0]):
        raise ValueError(f"{os.fspath(path)}: not an md5sum line")
    return words[0].lower()


def md5_file_path(path: str | os.PathLike, remote: RemoteFile) -> str | None:
    """Where the published md5sum file of ``remote`` (downloaded to ``path``) is kept: beside it. None without
    ``md5_url``."""
    if remote.md5_url is None:
        return None
    return os.path.join(os.path.dirname(os.fspath(path)), remote.md5_url.rsplit("/", 1)[1])


def expected_md5(path: str | os.PathLike, remote: RemoteFile) -> str | None:
    """``remote.md5``, else the digest in its md5sum file once that is on disk; None when unknown."""
    if remote.md5 is not None:
        return remote.md5
    md5_path = md5_file_path(path, remote)
    return read_md5_file(md5_path) if md5_path is not None and os.path.isfile(md5_path) else None


def plan_downloads(
    root: str | os.PathLike,
    datasets: Sequence[str],
    *,
    table: dict[str, Sequence[RemoteFile]] | None = None,
    verify_md5: bool = True,
) -> list[PlannedDownload]:
    """What remains to be done for ``datasets`` under ``root``; files already complete are left out.

    A complete file (or an archive whose extraction marker exists) is skipped; a ``.part`` is resumed from its
    size; a complete file whose md5 is known and differs is planned again with the mismatch in ``reason``.
    """
    table = DOWNLOADS if table is None else table
    unknown = [d for d in datasets if d not in table]
    if unknown:
        raise ValueError(f"unknown datasets {unknown}; known: {sorted(table)}")
    root = os.fspath(root)
    plan: list[PlannedDownload] = []
    for name in datasets:
        for remote in table[name]:
            path = os.path.join(root, remote.dest)
            if remote.extract_to is not None and os.path.isfile(extraction_marker(root, remote)):
                continue
            if os.path.isfile(path):
                expected = expected_md5(path, remote) if verify_md5 else None
                if expected is not None:
                    digest = file_md5(path)
                    if digest != expected:
                        reason = f"md5 mismatch: got {digest}, expected {expected}"
                        plan.append(PlannedDownload(remote, path, "redownload", reason=reason))
                        continue
                if remote.extract_to is not None:
                    plan.append(PlannedDownload(remote, path, "extract"))
                continue
            part = path + ".part"
            if os.path.isfile(part) and os.path.getsize(part) > 0:
                size = os.path.getsize(part)
                reason = f"{size} bytes in .part"
                plan.append(PlannedDownload(remote, path, "resume", offset=size, reason=reason))
            else:
                plan.append(PlannedDownload(remote, path, "download"))
    return plan


def _total_from_content_range(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(m.group(1)) if m else None


class DownloadError(OSError):
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


def extract_archive(archive: str, dest_dir: str, *, flatten: bool) -> int:
    """Extract the regular files of a tar archive into ``dest_dir``; returns how many were written.

    ``flatten`` drops the members' folders (keeping base names); otherwise the tree is kept, and members that
    would land outside ``dest_dir`` (absolute paths, ``..``, links) are refused by tarfile's 'data' filter.
    """
    os.makedirs(dest_dir, exist_ok=True)
    n = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            if flatten:
                base = os.path.basename(member.name)
                if base in ("", ".", ".."):
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                with src, open(os.path.join(dest_dir, base), "wb") as out:
                    shutil.copyfileobj(src, out)
            else:
                tar.extract(member, dest_dir, filter="data")
            n += 1
    return n


def download(
    plan: Sequence[PlannedDownload],
    *,
    root: str | os.PathLike | None = None,
    keep_archives: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> list[str]:
    """Carry out a plan from :func:`plan_downloads`: fetch (resuming), check md5, extract archives.

    ``root`` is needed to place extraction markers and folders (the data root the plan was made for).
    Returns the paths written (downloaded files, or extraction folders). Raises ``OSError`` on a failed
    transfer and ``ValueError`` on an md5 mismatch (the bad file is removed so the next run fetches it again).
    """
    done: list[str] = []
    for step in plan:
        remote, path = step.remote, step.path
        if step.action not in ("download", "resume", "redownload", "extract"):
            raise ValueError(f"unknown plan action {step.action!r}")
        # an archive planned for extraction was checked by the plan, unless its md5 was not yet known then
        check = step.action != "extract"
        md5_path = md5_file_path(path, remote)
        if md5_path is not None and not os.path.isfile(md5_path):
            logger.info("download %s -> %s", remote.md5_url, md5_path)
            fetch(remote.md5_url, md5_path, timeout=timeout, progress=False)
            check = True
        if step.action != "extract":
            if step.action == "redownload":
                for stale in (path, step.part_path):
                    if os.path.exists(stale):
                        os.remove(stale)
            logger.info("%s %s -> %s", step.action, remote.url, path)
            fetch(remote.url, path, timeout=timeout, progress=progress)
            done.append(path)
        expected = expected_md5(path, remote)
        if check and expected is not None:
            digest = file_md5(path)
            if digest != expected:
                os.remove(path)
                raise ValueError(f"md5 mismatch for {path} from {remote.url}: got {digest}, expected "
                                 f"{expected}; the file was removed, run again to fetch it anew")
        if remote.extract_to is not None:
            if root is None:
                raise ValueError("download(): pass root= (the data root of the plan) to extract archives")
            dest_dir = os.path.join(os.fspath(root), remote.extract_to)
            logger.info("extracting %s -> %s", path, dest_dir)
            n = extract_archive(path, dest_dir, flatten=remote.flatten)
            with open(extraction_marker(root, remote), "w", encoding="utf-8") as f:
                f.write(f"{n}\n")
            if not keep_archives:
                os.remove(path)
            done.append(dest_dir)
    return done


def format_plan(plan: Sequence[PlannedDownload]) -> str:
    """The plan as text, two lines a step (action and URL, then the destination), for a dry run."""
    if not plan:
        return "nothing to do: every requested file is present"
    lines = []
    for step in plan:
        extra = f" ({step.reason})" if step.reason else ""
        target = f" -> extract to {step.remote.extract_to}" if step.remote.extract_to else ""
        lines.append(f"{step.action:>10}  {step.remote.url}\n            {step.path}{target}{extra}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Google Drive
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# The official CVNet weights
# --------------------------------------------------------------------------------------------------------------

CVNET_REPO_URL = "https://github.com/sungonce/CVNet"
# The release's README links one shared Drive folder holding both checkpoints, not the files themselves; Drive
# serves no folder as a file, so the fetcher needs each file's own link (or the file put in place by hand).
CVNET_WEIGHTS_FOLDER_URL = "https://drive.google.com/drive/folders/1VE2uG0bynk6-XfokjE13VFNVQRb-rQM8"
SHA256SUMS = "SHA256SUMS"


@dataclass(frozen=True)
class OfficialWeights:
    """One official checkpoint of the CVNet release (SuperGlobal uses the same files).

    ``gdrive_id``: its Google Drive file id. None while not recorded here (the CVNet README links only the shared
    folder :data:`CVNET_WEIGHTS_FOLDER_URL`, whose listing could not be read when this table was written): then
    ``--url`` must give the file's own link.
    """

    name: str
    depth: int
    filename: str
    gdrive_id: str | None = None


OFFICIAL_WEIGHTS: dict[str, OfficialWeights] = {
    "R50": OfficialWeights("R50", 50, "CVPR2022_CVNet_R50.pyth", gdrive_id=None),
    "R101": OfficialWeights("R101", 101, "CVPR2022_CVNet_R101.pyth", gdrive_id=None),
}


class WeightsError(Exception):
    """The official weights could not be fetched or checked; the one-line message says what to do by hand."""


def manual_weights_steps(entry: OfficialWeights, root: str | os.PathLike) -> str:
    """What to do when the fetcher cannot: one line."""
    root = os.fspath(root)
    return (f"open the authors' Google Drive folder {CVNET_WEIGHTS_FOLDER_URL} (linked from {CVNET_REPO_URL}), "
            f"copy the share link of {entry.filename} and run "
            f"`python prepare_data.py weights {entry.name} --root {root} --url <link>`; or download the file by "
            f"hand into {root}/ and run `python prepare_data.py weights {entry.name} --root {root}` to check it "
            f"and record its sha256")


def weights_url(entry: OfficialWeights, url: str | None, *, root: str | os.PathLike = "weights") -> str:
    """The URL to fetch ``entry`` from: ``url`` (a Drive share link becomes Drive's download URL; any other
    http(s) URL is used as given), else the Drive id of the table; neither is a :class:`WeightsError`."""
    if url is not None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise WeightsError(f"--url must be an http(s) URL or a Google Drive link, got {url!r}")
        file_id = drive_file_id(url)
        if file_id is None and is_drive_folder(url):
            raise WeightsError(f"--url is a Google Drive folder, which cannot be downloaded as a file: open it, "
                               f"right-click {entry.filename}, copy its share link and pass that")
        return DRIVE_DOWNLOAD_URL.format(id=file_id) if file_id else url
    if entry.gdrive_id is not None:
        return DRIVE_DOWNLOAD_URL.format(id=entry.gdrive_id)
    raise WeightsError(f"the Google Drive id of {entry.filename} is not recorded in datasets/download.py: "
                       + manual_weights_steps(entry, root))




def read_sha256sums(path: str | os.PathLike) -> dict[str, str]:
    """file name -> sha256 of a ``sha256sum`` listing (``<hex>  <name>`` or ``<hex> *<name>``); {} when absent."""
    if not os.path.isfile(path):
        return {}
    sums = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.strip())
        if m:
            sums[m.group(2)] = m.group(1).lower()
    return sums


def update_sha256sums(path: str | os.PathLike, sums: dict[str, str]) -> None:
    """Add or replace entries of the ``sha256sum``-format file ``path`` (``sha256sum -c`` checks it), written
    atomically; a recorded digest that changes is logged."""
    from common.io import atomic_write

    merged = read_sha256sums(path)
    for name, digest in sums.items():
        if merged.get(name, digest) != digest:
            logger.warning("%s: the sha256 of %s changed since it was recorded (%s -> %s)", path, name,
                           merged[name], digest)
        merged[name] = digest
    text = "".join(f"{merged[name]}  {name}\n" for name in sorted(merged))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def _fetch_resuming(url: str, path: str, *, attempts: int, timeout: float, progress: bool) -> None:
    """:func:`fetch` through Drive's confirmation page (with a cookie jar), resuming up to ``attempts`` times
    when the connection drops."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    for attempt in range(1, attempts + 1):
        try:
            fetch(url, path, timeout=timeout, progress=progress, opener=opener,
                  follow_html=lambda page, page_url: drive_confirm_url(page, page_url, jar))
            return
        except InterruptedDownloadError as exc:
            if attempt == attempts:
                raise
            logger.warning("%s; resuming (attempt %d of %d)", exc, attempt + 1, attempts)


def fetch_official_weights(
    names: Sequence[str],
    *,
    root: str | os.PathLike = "weights",
    url: str | None = None,
    verify: Callable[[str, int], None] | None = None,
    attempts: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
) -> dict[str, str]:
    """Fetch the official checkpoints ``names`` ('R50', 'R101') into ``root``, check them, record their sha256.

    A file already in ``root`` is not fetched again, only checked. Otherwise it comes from ``url`` (one name
    only) or from the Drive id of :data:`OFFICIAL_WEIGHTS`, through ``<file>.part`` (resumed by HTTP Range when
    the connection drops, up to ``attempts`` tries) and Drive's large-file confirmation page. ``verify(path,
    depth)`` must raise when the file is not a loadable checkpoint (prepare_data.py loads it strictly into
    CVNet-Rerank and CVNet-Global); a fresh download that fails it is moved to ``<file>.rejected``. Then
    ``root/SHA256SUMS`` gets the file's sha256. Returns file name -> sha256. Every failure is a
    :class:`WeightsError` with a one-line message that says what to do by hand.
    """
    unknown = [n for n in names if n not in OFFICIAL_WEIGHTS]
    if unknown:
        raise WeightsError(f"unknown weights {unknown}; known: {sorted(OFFICIAL_WEIGHTS)}")
    if url is not None and len(names) != 1:
        raise WeightsError(f"--url gives one file, but {len(names)} weights were named ({' '.join(names)}); "
                           "name one of them with it")
    root = Path(root)
    sums: dict[str, str] = {}
    for name in dict.fromkeys(names):
        entry = OFFICIAL_WEIGHTS[name]
        dest = root / entry.filename
        by_hand = "; to do it by hand, " + manual_weights_steps(entry, root)
        fresh = not dest.is_file()
        if fresh:
            source = weights_url(entry, url, root=root)
            logger.info("downloading %s -> %s", source, dest)
            try:
                _fetch_resuming(source, str(dest), attempts=attempts, timeout=timeout, progress=progress)
            except UnreachableError as exc:
                reason = getattr(exc.__cause__, "reason", exc)
                host = urllib.parse.urlsplit(source).netloc
                raise WeightsError(f"cannot reach {host} to download {entry.filename} ({reason}): offline? To do "
                                   "it by hand, " + manual_weights_steps(entry, root)) from None
            except DownloadError as exc:
                raise WeightsError(f"{exc}{by_hand}") from None
        else:
            logger.info("%s is already here: checking it%s", dest, " (--url not used)" if url else "")
        if verify is not None:
            try:
                verify(str(dest), entry.depth)
            except (RuntimeError, ValueError, OSError, KeyError, TypeError, EOFError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if fresh:
                    rejected = dest.with_name(dest.name + ".rejected")
                    os.replace(dest, rejected)
                    raise WeightsError(f"the file downloaded for {entry.filename} is not a loadable CVNet "
                                       f"ResNet-{entry.depth} checkpoint ({reason}); it was moved to {rejected}"
                                       + by_hand) from None
                raise WeightsError(f"{dest} is not a loadable CVNet ResNet-{entry.depth} checkpoint ({reason}); "
                                   f"delete or replace it{by_hand}") from None
        sums[entry.filename] = file_sha256(dest)
        update_sha256sums(root / SHA256SUMS, {entry.filename: sums[entry.filename]})  # each as soon as checked
        logger.info("%s  %s", sums[entry.filename], dest)
    return sums
