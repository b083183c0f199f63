"""common.convention: the official convention is BGR pycls statistics; as_rgb reverses channels."""
import pytest

from common.convention import OFFICIAL_CONVENTION, TORCHVISION_CONVENTION, InputConvention


def test_official_is_bgr_and_as_rgb_matches_torchvision_statistics():
    assert OFFICIAL_CONVENTION.channel_order == "BGR"
    rgb = OFFICIAL_CONVENTION.as_rgb()
    assert rgb.mean == TORCHVISION_CONVENTION.mean and rgb.std == TORCHVISION_CONVENTION.std


def test_dict_round_trip_and_bad_order():
    assert InputConvention.from_dict(TORCHVISION_CONVENTION.to_dict()) == TORCHVISION_CONVENTION
    with pytest.raises(ValueError, match="channel_order"):
        InputConvention("BRG")


def test_models_checkpoint_reexports_the_same_objects():
    from models import checkpoint

    assert checkpoint.InputConvention is InputConvention
    assert checkpoint.OFFICIAL_CONVENTION is OFFICIAL_CONVENTION
