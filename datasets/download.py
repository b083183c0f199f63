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
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.download import fetch
from common.errors import InvalidValueError
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
        raise InvalidValueError(f"GLDv2 splits are {sorted(GLDV2_NUM_TARS)}, got {split!r}")
    if not 0 <= shard < GLDV2_NUM_TARS[split]:
        raise InvalidValueError(f"GLDv2 {split} shards are 0..{GLDV2_NUM_TARS[split] - 1}, got {shard}")
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
    # revisitop's precomputed R-GeM features: the metric regression fixture (tests/helpers/evaluation/test_metrics.py)
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
        raise InvalidValueError(f"{os.fspath(path)}: not an md5sum line")
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
        raise InvalidValueError(f"unknown datasets {unknown}; known: {sorted(table)}")
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
            raise InvalidValueError(f"unknown plan action {step.action!r}")
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
                raise InvalidValueError(f"md5 mismatch for {path} from {remote.url}: got {digest}, expected "
                                        f"{expected}; the file was removed, run again to fetch it anew")
        if remote.extract_to is not None:
            if root is None:
                raise InvalidValueError("download(): pass root= (the data root of the plan) to extract archives")
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
