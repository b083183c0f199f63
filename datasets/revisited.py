"""Revisited Oxford / Paris (ROxford5k, RParis6k) and the R1M distractors, in the revisitop layout.

Layout under a data root::

    <root>/roxford5k/gnd_roxford5k.pkl     imlist, qimlist, gnd (bbx, easy, hard, junk per query)
    <root>/roxford5k/jpg/<name>.jpg         flat folder, names without extension in the pkl
    <root>/rparis6k/...                     the same
    <root>/revisitop1m/revisitop1m.txt      one image path per line, relative to revisitop1m/jpg/
    <root>/revisitop1m/jpg/...

``python prepare_data.py download --root <root> --datasets roxford5k rparis6k revisitop1m`` fetches all of it.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from common.convention import OFFICIAL_CONVENTION, InputConvention
from datasets.download import GND_URL, IMAGE_URLS, R1M_LIST_URL, R1M_TAR_URL
from datasets.transforms import crop_query, min_size_guard, multiscale_tensors, read_image

logger = logging.getLogger(__name__)

REVISITED_NAMES = ("roxford5k", "rparis6k")



# ----------------------------------------------------------------------------------------------------
# Ground truth through a restricted unpickler
# ----------------------------------------------------------------------------------------------------


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The numpy callables an array pickle needs, under numpy 1.x (numpy.core) and 2.x (numpy._core) names.

    Resolved here, never by importing the module named in the pickle (which would run arbitrary imports).
    """
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        # protocol-5 pickles of contiguous arrays rebuild them from a raw buffer
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # protocol-2 pickles store bytes (e.g. an array's raw data) as _codecs.encode(text, 'latin1'); only that
    # codec is let through
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"ground-truth pickle asks for codec {encoding!r}; only latin1 allowed")
    return text.encode("latin1")


_BUILTIN_NAMES = ("set", "frozenset", "list", "dict", "tuple", "str", "bytes", "bytearray", "int", "float",
                  "complex", "bool")


class GroundTruthUnpickler(pickle.Unpickler):
    """An unpickler that only builds containers, primitives and numpy arrays/scalars.

    The revisitop gnd files are plain dicts of lists and numpy arrays; anything else (``os.system``,
    ``subprocess``, ``builtins.eval``...) in such a file is refused with ``pickle.UnpicklingError``.
    """

    def __init__(self, file, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self._allowed = _numpy_globals()
        for mod in ("builtins", "__builtin__"):
            for name in _BUILTIN_NAMES:
                self._allowed[(mod, name)] = getattr(__import__("builtins"), name)
        self._allowed[("_codecs", "encode")] = _latin1_encode

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}' from a ground-truth pickle: only containers, "
                "primitives and numpy arrays are allowed (the file is corrupt or not a revisitop gnd file)"
            ) from None


def _index_array(values, *, what: str, n_db: int) -> np.ndarray:
    a = np.asarray(values if values is not None else [])
    if a.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.floating) or not np.all(a == np.round(a)):
            raise ValueError(f"{what} must hold integer database indices, got dtype {a.dtype}")
    a = a.reshape(-1).astype(np.int64)
    if a.min() < 0 or a.max() >= n_db:
        raise ValueError(f"{what} has indices outside [0, {n_db}): min {a.min()}, max {a.max()}")
    return a


def load_ground_truth(path: str | os.PathLike) -> dict:
    """Load and validate a revisitop ``gnd_<name>.pkl`` through :class:`GroundTruthUnpickler`.

    Returns a dict with 'imlist' (list[str]), 'qimlist' (list[str]) and 'gnd': one dict per query with
    'bbx' ((4,) float64 x1, y1, x2, y2), 'easy', 'hard', 'junk' ((n,) int64 database indices);
    other keys are kept.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            cfg = GroundTruthUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a dict at the top level, got {type(cfg).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if missing:
        raise ValueError(f"{path}: ground truth lacks keys {missing} (expected 'imlist', 'qimlist', 'gnd')")
    imlist, qimlist = [str(s) for s in cfg["imlist"]], [str(s) for s in cfg["qimlist"]]
    if len(cfg["gnd"]) != len(qimlist):
        raise ValueError(f"{path}: {len(cfg['gnd'])} gnd entries for {len(qimlist)} queries")
    gnd = []
    for i, g in enumerate(cfg["gnd"]):
        if not isinstance(g, dict):
            raise ValueError(f"{path}: gnd[{i}] is a {type(g).__name__}, expected a dict")
        lacking = [k for k in ("bbx", "easy", "hard", "junk") if k not in g]
        if lacking:
            raise ValueError(f"{path}: gnd[{i}] lacks keys {lacking}")
        bbx = np.asarray(g["bbx"], dtype=np.float64).reshape(-1)
        if bbx.shape != (4,):
            raise ValueError(f"{path}: gnd[{i}]['bbx'] must be 4 numbers (x1, y1, x2, y2), got {g['bbx']!r}")
        entry = dict(g)
        entry["bbx"] = bbx
        for key in ("easy", "hard", "junk"):
            entry[key] = _index_array(g[key], what=f"{path}: gnd[{i}]['{key}']", n_db=len(imlist))
        gnd.append(entry)
    out = dict(cfg)
    out.update(imlist=imlist, qimlist=qimlist, gnd=gnd)
    return out


# ----------------------------------------------------------------------------------------------------
# ROxford5k / RParis6k
# ----------------------------------------------------------------------------------------------------


def _download_hint(root: str, name: str) -> str:
    if name not in REVISITED_NAMES:  # a dataset in the revisitop layout of the user's (or the built-in one)
        return (f"Any dataset in the revisitop layout works: {os.path.join(root, name, f'gnd_{name}.pkl')} and "
                f"{os.path.join(root, name, 'jpg')}/*.jpg (the built-in one: python prepare_data.py "
                f"synthetic --root {root} --name {name}).")
    images = "\n".join(f"    {u}" for u in IMAGE_URLS[name])
    return (
        f"Fetch them with `python prepare_data.py download --root {root} --datasets {name}`, or by hand:\n"
        f"  ground truth {GND_URL.format(name=name)}\n"
        f"    -> {os.path.join(root, name, f'gnd_{name}.pkl')}\n"
        f"  images (extract every .jpg, flattened, into {os.path.join(root, name, 'jpg')}/):\n{images}"
    )


class RevisitedDataset(Dataset):
    """ROxford5k, RParis6k (or any dataset in their layout), database or query side.

    Item i -> list of (3, H_s, W_s) tensors, one per scale.

    Queries are cropped to their ``bbx`` once, before any resizing (the official protocol); database images
    are used whole. Images are read at their stored size (at most 1024 a side) in BGR and normalised with
    ``convention``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        name: str,
        split: str = "db",
        *,
        convention: InputConvention = OFFICIAL_CONVENTION,
        scales: Sequence[float] = (1.0,),
        min_side: int | None = None,
    ) -> None:
        # roxford5k / rparis6k, or any dataset written in the same layout (the built-in synthetic benchmark)
        if not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"invalid dataset name {name!r}")
        if split not in ("db", "query"):
            raise ValueError(f"split must be 'db' or 'query', got {split!r}")
        self.root = os.fspath(root)
        self.name, self.split = name, split
        self.convention, self.scales, self.min_side = convention, tuple(float(s) for s in scales), min_side
        self.data_dir = os.path.join(self.root, name)
        self.image_dir = os.path.join(self.data_dir, "jpg")
        self.gnd_path = os.path.join(self.data_dir, f"gnd_{name}.pkl")
        if not os.path.isdir(self.data_dir):
            raise FileNotFoundError(f"dataset {name} not found: no folder {self.data_dir}.\n"
                                    + _download_hint(self.root, name))
        if not os.path.isfile(self.gnd_path):
            raise FileNotFoundError(f"dataset {name}: ground-truth file {self.gnd_path} is missing.\n"
                                    + _download_hint(self.root, name))
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"dataset {name}: image folder {self.image_dir} is missing.\n"
                                    + _download_hint(self.root, name))
        cfg = load_ground_truth(self.gnd_path)
        self.imlist: list[str] = cfg["imlist"]
        self.qimlist: list[str] = cfg["qimlist"]
        self.gnd: list[dict] = cfg["gnd"]
        names = self.qimlist if split == "query" else self.imlist
        self.image_paths: list[str] = [os.path.join(self.image_dir, n + ".jpg") for n in names]
        self.bbxs: list[np.ndarray] | None = [g["bbx"] for g in self.gnd] if split == "query" else None

    def __len__(self) -> int:
        return len(self.image_paths)

    def read(self, index: int) -> np.ndarray:
        """The uint8 BGR (H, W, 3) image at its stored size, cropped to its bbx on the query side."""
        img = read_image(self.image_paths[index], dataset=f"{self.name} ({self.split})")
        if self.bbxs is not None:
            img = crop_query(img, self.bbxs[index])
        return min_size_guard(img, self.min_side)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return multiscale_tensors(self.read(index), self.scales, self.convention)

    def missing_images(self) -> list[str]:
        """Paths of this split's images that are not on disk."""
        return [p for p in self.image_paths if not os.path.isfile(p)]

    def __repr__(self) -> str:
        return (f"RevisitedDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"scales={self.scales}, convention={self.convention})")


# ----------------------------------------------------------------------------------------------------
# R1M distractors
# ----------------------------------------------------------------------------------------------------


@dataclass
class CompletenessReport:
    """How the images on disk compare with ``revisitop1m.txt``."""

    n_listed: int
    n_on_disk: int
    missing: list[str] = field(default_factory=list)
    unlisted: int = 0

    @property
    def complete(self) -> bool:
        return not self.missing


def shard_range(i: int, n: int, total: int) -> range:
    """Indices of shard ``i`` of ``n`` contiguous shards of ``range(total)`` (sizes differ by at most 1)."""
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i} of {n} is not valid (need 0 <= i < n, n >= 1)")
    return range(i * total // n, (i + 1) * total // n)


class Revisitop1M(Dataset):
    """The R1M distractors (1,001,001 listed); item i -> list of (3, H_s, W_s) tensors, one per scale."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        convention: InputConvention = OFFICIAL_CONVENTION,
        scales: Sequence[float] = (1.0,),
        min_side: int | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.name = "revisitop1m"
        self.convention, self.scales, self.min_side = convention, tuple(float(s) for s in scales), min_side
        self.data_dir = os.path.join(self.root, self.name)
        self.image_dir = os.path.join(self.data_dir, "jpg")
        self.list_path = os.path.join(self.data_dir, "revisitop1m.txt")
        if not os.path.isfile(self.list_path):
            raise FileNotFoundError(
                f"dataset revisitop1m: image list {self.list_path} is missing.\n"
                f"Fetch it with `python prepare_data.py download --root {self.root} --datasets revisitop1m`, "
                f"or by hand:\n  {R1M_LIST_URL} -> {self.list_path}\n"
                f"  and the 100 archives {R1M_TAR_URL.format(i='{1..100}')}, extracted into {self.image_dir}/"
            )
        with open(self.list_path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
        # revisitop lists paths relative to jpg/; accept a leading "jpg/" too
        self.imlist: list[str] = [ln.removeprefix("jpg/") for ln in lines if ln]
        self.image_paths: list[str] = [os.path.join(self.image_dir, p) for p in self.imlist]

    def __len__(self) -> int:
        return len(self.image_paths)

    def read(self, index: int) -> np.ndarray:
        img = read_image(self.image_paths[index], dataset=self.name)
        return min_size_guard(img, self.min_side)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return multiscale_tensors(self.read(index), self.scales, self.convention)

    def shard(self, i: int, n: int) -> range:
        """Index range of shard ``i`` of ``n`` (contiguous; for extracting the 1M in several jobs)."""
        return shard_range(i, n, len(self))

    def check_complete(self, *, progress: bool = True) -> CompletenessReport:
        """Compare the images on disk with the list; logs and returns the listed images that are missing.

        Users report that the 100 archives yield fewer images than listed, so check before a +1M evaluation.
        """
        on_disk: set[str] = set()
        if os.path.isdir(self.image_dir):
            walker = os.walk(self.image_dir)
            for dirpath, _, filenames in tqdm(walker, desc="scanning revisitop1m/jpg", disable=not progress,
                                              unit="dir"):
                rel = os.path.relpath(dirpath, self.image_dir)
                for fn in filenames:
                    on_disk.add(os.path.normpath(os.path.join(rel, fn)))
        listed = [os.path.normpath(p) for p in self.imlist]
        listed_set = set(listed)
        missing = [p for p in listed if p not in on_disk]
        report = CompletenessReport(
            n_listed=len(listed), n_on_disk=len(on_disk), missing=missing,
            unlisted=len(on_disk - listed_set),
        )
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            logger.warning("revisitop1m: %d of %d listed images are missing under %s (e.g. %s)",
                           len(missing), len(listed), self.image_dir, shown)
        else:
            logger.info("revisitop1m: all %d listed images are present", len(listed))
        return report
