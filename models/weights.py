"""The official CVNet checkpoints (SuperGlobal uses the same files): their names, where they are published, the
fetcher that downloads and checks them, and their recorded sha256 (``weights/SHA256SUMS``, trust on first use)."""
from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.download import (
    DRIVE_HOSTS,
    DownloadError,
    UnreachableError,
    drive_file_id,
    drive_folder_id,
    fetch,
    fetch_drive_file,
    list_drive_folder,
)
from common.errors import ProjectError
from common.io import file_sha256

logger = logging.getLogger(__name__)

CVNET_REPO_URL = "https://github.com/sungonce/CVNet"
DRIVE_FOLDER_URL = "https://drive.google.com/drive/folders/{id}"
#: The Google Drive folder holding both checkpoints that the CVNet README links since August 2023 (its June-2022
#: README linked another folder, 1VE2uG0bynk6-XfokjE13VFNVQRb-rQM8).
CVNET_DRIVE_FOLDER_ID = "1gMbZ8JlTyPlH2-6HW5NHRe58LmKfJybx"
CVNET_DRIVE_FOLDER_URL = DRIVE_FOLDER_URL.format(id=CVNET_DRIVE_FOLDER_ID)
#: AMES's authors serve CVPR2022_CVNet_R50.pyth beside their own networks (liveness not checked when recorded).
AMES_NETWORKS_URL = "http://ptak.felk.cvut.cz/personal/sumapave/public/ames/networks/"
SHA256SUMS = "SHA256SUMS"
FETCH_COMMAND = "python prepare_data.py weights R50 R101"

OFFICIAL_WEIGHTS_HINT = (
    f"For meaningful results use the official weights: `{FETCH_COMMAND}` downloads CVPR2022_CVNet_R50.pyth and "
    "CVPR2022_CVNet_R101.pyth into weights/ and checks them; then pass one as weights= (command line: "
    "--weights weights/CVPR2022_CVNet_R50.pyth). SuperGlobal uses the very same files."
)


@dataclass(frozen=True)
class OfficialWeights:
    """One official checkpoint of the CVNet release (SuperGlobal uses the same files).

    ``drive_id``: its Google Drive file id when recorded (else it is looked up by name in the folder's listing at
    download time); ``mirrors``: plain HTTP(S) copies, tried after Drive.
    """

    name: str
    depth: int
    filename: str
    drive_id: str | None = None
    mirrors: tuple[str, ...] = ()


OFFICIAL_WEIGHTS: dict[str, OfficialWeights] = {
    # R50's id comes from a public setup script (fox-flex/visual_search, README) that runs `gdown <id>` beside a
    # link to the current folder, and whose code then loads CVPR2022_CVNet_R50.pyth: most likely R50, not checked
    # against the file. A wrong guess costs nothing: the strict depth-50 load refuses it and the listing is next.
    "R50": OfficialWeights("R50", 50, "CVPR2022_CVNet_R50.pyth", drive_id="1TNMrFY65ZMre9bWoUvLLKnIYv34h0pLB",
                           mirrors=(AMES_NETWORKS_URL + "CVPR2022_CVNet_R50.pyth",)),
    # no public source found records R101's id: it is read from the folder's listing
    "R101": OfficialWeights("R101", 101, "CVPR2022_CVNet_R101.pyth"),
}


class WeightsError(ProjectError):
    """The official weights could not be fetched or checked; the one-line message says what to do by hand."""


@dataclass(frozen=True)
class Source:
    """One place to fetch a file from: ``kind`` 'drive_file' (``where`` = a file id), 'drive_folder' (a folder id:
    the file is looked up by name in its listing) or 'http' (a URL)."""

    kind: str
    where: str

    def __str__(self) -> str:
        if self.kind == "drive_file":
            return f"Google Drive file {self.where}"
        if self.kind == "drive_folder":
            return f"the Google Drive folder {DRIVE_FOLDER_URL.format(id=self.where)}"
        return self.where


def weight_sources(entry: OfficialWeights, url: str | None = None, *,
                   folder_id: str = CVNET_DRIVE_FOLDER_ID) -> list[Source]:
    """Where to fetch ``entry`` from, in order: ``url`` alone when given (a Drive folder or file link, or any
    http(s) URL); else its recorded Drive id, the Drive folder ``folder_id`` (by file name), then its mirrors."""
    if url is not None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise WeightsError(f"--url must be an http(s) URL or a Google Drive link, got {url!r}")
        if (folder := drive_folder_id(url)) is not None:
            return [Source("drive_folder", folder)]
        if (file_id := drive_file_id(url)) is not None:
            return [Source("drive_file", file_id)]
        if parts.hostname in DRIVE_HOSTS:
            raise WeightsError(f"--url {url} is a Google Drive link to neither a file nor a folder: give the share "
                               f"link of {entry.filename} or of the folder that holds it")
        return [Source("http", url)]
    recorded = [Source("drive_file", entry.drive_id)] if entry.drive_id else []
    return recorded + [Source("drive_folder", folder_id)] + [Source("http", m) for m in entry.mirrors]


# --------------------------------------------------------------------------------------------------------------
# SHA256SUMS: recorded after the first good load, checked on every later use
# --------------------------------------------------------------------------------------------------------------


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


def _refetch_command(filename: str, root: str | os.PathLike) -> str:
    names = [w.name for w in OFFICIAL_WEIGHTS.values() if w.filename == filename] or ["R50 R101"]
    where = "" if os.path.normpath(root) == "weights" else f" --root {root}"
    return f"python prepare_data.py weights {names[0]}{where}"


def sha256_mismatch(path: str | os.PathLike, digest: str, recorded: str) -> str:
    """What to say when ``path``'s sha256 ``digest`` is not the one ``recorded`` in SHA256SUMS."""
    path = Path(path)
    return (f"{path} has sha256 {digest}, but {path.parent / SHA256SUMS} recorded {recorded} when it was first "
            "checked: the file changed since (a damaged copy, or another file under its name). Delete it and run "
            f"`{_refetch_command(path.name, path.parent)}` to fetch it again, or delete its line from {SHA256SUMS} "
            "to accept this file")


def check_recorded_sha256(path: str | os.PathLike) -> None:
    """Raise :class:`WeightsError` when a ``SHA256SUMS`` beside ``path`` records another sha256 for its name (the
    check on every use of a file that ``prepare_data.py weights`` recorded); nothing when none is recorded."""
    path = Path(path)
    recorded = read_sha256sums(path.parent / SHA256SUMS).get(path.name)
    if recorded is not None and (digest := file_sha256(path)) != recorded:
        raise WeightsError(sha256_mismatch(path, digest, recorded))


# --------------------------------------------------------------------------------------------------------------
# The fetcher
# --------------------------------------------------------------------------------------------------------------


def _problem(dest: Path, entry: OfficialWeights, verify: Callable[[str, int], None] | None,
             recorded: str | None) -> tuple[str, str | None]:
    """(sha256 of ``dest``, what is wrong with it or None): its recorded digest, then ``verify``."""
    digest = file_sha256(dest)
    if recorded is not None and digest != recorded:
        return digest, (f"not the file recorded in {SHA256SUMS} when it was first checked (its sha256 is {digest}, "
                        f"the record says {recorded}: a damaged copy, or another file under its name)")
    if verify is not None:
        try:
            verify(str(dest), entry.depth)
        except ProjectError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return digest, f"not a loadable CVNet ResNet-{entry.depth} checkpoint ({reason})"
    return digest, None


class _Fetcher:
    """Fetches one file from a :class:`Source`; remembers the Drive folders it listed and the ids it tried."""

    def __init__(self, *, attempts: int, timeout: float, progress: bool) -> None:
        self.options = {"attempts": attempts, "timeout": timeout, "progress": progress}
        self.listings: dict[str, dict[str, str] | DownloadError] = {}
        self.tried_ids: set[str] = set()

    def listing(self, folder_id: str) -> dict[str, str]:
        if folder_id not in self.listings:
            try:
                self.listings[folder_id] = list_drive_folder(folder_id, timeout=self.options["timeout"])
            except DownloadError as exc:
                self.listings[folder_id] = exc
        found = self.listings[folder_id]
        if isinstance(found, DownloadError):
            raise found
        return found

    def __call__(self, source: Source, filename: str, dest: Path) -> None:
        """Fetch ``filename`` from ``source`` to ``dest``; :class:`DownloadError` when it cannot."""
        if source.kind == "http":
            fetch(source.where, str(dest), **self.options)
            return
        file_id = source.where
        if source.kind == "drive_folder":
            files = self.listing(source.where)
            found = [fid for path, fid in sorted(files.items()) if path.rsplit("/", 1)[-1] == filename]
            if not found:
                raise DownloadError(f"it lists no {filename} (it holds: {', '.join(sorted(files)) or 'nothing'})")
            file_id = found[0]
            if file_id in self.tried_ids:
                raise DownloadError(f"it lists {filename} as file {file_id}, tried above")
        self.tried_ids.add(file_id)
        fetch_drive_file(file_id, str(dest), **self.options)


def _fetch_one(entry: OfficialWeights, dest: Path, sources: Sequence[Source], fetcher: _Fetcher,
               verify: Callable[[str, int], None] | None, recorded: str | None) -> tuple[str | None, str, bool]:
    """Try ``sources`` in turn until one gives a file that passes :func:`_problem`; a file that fails is moved to
    ``<file>.rejected``. Returns (its sha256 or None, what each failed source said, whether none of them could
    be reached)."""
    tried, unreachable = [], True
    for source in sources:
        logger.info("fetching %s from %s -> %s", entry.filename, source, dest)
        try:
            fetcher(source, entry.filename, dest)
        except DownloadError as exc:
            reason = f"cannot reach {exc.host}" if isinstance(exc, UnreachableError) else str(exc)
            unreachable &= isinstance(exc, UnreachableError)
            logger.warning("%s: %s", source, reason)
            tried.append(f"{source} ({reason})")
            continue
        digest, problem = _problem(dest, entry, verify, recorded)
        if problem is None:
            return digest, "", False
        rejected = dest.with_name(dest.name + ".rejected")
        os.replace(dest, rejected)
        unreachable = False
        logger.warning("%s gave a file that is %s; moved to %s", source, problem, rejected)
        tried.append(f"{source} (gave a file that is {problem}; it was moved to {rejected})")
    return None, ", ".join(tried), unreachable


def _by_hand(entries: Sequence[OfficialWeights], root: Path, folder_id: str) -> str:
    files = " and ".join(e.filename for e in entries)
    mirrors = "".join(f" ({e.filename} is also at {', '.join(e.mirrors)})" for e in entries if e.mirrors)
    where = "" if os.path.normpath(root) == "weights" else f" --root {root}"
    return (f"to do it by hand, download {files} from the Google Drive folder {DRIVE_FOLDER_URL.format(id=folder_id)}"
            f", the one {CVNET_REPO_URL} links{mirrors}, into {root}/ and run `python prepare_data.py weights "
            f"{' '.join(e.name for e in entries)}{where}` to check them and record their sha256")


def fetch_official_weights(
    names: Sequence[str],
    *,
    root: str | os.PathLike = "weights",
    url: str | None = None,
    folder_id: str = CVNET_DRIVE_FOLDER_ID,
    table: Mapping[str, OfficialWeights] = OFFICIAL_WEIGHTS,
    verify: Callable[[str, int], None] | None = None,
    attempts: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
) -> dict[str, str]:
    """Fetch the official checkpoints ``names`` ('R50', 'R101' of ``table``) into ``root``, check them, record
    their sha256 in ``root/SHA256SUMS``. Returns file name -> sha256.

    A file already in ``root`` is not fetched again, only checked. Otherwise each comes from the first of its
    :func:`weight_sources` that works: its recorded Google Drive id, the Drive folder ``folder_id`` (listed, the
    file found by name), its plain-HTTP mirrors; or only from ``url`` (one name). Drive goes through gdown, HTTP
    through :func:`common.download.fetch`; both resume a broken-off transfer (``attempts`` tries). A file is
    accepted when its sha256 is the one ``SHA256SUMS`` records (if any) and ``verify(path, depth)`` does not raise
    a ProjectError (prepare_data.py loads it strictly into CVNet-Rerank and CVNet-Global of that depth, so an
    R101 file offered as R50 is refused); a fresh download that fails is moved to ``<file>.rejected`` and the
    next source is tried. Every failure is one :class:`WeightsError` at the end, in one line: what each source
    said, and how to do it by hand.
    """
    unknown = [n for n in names if n not in table]
    if unknown:
        raise WeightsError(f"unknown weights {unknown}; known: {sorted(table)}")
    if url is not None and len(names) != 1:
        raise WeightsError(f"--url gives one file, but {len(names)} weights were named ({' '.join(names)}); "
                           "name one of them with it")
    root = Path(root)
    fetcher = _Fetcher(attempts=attempts, timeout=timeout, progress=progress)
    sums: dict[str, str] = {}
    failed: list[tuple[OfficialWeights, str, bool]] = []
    for name in dict.fromkeys(names):
        entry = table[name]
        dest = root / entry.filename
        recorded = read_sha256sums(root / SHA256SUMS).get(entry.filename)
        if dest.is_file():
            logger.info("%s is already here: checking it%s", dest, " (--url not used)" if url else "")
            digest, problem = _problem(dest, entry, verify, recorded)
            if problem is not None:
                failed.append((entry, f"{dest} is {problem}: delete or replace it", False))
                continue
        else:
            digest, tried, unreachable = _fetch_one(entry, dest, weight_sources(entry, url, folder_id=folder_id),
                                                    fetcher, verify, recorded)
            if digest is None:
                failed.append((entry, f"could not fetch {entry.filename}: tried {tried}", unreachable))
                continue
        sums[entry.filename] = digest
        update_sha256sums(root / SHA256SUMS, {entry.filename: digest})  # each as soon as checked
        logger.info("%s  %s", digest, dest)
    if failed:
        offline = "offline? " if all(unreachable for *_, unreachable in failed) else ""
        raise WeightsError(offline + "; ".join(what for _, what, _ in failed) + "; "
                           + _by_hand([entry for entry, *_ in failed], root, folder_id))
    return sums
