"""A small class folder written by hand (datasets.folder's evaluation layout): two query classes, a junk image, a
class without queries, an image without a class, a hidden folder and one query box."""
from pathlib import Path

import cv2
import numpy as np


def write_image(path: Path, h: int, w: int, value: int) -> None:
    """A uint8 BGR image of (h, w) that is not flat (a corner block in the opposite shade), written with OpenCV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), value, np.uint8)
    img[: h // 2, : w // 3] = 255 - value
    assert cv2.imwrite(str(path), img)


def make_class_folder(root: Path) -> Path:
    """``root``: query/{eiffel/q1.jpg, louvre/nested/q2.png}; gallery/eiffel/{a,b,blurry}.jpg (blurry listed as junk),
    gallery/louvre/c.jpg, gallery/pisa/d.jpg (a class with no query), gallery/loose.jpg (no class),
    gallery/.thumbs/x.jpg (hidden); a box for eiffel/q1.jpg. Returns ``root``."""
    write_image(root / "query" / "eiffel" / "q1.jpg", 60, 80, 10)
    write_image(root / "query" / "louvre" / "nested" / "q2.png", 50, 70, 20)
    for rel, value in (("eiffel/a.jpg", 30), ("eiffel/b.jpg", 40), ("eiffel/blurry.jpg", 50), ("louvre/c.jpg", 60),
                       ("pisa/d.jpg", 70), ("loose.jpg", 80), (".thumbs/x.jpg", 90)):
        write_image(root / "gallery" / rel, 40, 50, value)
    (root / "gallery" / "eiffel" / "notes.txt").write_text("not an image")
    (root / "junk.txt").write_text("# barely visible\neiffel/blurry.jpg\n\n")
    (root / "query_boxes.csv").write_text("path,x1,y1,x2,y2\neiffel/q1.jpg,10,5,40.5,35\n")
    return root
