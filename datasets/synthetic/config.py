"""What decides a synthetic build: :class:`SyntheticConfig`, stored in ``meta.json`` and compared on rebuild."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from common.errors import InvalidValueError


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that decides the generated dataset; stored in ``meta.json`` and compared on rebuild.

    ``image_size`` is (long side, short side) in pixels; a view is landscape or, with probability
    ``portrait_fraction``, portrait. Scenes are drawn on a landscape canvas ``canvas_scale`` times the image.
    ``easy_fraction`` / ``junk_fraction`` set the mix of view kinds *drawn* for database views 3.. (the rest
    are drawn hard); the stored label is then decided by the thresholds below (the rules: docs/evaluation.md,
    "How the built-in benchmark is drawn").
    """

    seed: int = 0
    n_landmarks: int = 12
    views_per_landmark: int = 8
    queries_per_landmark: int = 1
    n_distractors: int = 40
    image_size: tuple[int, int] = (256, 192)
    canvas_scale: float = 2.5
    portrait_fraction: float = 0.25
    train_landmarks: int = 24
    train_views_per_landmark: int = 10
    jpeg_quality: int = 90
    easy_fraction: float = 0.45
    junk_fraction: float = 0.15
    junk_max_visible: float = 0.25
    easy_min_visible: float = 0.7
    easy_max_tilt: float = 0.12
    easy_max_rotation: float = 8.0
    easy_max_zoom: float = 1.4

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if len(self.image_size) != 2 or self.image_size[1] < 32 or self.image_size[0] < self.image_size[1]:
            raise InvalidValueError(f"image_size must be (long, short) with long >= short >= 32, got {self.image_size}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidValueError(f"seed must be a non-negative int, got {self.seed!r}")
        for field in ("n_landmarks", "views_per_landmark", "queries_per_landmark", "train_landmarks",
                      "train_views_per_landmark"):
            if getattr(self, field) < 1:
                raise InvalidValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.n_distractors < 0:
            raise InvalidValueError(f"n_distractors must be >= 0, got {self.n_distractors}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InvalidValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.canvas_scale < 1.5:
            raise InvalidValueError("canvas_scale must be >= 1.5 (views must fit in the scene), got "
                                    f"{self.canvas_scale}")
        for field in ("portrait_fraction", "easy_fraction", "junk_fraction"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise InvalidValueError(f"{field} must be in [0, 1], got {getattr(self, field)}")
        if self.easy_fraction + self.junk_fraction > 1.0:
            raise InvalidValueError("easy_fraction + junk_fraction must be <= 1")
        if not 0.0 < self.junk_max_visible < self.easy_min_visible <= 1.0:
            raise InvalidValueError("need 0 < junk_max_visible < easy_min_visible <= 1")

    def to_dict(self) -> dict:
        """The config as JSON-ready builtins (tuples as lists), the form stored in ``meta.json``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))
