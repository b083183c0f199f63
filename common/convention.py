"""Input conventions: the channel order and normalisation a set of weights expects."""
from __future__ import annotations

from dataclasses import dataclass


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
            raise ValueError(f"channel_order must be 'BGR' or 'RGB', got {self.channel_order!r}")

    def to_dict(self) -> dict:
        return {"channel_order": self.channel_order, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> InputConvention:
        return cls(channel_order=d["channel_order"], mean=tuple(d["mean"]), std=tuple(d["std"]))

    def as_rgb(self) -> InputConvention:
        """The same normalisation expressed for an RGB tensor (channels reversed when BGR)."""
        if self.channel_order == "RGB":
            return self
        return InputConvention("RGB", tuple(reversed(self.mean)), tuple(reversed(self.std)))


#: The convention of the released CVPR2022_CVNet_R50/R101.pyth files (pycls lineage: BGR).
OFFICIAL_CONVENTION = InputConvention()
#: torchvision's ImageNet weights expect RGB with these statistics.
TORCHVISION_CONVENTION = InputConvention("RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
