"""Input conventions: the channel order and normalisation a set of weights expects."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidValueError


@dataclass(frozen=True)
class InputConvention:
    """How images must be fed to a set of weights.

    ``mean``/``std`` are listed in ``channel_order`` (the order of the tensor's channel axis).
    The official CVNet/SuperGlobal weights descend from pycls ImageNet weights trained on BGR input.
    """

    channel_order: str = "BGR"
    mean: tuple[float, float, float] = (0.406, 0.456, 0.485)
    std: tuple[float, float, float] = (0.225, 0.224, 0.229)

    def __post_init__(self) -> None:
        if self.channel_order not in ("BGR", "RGB"):
            raise InvalidValueError(f"channel_order must be 'BGR' or 'RGB', got {self.channel_order!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if (not isinstance(values, (tuple, list)) or len(values) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in values)):
                raise InvalidValueError(f"input convention {name} must be 3 finite numbers (one per channel), got "
                                        f"{values!r}")
        if min(self.std) <= 0:
            raise InvalidValueError(f"input convention std must be positive, got {self.std!r}")

    def to_dict(self) -> dict:
        return {"channel_order": self.channel_order, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputConvention:
        """The inverse of :meth:`to_dict`; a malformed dict is a ValueError that says what is wrong."""
        if not isinstance(d, Mapping) or set(d) != {"channel_order", "mean", "std"}:
            raise InvalidValueError("an input convention is a mapping with exactly channel_order, mean and std, got "
                                    f"{dict(d) if isinstance(d, Mapping) else d!r}")
        mean, std = d["mean"], d["std"]
        if not isinstance(mean, (list, tuple)) or not isinstance(std, (list, tuple)):
            raise InvalidValueError(f"input convention mean and std must be lists, got {mean!r} and {std!r}")
        return cls(channel_order=d["channel_order"], mean=tuple(mean), std=tuple(std))

    def as_rgb(self) -> InputConvention:
        """The same normalisation expressed for an RGB tensor (channels reversed when BGR)."""
        if self.channel_order == "RGB":
            return self
        return InputConvention("RGB", tuple(reversed(self.mean)), tuple(reversed(self.std)))


#: The convention of the released CVPR2022_CVNet_R50/R101.pyth files (pycls lineage: BGR).
OFFICIAL_CONVENTION = InputConvention()
#: torchvision's ImageNet weights expect RGB with these statistics.
TORCHVISION_CONVENTION = InputConvention("RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
