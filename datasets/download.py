"""The documented downloads: what to fetch, where it goes, resumable transfers, checksums and extraction.

Command line: ``python prepare_data.py download --root DATA --datasets roxford5k rparis6k [revisitop1m] [--dry-run]``.

Every file is written to ``<dest>.part`` and renamed when complete, so an interrupted transfer resumes
from the size of its ``.part`` with an HTTP Range request. Archives are extracted (then deleted unless asked
to keep them) and leave a marker ``.<archive name>.extracted`` in their folder, which is how a later plan
knows they are done.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file. ``dest`` is relative to the data root; ``extract_to`` (relative too) marks an
    archive; ``flatten`` puts every member file directly in ``extract_to`` (the Oxford/Paris image tars nest
    them in sub-folders, the revisitop lists expect a flat ``jpg/``)."""

    dataset: str
    url: str
    dest: str
    md5: str | None = None
    extract_to: str | None = None
    flatten: bool = False


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
                if verify_md5 and remote.md5 is not None:
                    digest = file_md5(path)
                    if digest != remote.md5:
                        reason = f"md5 mismatch: got {digest}, expected {remote.md5}"
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


def fetch(
    url: str, path: str, *, timeout: float = 60.0, chunk_size: int = 1 << 20, progress: bool = True
) -> None:
    """Download ``url`` to ``path`` through ``path + '.part'``, resuming a partial ``.part`` by HTTP Range.

    A server that ignores Range (answers 200) restarts the file from zero; a 416 with the .part already at the
    full length counts as complete.
    """
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
        raise OSError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise OSError(f"download of {url} failed: {e.reason} (offline? fetch it by hand to {path})") from e
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
            while chunk := response.read(chunk_size):
                f.write(chunk)
                bar.update(len(chunk))
    got = os.path.getsize(part)
    if total is not None and got != total:
        raise OSError(f"download of {url} stopped at {got} of {total} bytes; run again to resume from {part}")
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
        if step.action in ("download", "resume", "redownload"):
            if step.action == "redownload":
                for stale in (path, step.part_path):
                    if os.path.exists(stale):
                        os.remove(stale)
            logger.info("%s %s -> %s", step.action, remote.url, path)
            fetch(remote.url, path, timeout=timeout, progress=progress)
            if remote.md5 is not None:
                digest = file_md5(path)
                if digest != remote.md5:
                    os.remove(path)
                    raise ValueError(f"md5 mismatch for {path} from {remote.url}: got {digest}, expected "
                                     f"{remote.md5}; the file was removed, run again to fetch it anew")
            done.append(path)
        elif step.action != "extract":
            raise ValueError(f"unknown plan action {step.action!r}")
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
