"""The official CVNet checkpoints (SuperGlobal uses the same files): their names, where they are published, the
fetcher that downloads and checks them, and their recorded sha256 (``weights/SHA256SUMS``)."""
from __future__ import annotations

import http.client
import http.cookiejar
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.download import (
    DRIVE_DOWNLOAD_URL,
    DownloadError,
    InterruptedDownloadError,
    UnreachableError,
    drive_confirm_url,
    drive_file_id,
    fetch,
    is_drive_folder,
)
from common.errors import ProjectError
from common.io import file_sha256

logger = logging.getLogger(__name__)

OFFICIAL_WEIGHTS_HINT = (
    "For meaningful results download the official weights CVPR2022_CVNet_R50.pyth (or CVPR2022_CVNet_R101.pyth) "
    "from the CVNet release (https://github.com/sungonce/CVNet, Google Drive links in its README), put the file "
    "under weights/, and pass it as weights= (command line: --weights weights/CVPR2022_CVNet_R50.pyth). "
    "SuperGlobal uses the very same files."
)
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


class WeightsError(ProjectError):
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
    raise WeightsError(f"the Google Drive id of {entry.filename} is not recorded in models/weights.py: "
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
