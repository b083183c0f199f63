"""Image reading, query cropping, multi-scale resizing and normalisation, as the official releases do them: images
are read with OpenCV (uint8, BGR), resized as uint8 with ``cv2.resize`` (:func:`resize_scale`), and only
:func:`to_tensor` turns them into normalised CHW floats. Also the project's one image reader (:func:`read_image`)
and the size limits the models need (:data:`SMALLEST_SIDE`, :func:`fit_sides`).
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.convention import InputConvention
from common.errors import InvalidValueError, MissingFileError
from common.io import io_error, printable_path

#: The least short side (pixels) SuperGlobal accepts: its Scale-GeM first shrinks the image to 0.7071, and
#: int(92 * 0.7071) = 65 gives a 3 x 3 stage-4 map (stride 32), the least that Regional-GeM's reflection padding of 2
#: allows; 91 px gives 2 x 2 and a padding RuntimeError inside the model. CVNet-Global (plain GeM) has no such limit.
#: ``min_side`` (:func:`min_size_guard`, :func:`fit_sides`) enlarges smaller images: the retrieval API uses 96;
#: evaluation follows the release and leaves ``data.min_side`` unset.
SMALLEST_SIDE = 92


def _cv2():
    import cv2

    return cv2


class CorruptImageError(InvalidValueError):
    """An image file that exists but cannot be decoded, or only in part (a truncated download or copy), or
    whose header announces more pixels than the reader's limit; ``.path`` names it so that a training loop
    can skip and count it."""

    def __init__(self, path: str | os.PathLike, reason: str = "cannot be decoded") -> None:
        self.path = os.fspath(path)
        super().__init__(f"corrupt image {printable_path(self.path)}: {reason}")


#: The most pixels (width x height, from the file's header) an image may have to be decoded: 2**27, about
#: 134 million (a 16384 x 8192 panorama, a 108-megapixel photo), 384 MiB as uint8 BGR. A decompression bomb
#: (a few MB of PNG that decode to gigabytes) is refused before any memory is spent on it. ``max_pixels=``
#: of :func:`read_image` (``retrieve.py --max-pixels``) raises or lowers it.
DEFAULT_MAX_PIXELS = 1 << 27

_JPEG_SOI, _JPEG_EOI, _JPEG_SOS = b"\xff\xd8", b"\xff\xd9", 0xDA
# markers that stand alone, without a length field: TEM and the restart markers RST0..7
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def jpeg_truncation(data: bytes) -> str | None:
    """Why the JPEG bytes ``data`` are incomplete, or None when they end properly.

    libjpeg decodes a truncated file anyway (the lost rows come out flat grey) and only prints "Premature end of
    JPEG file" on stderr, so OpenCV cannot tell. The check: walk the marker segments from the start to the
    first start-of-scan (stepping over APPn/COM segments, where an embedded thumbnail carries its own
    end-of-image marker), then require an end-of-image marker (FF D9) after it. Inside entropy-coded data an
    FF byte is always followed by 00 or a restart marker, so FF D9 there is the real end. Data appended after
    it (some cameras add a preview or a video) is allowed.
    """
    n, i = len(data), 2
    while True:
        if i + 1 >= n:
            return "the file ends inside its headers (truncated)"
        if data[i] != 0xFF:  # not a marker where one must be: let the decoder judge the rest
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == _JPEG_SOS:
            break
        if marker == 0xD9:
            return "it ends before any image data (truncated)"
        if marker in _STANDALONE:
            i += 2
            continue
        if i + 3 >= n:
            return "the file ends inside its headers (truncated)"
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    if data.find(_JPEG_EOI, i) < 0:
        return ("truncated JPEG: no end-of-image marker after the image data, so part of the image would decode "
                "as flat grey (an interrupted download or copy); fetch or copy the file again")
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that the header of the encoded image ``data`` announces, or None when the format is
    not one whose header can be read (JPEG, PNG, BMP, WebP, TIFF, GIF, PNM, JPEG 2000, ...: :mod:`imagesize`)."""
    import imagesize

    width, height = imagesize.get(io.BytesIO(data), exif_rotation=False)
    return (width, height) if width > 0 and height > 0 else None


def check_encoded(data: bytes, *, name: str | os.PathLike = "image", max_pixels: int | None = None,
                  where: str = "") -> tuple[int, int]:
    """What can be checked of an encoded image before decoding it: a JPEG that is truncated
    (:func:`jpeg_truncation`), a header that gives no size, or more pixels than ``max_pixels`` (None:
    :data:`DEFAULT_MAX_PIXELS`), each a :class:`CorruptImageError` naming ``name``. Returns (width, height)."""
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if data.startswith(_JPEG_SOI):
        reason = jpeg_truncation(data)
        if reason is not None:
            raise CorruptImageError(name, reason + where)
    size = image_size(data)
    if size is None:
        raise CorruptImageError(name, f"not an image whose size can be read from its header{where} (JPEG, PNG, "
                                      "BMP, WebP, TIFF, PPM/PGM, ...), or a damaged one")
    if size[0] * size[1] > limit:
        raise CorruptImageError(name, f"{size[0]} x {size[1]} = {size[0] * size[1]:,} pixels is over the limit of "
                                      f"{limit:,}{where} (a decompression bomb? raise max_pixels, --max-pixels, "
                                      "if the image is real)")
    return size


def decode_image(data: bytes, *, name: str | os.PathLike = "image", max_pixels: int | None = None,
                 where: str = "") -> np.ndarray:
    """Decode the bytes of an image file as uint8 (H, W, 3) BGR (``cv2.imdecode``, IMREAD_COLOR: the pixels and
    EXIF orientation of the releases' ``cv2.imread``), once :func:`check_encoded` passes. Every refusal and every
    decoder error is a :class:`CorruptImageError` naming ``name``."""
    check_encoded(data, name=name, max_pixels=max_pixels, where=where)
    cv2 = _cv2()
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CorruptImageError(name, f"the decoder failed{where}: {message}") from None
    if img is None:
        raise CorruptImageError(name, f"could not decode image file{where}: unreadable, truncated or not an image")
    return img


def _read_bytes(path: str | os.PathLike, where: str) -> bytes:
    if not os.path.isfile(path):
        raise MissingFileError(f"image file not found: {printable_path(path)}{where}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise io_error(path, exc, action="read") from exc


def check_image_file(path: str | os.PathLike, *, max_pixels: int | None = None) -> tuple[int, int]:
    """:func:`check_encoded` of an image file, without decoding it (a query checked before a model is loaded
    for it): (width, height), or the error :func:`read_image` would raise on the file's header."""
    return check_encoded(_read_bytes(path, ""), name=path, max_pixels=max_pixels)


def read_image(path: str | os.PathLike, *, dataset: str | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as uint8 (H, W, 3) in BGR order: the project's one image reader.

    The file's bytes are read here and decoded from memory (:func:`decode_image`), so a path of any bytes
    works (OpenCV is never handed a path it cannot encode). A missing file raises
    :class:`common.errors.MissingFileError`, one that cannot be read :class:`common.errors.ProjectIOError`; a
    file that does not decode, a truncated JPEG, or one over ``max_pixels`` (None: :data:`DEFAULT_MAX_PIXELS`)
    :class:`CorruptImageError` (a ValueError) naming the file.
    """
    where = f" (dataset {dataset})" if dataset else ""
    return decode_image(_read_bytes(path, where), name=path, max_pixels=max_pixels, where=where)


def _check_image(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", None)
        raise InvalidValueError(f"expected an (H, W, 3) image array, got shape {shape}")
    if img.dtype != np.uint8:
        raise InvalidValueError(f"expected a uint8 image, got dtype {img.dtype}")


def crop_query(img: np.ndarray, bbx: Sequence[float]) -> np.ndarray:
    """The official query crop ``img[int(y1):int(y2), int(x1):int(x2)]`` for ``bbx = (x1, y1, x2, y2)``.

    Coordinates are truncated with ``int()`` like the release (so 10.9 -> 10). A stop beyond the image is
    clipped by slicing, as in the release; a negative start or an empty crop is an error rather than a silent
    wrap-around.
    """
    coords = [float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1)]
    if len(coords) != 4 or not all(math.isfinite(v) for v in coords):
        raise InvalidValueError(f"bbx must be 4 finite numbers (x1, y1, x2, y2), got {bbx!r}")
    x1, y1, x2, y2 = (int(v) for v in coords)
    if x1 < 0 or y1 < 0:
        raise InvalidValueError(f"bbx {tuple(coords)} has a negative start ({x1}, {y1})")
    crop = img[y1:y2, x1:x2]
    if crop.shape[0] == 0 or crop.shape[1] == 0:
        raise InvalidValueError(
            f"bbx {tuple(coords)} gives an empty crop of an image of size "
            f"(H={img.shape[0]}, W={img.shape[1]})"
        )
    return crop


def resize_scale(img: np.ndarray, scale: float) -> np.ndarray:
    """The release's multi-scale step on the uint8 image: ``cv2.resize(fx=fy=scale)``.

    scale == 1 returns the image unchanged; below 1 uses INTER_AREA, above 1 INTER_LINEAR.
    """
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise InvalidValueError(f"scale must be a positive number, got {scale}")
    if scale == 1.0:
        return img
    h, w = img.shape[:2]
    if min(h, w) * scale < 0.5:
        raise InvalidValueError(f"scale {scale} shrinks an image of size (H={h}, W={w}) to nothing")
    cv2 = _cv2()
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(img, dsize=(0, 0), fx=scale, fy=scale, interpolation=interpolation)


def min_size_guard(img: np.ndarray, min_side: int | None, *, max_side: int | None = None) -> np.ndarray:
    """Enlarge (INTER_LINEAR, aspect kept) an image whose short side is below ``min_side``; otherwise no-op.

    Some GLDv2 images are only a few pixels wide and would vanish at stride 32 or at scale 0.7071; below
    :data:`SMALLEST_SIDE` (92 px) SuperGlobal fails outright. ``max_side`` caps the enlargement: the long side
    never grows beyond it, so an image of extreme aspect ratio (10 x 4000) keeps a short side below
    ``min_side`` rather than becoming 96 x 38400. An image already at (or above) ``max_side`` is returned
    unchanged: shrinking is :func:`downscale_to_max_side`'s job.
    """
    if min_side is None:
        return img
    if min_side < 1:
        raise InvalidValueError(f"min_side must be >= 1, got {min_side}")
    if max_side is not None and max_side < min_side:
        raise InvalidValueError(f"max_side ({max_side}) must be >= min_side ({min_side})")
    h, w = img.shape[:2]
    short = min(h, w)
    if short >= min_side:
        return img
    if short == 0:
        raise InvalidValueError(f"cannot enlarge an empty image of size (H={h}, W={w})")
    if h <= w:
        new_h, new_w = min_side, max(min_side, round(w * min_side / h))
    else:
        new_h, new_w = max(min_side, round(h * min_side / w)), min_side
    if max_side is not None and max(new_h, new_w) > max_side:
        factor = max_side / max(h, w)
        if factor <= 1.0:
            return img
        new_h, new_w = (max_side, round(w * factor)) if h >= w else (round(h * factor), max_side)
    cv2 = _cv2()
    return cv2.resize(img, dsize=(new_w, new_h), interpolation=cv2.INTER_LINEAR)


def downscale_to_max_side(img: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """Shrink (INTER_AREA, aspect kept) so that max(H, W) <= ``max_side``; returns (image, factor applied).

    The image comes back unchanged with factor 1.0 when it already fits (or ``max_side`` is None).
    """
    h, w = img.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return img, 1.0
    if max_side < 1:
        raise InvalidValueError(f"max_side must be >= 1, got {max_side}")
    cv2 = _cv2()
    factor = max_side / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(img, dsize=size, interpolation=cv2.INTER_AREA), factor


def enlarge_within(img: np.ndarray, *, min_side: int | None, max_side: int | None) -> np.ndarray:
    """Enlarge an image whose short side is below ``min_side``, never taking its long side past ``max_side``.

    - short side >= ``min_side`` (or ``min_side`` None): unchanged.
    - enlarging the short side to ``min_side`` keeps the long side <= ``max_side`` (or ``max_side`` None):
      :func:`min_size_guard` (INTER_LINEAR, aspect kept).
    - otherwise the aspect ratio exceeds ``max_side / min_side`` (a 10 x 4000 strip would become 96 x 32768, 104 s
      and 3 GB): enlarged until the long side is ``max_side`` (INTER_LINEAR, aspect kept), then the short side is
      padded to ``min_side`` by repeating its edge pixels (``cv2.BORDER_REPLICATE``), centred. Both limits hold,
      so the image can go through SuperGlobal (:data:`SMALLEST_SIDE`), the picture is not distorted and the
      padding adds no new structure.
    """
    if min_side is None:
        return img
    if max_side is not None and max_side < min_side:
        raise InvalidValueError(f"max_side ({max_side}) must be >= min_side ({min_side})")
    h, w = img.shape[:2]
    short, long = min(h, w), max(h, w)
    if short >= min_side:
        return img
    if max_side is None or short == 0 or max(min_side, round(long * min_side / short)) <= max_side:
        return min_size_guard(img, min_side)
    cv2 = _cv2()
    factor = max_side / long
    new_h, new_w = (max(1, round(h * factor)), max_side) if h <= w else (max_side, max(1, round(w * factor)))
    img = cv2.resize(img, dsize=(new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad = min_side - min(new_h, new_w)
    before, after = pad // 2, pad - pad // 2
    top, bottom, left, right = (before, after, 0, 0) if new_h <= new_w else (0, 0, before, after)
    return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_REPLICATE)


def fit_sides(img: np.ndarray, *, min_side: int | None, max_side: int | None) -> np.ndarray:
    """Bring a whole image within the size limits of the retrieval pipeline, longest side first:
    :func:`downscale_to_max_side`, then :func:`enlarge_within`. The result always has ``max(H, W) <= max_side``
    and ``min(H, W) >= min_side`` (either limit may be None). A query box must be cropped between the two steps
    (in the downscaled image's pixels); call the two functions directly then.
    """
    img, _ = downscale_to_max_side(img, max_side)
    return enlarge_within(img, min_side=min_side, max_side=max_side)


def to_tensor(img_bgr_uint8: np.ndarray, convention: InputConvention) -> torch.Tensor:
    """uint8 BGR (H, W, 3) -> float32 (3, H, W): /255, channels in ``convention.channel_order``, (x-mean)/std.

    ``convention.mean``/``std`` are listed in its channel order; an RGB convention reverses the channel axis
    first, so the official BGR convention and its ``as_rgb()`` give the same tensor up to the channel flip.
    """
    _check_image(img_bgr_uint8)
    img = img_bgr_uint8 if convention.channel_order == "BGR" else img_bgr_uint8[:, :, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).to(torch.float32) / 255.0
    mean = torch.tensor(convention.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(convention.std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def multiscale_tensors(
    img: np.ndarray, scales: Sequence[float], convention: InputConvention
) -> list[torch.Tensor]:
    """One normalised (3, H_s, W_s) tensor per scale of the uint8 BGR image (resize first, then normalise)."""
    _check_image(img)
    return [to_tensor(resize_scale(img, s), convention) for s in scales]


class ScaledImages(Dataset):
    """What the evaluation datasets share: item i is one normalised (3, H_s, W_s) tensor per scale of
    ``self.read(i)`` (uint8 BGR), and ``missing_images`` lists the files of ``self.image_paths`` not on disk.
    Subclasses set ``image_paths``, ``scales``, ``convention`` and implement ``read``."""

    image_paths: list[str]
    scales: tuple[float, ...]
    convention: InputConvention

    def read(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return multiscale_tensors(self.read(index), self.scales, self.convention)

    def missing_images(self) -> list[str]:
        """Paths of this set's images that are not on disk."""
        return [p for p in self.image_paths if not os.path.isfile(p)]
