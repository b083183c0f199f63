"""Revisited Oxford / Paris (ROxford5k, RParis6k) and the R1M distractors, read in the revisitop layout: the
ground truth (through a restricted unpickler), the query and database sets, and the 1M list with its completeness
check. ``python prepare_data.py download`` fetches them (docs/evaluation.md, Data)::

    <root>/roxford5k/gnd_roxford5k.pkl, <root>/roxford5k/jpg/<name>.jpg    (rparis6k the same)
    <root>/revisitop1m/revisitop1m.txt, <root>/revisitop1m/jpg/...
"""
from __future__ import annotations

import bisect
import logging
import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset
from tqdm import tqdm

from common.convention import OFFICIAL_CONVENTION, InputConvention
from common.errors import InvalidValueError, MissingFileError
from datasets.download import GND_URL, IMAGE_URLS, R1M_LIST_URL, R1M_TAR_URL
from datasets.transforms import ScaledImages, crop_query, min_size_guard, read_image

logger = logging.getLogger(__name__)

REVISITED_NAMES = ("roxford5k", "rparis6k")


# ----------------------------------------------------------------------------------------------------
# Ground truth through a restricted unpickler
# ----------------------------------------------------------------------------------------------------


class GroundTruthError(InvalidValueError):
    """A ground-truth file that is empty, damaged, malformed or hostile; the message names the file and field."""


class GroundTruthPickleError(GroundTruthError, pickle.UnpicklingError):
    """The pickle asked for a global or a call the restricted unpickler refuses."""


class _Refused:
    """Stands for a class a pickle may name (as an argument of ``_reconstruct``) but never call."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __call__(self, *args, **kwargs):
        raise GroundTruthPickleError(
            f"refusing to call {self.qualname}(...) from a ground-truth pickle: it would allocate memory the file "
            "does not hold (the file is corrupt or hostile, not a revisitop gnd file)")


_NDARRAY = _Refused("numpy.ndarray")


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The numpy callables an array pickle needs, under numpy 1.x (numpy.core) and 2.x (numpy._core) names.

    Resolved here, never by importing the module named in the pickle (which would run arbitrary imports).
    ``numpy.ndarray`` resolves to a token that only ``_reconstruct`` accepts, and ``_reconstruct`` only builds
    the empty array that ``ndarray.__reduce__`` always asks for (shape (0,)): the data then comes from the file
    itself, in ``__setstate__``, which checks its length; ``scalar`` must be given its data too. So no call can
    make a large array out of a small file.
    """
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric

    def reconstruct(subtype, shape, dtype):
        if subtype is not _NDARRAY:
            raise GroundTruthPickleError(f"refusing _reconstruct of {subtype!r}: only numpy.ndarray is allowed")
        if not isinstance(shape, tuple) or math.prod(int(d) for d in shape) != 0:
            raise GroundTruthPickleError(f"refusing _reconstruct with shape {shape!r}: numpy pickles ask for an "
                                         "empty array and fill it from the file")
        return multiarray._reconstruct(np.ndarray, shape, dtype)

    def scalar(dtype, *obj):
        # numpy pickles a scalar as scalar(dtype, its bytes); scalar(dtype) alone allocates dtype.itemsize
        # bytes of nothing (np.dtype(('V', 10**9)) makes that 1 GB)
        if len(obj) != 1:
            raise GroundTruthPickleError("refusing numpy scalar(dtype) without its data in a ground-truth pickle")
        return multiarray.scalar(dtype, obj[0])

    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        # protocol-5 pickles of contiguous arrays rebuild them from a raw buffer (of the file's own bytes)
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # protocol-2 pickles store bytes (e.g. an array's raw data) as _codecs.encode(text, 'latin1'); only that
    # codec is let through, and the bytes are as long as the text the file holds
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise GroundTruthPickleError(f"ground-truth pickle asks for codec {encoding!r}; only latin1 allowed")
    return text.encode("latin1")


def _empty_bytes(*args) -> bytes:
    # protocol-2 pickles write an empty bytes object (the data of an empty array) as a call bytes(); any argument
    # would be a size (bytes(10**8): 100 MB out of a few bytes of file) or a copy, and is refused
    if args:
        raise GroundTruthPickleError("refusing bytes(...) with arguments in a ground-truth pickle: only the empty "
                                     "bytes() of protocol 2 is allowed (the file is corrupt or hostile)")
    return b""


# bytes and bytearray are left out on purpose: bytes(n) / bytearray(n) allocate n bytes from a tiny file
_BUILTIN_NAMES = ("set", "frozenset", "list", "dict", "tuple", "str", "int", "float", "complex", "bool")


class GroundTruthUnpickler(pickle.Unpickler):
    """An unpickler that only builds containers, primitives and numpy arrays/scalars.

    The revisitop gnd files are plain dicts of lists and numpy arrays; anything else (``os.system``,
    ``subprocess``, ``builtins.eval``...) in such a file is refused with :class:`GroundTruthPickleError` (a
    ``pickle.UnpicklingError``), and so is every call that could allocate more than the file holds
    (``bytes(n)``, ``bytearray(n)``, ``numpy.ndarray(shape)``).
    """

    def __init__(self, file, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self._allowed = _numpy_globals()
        for mod in ("builtins", "__builtin__"):
            for name in _BUILTIN_NAMES:
                self._allowed[(mod, name)] = getattr(__import__("builtins"), name)
            self._allowed[(mod, "bytes")] = _empty_bytes
        self._allowed[("_codecs", "encode")] = _latin1_encode

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise GroundTruthPickleError(
                f"refusing to load global '{module}.{name}' from a ground-truth pickle: only containers, "
                "primitives and numpy arrays are allowed (the file is corrupt or not a revisitop gnd file)"
            ) from None


def _names(values, *, path: str, field: str) -> list[str]:
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind == "U":
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise GroundTruthError(f"{path}: '{field}' must be a list of image names (str), got a "
                               f"{type(values).__name__}" + (f" ({values[:40]!r})" if isinstance(values, str) else ""))
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v:
            raise GroundTruthError(f"{path}: '{field}'[{i}] must be a non-empty image name (str), got "
                                   f"{type(v).__name__} {v!r:.60}")
    return [str(v) for v in values]


def _bbx(values, *, where: str) -> np.ndarray:
    try:
        bbx = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        bbx = None
    if bbx is None or bbx.shape != (4,) or not np.isfinite(bbx).all():
        raise GroundTruthError(f"{where} must be 4 finite numbers (x1, y1, x2, y2), got {values!r:.80}")
    return bbx


def _index_array(values, *, what: str, n_db: int) -> np.ndarray:
    if isinstance(values, (str, bytes, dict)):
        raise GroundTruthError(f"{what} must be a list or array of database indices, got a {type(values).__name__}")
    try:
        a = np.asarray(values if values is not None else [])
    except (TypeError, ValueError) as exc:
        raise GroundTruthError(f"{what} must be a list or array of database indices ({exc})") from None
    if a.size == 0:
        return np.empty(0, dtype=np.int64)
    if sum(d > 1 for d in a.shape) > 1:
        raise GroundTruthError(f"{what} must be one list of database indices, got an array of shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.floating) or not np.all(a == np.round(a)):
            raise GroundTruthError(f"{what} must hold integer database indices, got dtype {a.dtype}")
    a = a.reshape(-1).astype(np.int64)
    if a.min() < 0 or a.max() >= n_db:
        raise GroundTruthError(f"{what} has indices outside [0, {n_db}): min {a.min()}, max {a.max()}")
    return a


def load_ground_truth(path: str | os.PathLike) -> dict:
    """Load and validate a revisitop ``gnd_<name>.pkl`` through :class:`GroundTruthUnpickler`.

    Returns a dict with 'imlist' (list[str]), 'qimlist' (list[str]) and 'gnd': one dict per query with
    'bbx' ((4,) float64 x1, y1, x2, y2), 'easy', 'hard', 'junk' ((n,) int64 database indices);
    other keys are kept. A missing file raises FileNotFoundError; an empty, truncated, hostile or malformed one
    :class:`GroundTruthError` (a ValueError) naming the file and the field.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise GroundTruthError(f"{path} is empty (0 bytes): an interrupted download or copy; fetch it again "
                                   "(python prepare_data.py download --root DATA --datasets NAME)")
        try:
            cfg = GroundTruthUnpickler(f).load()
        except GroundTruthPickleError as e:
            raise GroundTruthPickleError(f"{path}: {e}") from None
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError,
                KeyError) as e:
            raise GroundTruthError(f"{path} is not a readable ground-truth pickle: truncated or damaged "
                                   f"({type(e).__name__}: {e}); fetch it again") from None
    if not isinstance(cfg, dict):
        raise GroundTruthError(f"{path}: expected a dict at the top level, got {type(cfg).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if missing:
        raise GroundTruthError(f"{path}: ground truth lacks keys {missing} (expected 'imlist', 'qimlist', 'gnd')")
    imlist = _names(cfg["imlist"], path=path, field="imlist")
    qimlist = _names(cfg["qimlist"], path=path, field="qimlist")
    if not isinstance(cfg["gnd"], (list, tuple)):
        raise GroundTruthError(f"{path}: 'gnd' must be a list with one dict per query, got a "
                               f"{type(cfg['gnd']).__name__}")
    if len(cfg["gnd"]) != len(qimlist):
        raise GroundTruthError(f"{path}: {len(cfg['gnd'])} 'gnd' entries for {len(qimlist)} queries")
    gnd = []
    for i, g in enumerate(cfg["gnd"]):
        if not isinstance(g, dict):
            raise GroundTruthError(f"{path}: gnd[{i}] is a {type(g).__name__}, expected a dict")
        lacking = [k for k in ("bbx", "easy", "hard", "junk") if k not in g]
        if lacking:
            raise GroundTruthError(f"{path}: gnd[{i}] lacks keys {lacking}")
        entry = dict(g)
        entry["bbx"] = _bbx(g["bbx"], where=f"{path}: gnd[{i}]['bbx']")
        for key in ("easy", "hard", "junk"):
            entry[key] = _index_array(g[key], what=f"{path}: gnd[{i}]['{key}']", n_db=len(imlist))
        gnd.append(entry)
    out = dict(cfg)
    out.update(imlist=imlist, qimlist=qimlist, gnd=gnd)
    return out


def describe_item(dataset: Dataset, index: int) -> str:
    """Which image item ``index`` of ``dataset`` is, for error messages (a model failing on one image, a NaN
    descriptor): the dataset's own ``describe(index)`` when it has one (file, query box, resizing), else its
    ``image_paths[index]``; ``ConcatDataset`` and ``Subset`` are followed down to the dataset that holds it."""
    index = int(index)
    while True:
        if isinstance(dataset, ConcatDataset):
            k = bisect.bisect_right(dataset.cumulative_sizes, index)
            index -= dataset.cumulative_sizes[k - 1] if k else 0
            dataset = dataset.datasets[k]
        elif isinstance(dataset, Subset):
            index, dataset = int(dataset.indices[index]), dataset.dataset
        else:
            break
    if hasattr(dataset, "describe"):
        return dataset.describe(index)
    paths = getattr(dataset, "image_paths", None)
    if paths is not None:
        return f"{type(dataset).__name__} item {index}: {paths[index]}"
    return f"item {index} of a {type(dataset).__name__}"


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


class RevisitedDataset(ScaledImages):
    """ROxford5k, RParis6k (or any dataset in their layout), database or query side.

    Item i -> list of (3, H_s, W_s) tensors, one per scale.

    Layout: ``<root>/<name>/gnd_<name>.pkl`` (imlist, qimlist, gnd: bbx, easy, hard, junk per query;
    :func:`load_ground_truth`) and the images in one flat folder, ``<root>/<name>/jpg/<image>.jpg``, named in the
    pkl without their extension.

    Queries are cropped to their ``bbx`` once, before any resizing (the official protocol); database images
    are used whole. Images are read at their stored size (at most 1024 a side) in BGR and normalised with
    ``convention``.

    ``min_side`` (:func:`datasets.transforms.min_size_guard`) enlarges an image or query crop whose short side
    is below it, before the scales are applied. None (the release's protocol, eval's default) keeps the stored
    size: an image or crop with a short side below :data:`datasets.transforms.SMALLEST_SIDE` (92 px) then fails
    inside SuperGlobal with a padding error, which the engine should report with :meth:`describe` (the file,
    its box, the resizing) and the advice to set ``data.min_side`` (96 is safe).
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
            raise InvalidValueError(f"invalid dataset name {name!r}")
        if split not in ("db", "query"):
            raise InvalidValueError(f"split must be 'db' or 'query', got {split!r}")
        self.root = os.fspath(root)
        self.name, self.split = name, split
        self.convention, self.scales, self.min_side = convention, tuple(float(s) for s in scales), min_side
        self.data_dir = os.path.join(self.root, name)
        self.image_dir = os.path.join(self.data_dir, "jpg")
        self.gnd_path = os.path.join(self.data_dir, f"gnd_{name}.pkl")
        if not os.path.isdir(self.data_dir):
            raise MissingFileError(f"dataset {name} not found: no folder {self.data_dir}.\n"
                                   + _download_hint(self.root, name))
        if not os.path.isfile(self.gnd_path):
            raise MissingFileError(f"dataset {name}: ground-truth file {self.gnd_path} is missing.\n"
                                   + _download_hint(self.root, name))
        if not os.path.isdir(self.image_dir):
            raise MissingFileError(f"dataset {name}: image folder {self.image_dir} is missing.\n"
                                   + _download_hint(self.root, name))
        cfg = load_ground_truth(self.gnd_path)
        self.imlist: list[str] = cfg["imlist"]
        self.qimlist: list[str] = cfg["qimlist"]
        self.gnd: list[dict] = cfg["gnd"]
        names = self.qimlist if split == "query" else self.imlist
        self.image_paths: list[str] = [os.path.join(self.image_dir, n + ".jpg") for n in names]
        self.bbxs: list[np.ndarray] | None = [g["bbx"] for g in self.gnd] if split == "query" else None

    def read(self, index: int) -> np.ndarray:
        """The uint8 BGR (H, W, 3) image at its stored size, cropped to its bbx on the query side."""
        img = read_image(self.image_paths[index], dataset=f"{self.name} ({self.split})")
        if self.bbxs is not None:
            img = crop_query(img, self.bbxs[index])
        return min_size_guard(img, self.min_side)

    def describe(self, index: int) -> str:
        """Which image item ``index`` is: dataset, split, file, and the query box and resizing applied."""
        text = f"{self.name} ({self.split}) item {index}: {self.image_paths[index]}"
        if self.bbxs is not None:
            text += f", cropped to bbx {tuple(float(v) for v in self.bbxs[index])}"
        if self.min_side is not None:
            text += f", short side enlarged to min_side {self.min_side} when below it"
        return text

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
        raise InvalidValueError(f"shard {i} of {n} is not valid (need 0 <= i < n, n >= 1)")
    return range(i * total // n, (i + 1) * total // n)


class Revisitop1M(ScaledImages):
    """The R1M distractors (1,001,001 listed); item i -> list of (3, H_s, W_s) tensors, one per scale.

    ``<root>/revisitop1m/revisitop1m.txt`` lists one image path per line, relative to ``<root>/revisitop1m/jpg/``.
    """

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
            raise MissingFileError(
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

    def read(self, index: int) -> np.ndarray:
        img = read_image(self.image_paths[index], dataset=self.name)
        return min_size_guard(img, self.min_side)

    def describe(self, index: int) -> str:
        """Which image item ``index`` is (for error messages)."""
        text = f"{self.name} item {index}: {self.image_paths[index]}"
        if self.min_side is not None:
            text += f", short side enlarged to min_side {self.min_side} when below it"
        return text

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
