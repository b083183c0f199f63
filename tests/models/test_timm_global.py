"""TimmGlobal / FeatureMapGlobal: CNN maps and ViT patch tokens pooled to L2-normalised descriptors, pooling
against models.functional (or the backbone's own token), local weights files, random init only (no download), the
embedding head and its checkpoint."""
import pytest
import torch
import torch.nn.functional as F

from models import FeatureMapGlobal, TimmGlobal
from models import functional as MF
from models.layers import EmbeddingHead
from models.timm_global import load_timm_global, timm_global_checkpoint

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


def test_embedding_head_is_linear_batchnorm_dropout_then_l2():
    torch.manual_seed(0)
    body = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
    model = FeatureMapGlobal(body, 8, pooling="gem+", dim=5, head="embedding", head_dropout=0.1)
    head = model.projection
    assert isinstance(head, EmbeddingHead) and head.fc.out_features == 5 and head.dropout.p == 0.1
    x = torch.randn(6, 3, 16, 12)
    pooled = MF.gem(body(x), 4.6, 1e-8)
    with torch.no_grad():
        head.bn.running_mean.uniform_(-0.5, 0.5)
        head.bn.running_var.uniform_(0.5, 2.0)
    model.eval()  # running statistics, no dropout
    out = model(x)
    bn = head.bn
    want = (head.fc(pooled) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    assert out.shape == (6, 5) and torch.allclose(out, F.normalize(want, dim=-1), atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(6), atol=1e-6)
    model.train()  # batch statistics and dropout: another draw, another output, still unit length
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b) and torch.allclose(a.norm(dim=1), torch.ones(6), atol=1e-6)
    with pytest.raises(ValueError, match="needs its output dim"):
        FeatureMapGlobal(body, 8, head="embedding")
    with pytest.raises(ValueError, match="head must be"):
        FeatureMapGlobal(body, 8, dim=4, head="mlp")


def test_a_timm_model_with_the_embedding_head_round_trips_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TimmGlobal("test_vit", pooling="gem", dim=12, head="embedding", head_dropout=0.2)
    model.train()(torch.randn(4, 3, 32, 32))  # running statistics that differ from the initial ones
    ckpt = timm_global_checkpoint(model.eval(), step=1)
    assert ckpt["head"] == "embedding" and ckpt["head_dropout"] == 0.2 and ckpt["dim"] == 12
    assert {"projection.fc.weight", "projection.bn.running_mean"} <= set(ckpt["model_state"])
    torch.save(ckpt, tmp_path / "m.pyth")
    loaded = load_timm_global(tmp_path / "m.pyth")
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert loaded.head == "embedding" and torch.equal(loaded(x), model(x))
    # a file written before heads were recorded holds the linear head
    old = timm_global_checkpoint(TimmGlobal("test_vit", dim=12).eval())
    del old["head"], old["head_dropout"]
    assert load_timm_global(old).head == "linear"


def test_token_pooling_is_the_backbone_s_own_pooled_vector():
    torch.manual_seed(0)
    vit = TimmGlobal("test_vit", pooling="token").eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        feats = vit.body.model.forward_features(x)  # (B, 1 + patches, C), after the final norm
        assert torch.allclose(vit(x), F.normalize(feats[:, 0], dim=-1), atol=1e-6)  # the class token
    cnn = TimmGlobal("test_resnet", pooling="token", dim=4).eval()
    with torch.no_grad():
        pooled = cnn.body.model.forward_features(x).mean(dim=(2, 3))  # a CNN's global average
        assert torch.allclose(cnn(x), F.normalize(cnn.projection(F.normalize(pooled, dim=-1)), dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="own pooled vector"):
        FeatureMapGlobal(torch.nn.Conv2d(3, 8, 3), 8, pooling="token")


def test_a_vit_takes_any_image_size_padded_to_its_patches():
    torch.manual_seed(0)
    vit = TimmGlobal("test_vit", pooling="gem").eval()
    x = torch.randn(1, 3, 35, 50)  # neither side a multiple of 16
    padded = F.pad(x, (0, 64 - 50, 0, 48 - 35))
    with torch.no_grad():
        assert vit.feature_maps(x).shape[-2:] == (3, 4)
        assert torch.allclose(vit(x), vit(padded), atol=1e-6)
        assert vit(torch.randn(1, 3, 32, 48)).shape == (1, 64)
