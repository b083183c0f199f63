"""TimmGlobal / FeatureMapGlobal: CNN maps and ViT patch tokens pooled to L2-normalised descriptors, pooling
against models.functional, local weights files, random init only (no download)."""
import pytest
import torch
import torch.nn.functional as F

from models import FeatureMapGlobal, TimmGlobal
from models import functional as MF

pytest.importorskip("timm")


def test_feature_map_global_poolings_against_functional():
    body = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 32, 24)
    maps = body(x)
    gem = FeatureMapGlobal(body, 8, pooling="gem")
    assert torch.allclose(gem(x), F.normalize(MF.gem(maps, 3.0), dim=-1), atol=1e-6)
    plus = FeatureMapGlobal(body, 8, pooling="gem+")
    assert torch.allclose(plus(x), F.normalize(MF.gem(maps, 4.6, 1e-8), dim=-1), atol=1e-6)
    rgem = FeatureMapGlobal(body, 8, pooling="rgem", dim=4)
    out = rgem(x)
    want = rgem.projection(F.normalize(MF.gem(MF.regional_gem(maps.clamp(min=0)), 4.6, 1e-8), dim=-1))
    assert out.shape == (2, 4) and torch.allclose(out, F.normalize(want, dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="pooling must be"):
        FeatureMapGlobal(body, 8, pooling="avg")
    with pytest.raises(ValueError, match=r"\(B, 9, H, W\)"):
        FeatureMapGlobal(body, 9)(x)


def test_timm_cnn_and_vit_give_unit_descriptors():
    torch.manual_seed(0)
    cnn = TimmGlobal("resnet18", pretrained=False, pooling="gem").eval()
    with torch.no_grad():
        d = cnn(torch.randn(2, 3, 64, 96))
    assert d.shape == (2, 512) and torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)
    assert cnn.input_convention.channel_order == "RGB"
    vit = TimmGlobal("vit_tiny_patch16_224", pretrained=False, pooling="gem+", dim=64).eval()
    with torch.no_grad():
        maps = vit.feature_maps(torch.randn(1, 3, 64, 96))
        d = vit(torch.randn(1, 3, 64, 96))
    assert maps.shape == (1, 192, 4, 6) and d.shape == (1, 64)


def test_local_weights_file_is_loaded_and_a_missing_one_is_named(tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = TimmGlobal("resnet18", pretrained_file=path)
    assert torch.equal(model.body.model.conv1.weight, source.conv1.weight)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        TimmGlobal("resnet18", pretrained_file=tmp_path / "nothere.pth")
