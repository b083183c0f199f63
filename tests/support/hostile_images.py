"""Image files an attacker (or a damaged disk) hands the readers: a PNG whose header announces more pixels than
its few bytes hold (a decompression bomb, kept small: only its first rows are stored, which is all a size check
may look at), and a JPEG with an EXIF orientation, for checks that the reader keeps OpenCV's behaviour."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: str | os.PathLike | bytes, width: int, height: int, *, rows: int = 4) -> None:
    """An 8-bit RGB PNG whose header says ``width`` x ``height`` while it stores ``rows`` rows of zeros: a
    decoder that trusts the header allocates width * height * 3 bytes before it finds the data short."""
    raw = (b"\x00" * (1 + 3 * width)) * rows
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def exif_rotated_jpeg(path: str | os.PathLike, orientation: int = 6) -> np.ndarray:
    """A 40 x 80 JPEG (left half white) whose EXIF orientation tag asks viewers to rotate it; returns the stored
    (un-rotated) RGB pixels."""
    from PIL import Image

    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    return pixels
