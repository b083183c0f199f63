"""The training section of helpers.builders: the model to train from random / ImageNet / checkpoint weights (CVNet's
ResNet or any timm model), the re-ranker on a frozen backbone, and the checkpoints they write."""
import logging

import pytest
import torch
from torch import nn

import models.backbone
from common.convention import OFFICIAL_CONVENTION, TORCHVISION_CONVENTION
from common.io import atomic_torch_save
from helpers.builders import global_dim
from helpers.config import ConfigError
from helpers.training.build import (
    RERANK_HEAD_PREFIXES,
    build_training_backbone,
    build_training_rerank,
    checkpoint_geometry,
    complete_rerank_checkpoint,
    freeze_unused_parameters,
    read_backbone_checkpoint,
)
from models.checkpoint import CheckpointError, official_state_dict, save_official_checkpoint
from models.cvnet import CVNetGlobal, CVNetRerank
from models.timm_global import TIMM_CHECKPOINT_FORMAT, TimmGlobal, load_timm_global, timm_global_checkpoint

DIM = 16


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    torch.manual_seed(1)
    model = CVNetGlobal(50, DIM)
    path = tmp_path_factory.mktemp("bb") / "backbone.pyth"
    save_official_checkpoint(model, path, extra={"stage": "cvnet_global"})
    return path


def test_random_backbone_is_drawn_from_the_global_rng_with_identity_blocks():
    torch.manual_seed(3)
    model = build_training_backbone(depth=50, reduction_dim=DIM, key_momentum=0.9, imagenet_weights=False,
                                    zero_init_residual=True)
    torch.manual_seed(3)
    plain = CVNetGlobal(50, DIM, momentum=0.9)
    assert model.training and model.momentum == 0.9 and model.input_convention == OFFICIAL_CONVENTION
    zeroed = [n for n, m in model.named_modules() if n.endswith(".bn3") and isinstance(m, nn.BatchNorm2d)]
    assert len(zeroed) == 2 * 16  # every bottleneck of the query and the key encoder
    for name, module in model.named_modules():
        if name.endswith(".bn3"):
            assert not module.weight.any()
    for key, value in plain.state_dict().items():  # all else is what the same seed gives the bare class
        if not key.endswith(".bn3.weight"):
            assert torch.equal(value, model.state_dict()[key]), key


def test_imagenet_auto_falls_back_to_random_and_true_fails(monkeypatch, caplog):
    real = models.backbone._torchvision_resnet

    def offline(depth, imagenet_weights):
        if imagenet_weights:
            raise RuntimeError("no ImageNet weights in the hub cache")
        return real(depth, imagenet_weights)

    monkeypatch.setattr(models.backbone, "_torchvision_resnet", offline)
    with caplog.at_level(logging.WARNING):
        model = build_training_backbone(depth=50, reduction_dim=DIM, key_momentum=0.9, imagenet_weights="auto")
    assert model.input_convention == OFFICIAL_CONVENTION and "random initialisation instead" in caplog.text
    with pytest.raises(RuntimeError, match="hub cache"):
        build_training_backbone(depth=50, reduction_dim=DIM, key_momentum=0.9, imagenet_weights=True)
    with pytest.raises(ValueError, match="imagenet_weights"):
        build_training_backbone(depth=50, reduction_dim=DIM, key_momentum=0.9, imagenet_weights="maybe")
    monkeypatch.setattr(models.backbone, "_torchvision_resnet", lambda depth, imagenet_weights: real(depth, False))
    assert build_training_backbone(depth=50, reduction_dim=DIM, key_momentum=0.9,
                                   imagenet_weights=True).input_convention == TORCHVISION_CONVENTION


def test_backbone_from_an_init_checkpoint(backbone_file):
    model = build_training_backbone(depth=50, reduction_dim=DIM, key_momentum=0.5, init_checkpoint=str(backbone_file))
    saved = torch.load(backbone_file, weights_only=True)["model_state"]
    assert official_state_dict(model).keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in official_state_dict(model).items())
    assert model.training and model.momentum == 0.5
    assert _same_weights(model.key_backbone, model.backbone)  # the key encoder starts as the query encoder


def test_backbone_checkpoint_reading_and_geometry(backbone_file, tmp_path):
    ckpt = read_backbone_checkpoint(backbone_file)
    assert checkpoint_geometry(ckpt) == (50, DIM)
    bare = tmp_path / "bare.pyth"
    torch.save(ckpt["model_state"], bare)
    assert set(read_backbone_checkpoint(bare)) == {"model_state"}  # a bare state dict is wrapped
    deep = {f"globalmodel.s3.b{i}.w": torch.zeros(1) for i in range(23)} | {"globalmodel.head.fc.weight":
                                                                            torch.zeros(8, 4)}
    assert checkpoint_geometry({"model_state": deep}) == (101, 8)  # no depth recorded: from the stage-3 blocks
    with pytest.raises(FileNotFoundError, match="python train_backbone.py"):
        read_backbone_checkpoint(tmp_path / "absent.pyth")


def test_rerank_on_a_frozen_backbone_and_its_complete_checkpoint(backbone_file):
    ckpt = read_backbone_checkpoint(backbone_file)
    torch.manual_seed(4)
    rerank = build_training_rerank(ckpt, depth=50)
    torch.manual_seed(4)
    fresh = CVNetRerank(50)  # the random head the same seed gives
    assert rerank.training
    assert _same_weights(rerank.conv2ds, fresh.conv2ds) and _same_weights(rerank.cv_learner, fresh.cv_learner)
    stages = {k: v for k, v in official_state_dict(rerank).items() if not k.startswith(RERANK_HEAD_PREFIXES)}
    assert stages and all(torch.equal(v, ckpt["model_state"][k]) for k, v in stages.items())  # the file's stages
    assert rerank.input_convention == OFFICIAL_CONVENTION
    assert not any(p.requires_grad for p in rerank.backbone.parameters())
    assert all(p.requires_grad for p in (*rerank.conv2ds.parameters(), *rerank.cv_learner.parameters()))

    complete = complete_rerank_checkpoint(ckpt, rerank)
    heads = {k for k in complete if k.startswith(RERANK_HEAD_PREFIXES)}
    assert complete.keys() - heads == ckpt["model_state"].keys() and heads
    again = build_training_rerank({**ckpt, "model_state": complete}, depth=50, head_init="checkpoint")
    assert _same_weights(again.conv2ds, rerank.conv2ds) and _same_weights(again.cv_learner, rerank.cv_learner)
    with pytest.raises(ValueError, match="no conv2ds"):
        build_training_rerank(ckpt, depth=50, head_init="checkpoint")
    with pytest.raises(ValueError, match="head_init"):
        build_training_rerank(ckpt, depth=50, head_init="pretrained")


# ------------------------------------------------------------------------------------------------ timm backbones


def _timm(**kw):
    return build_training_backbone(depth=50, key_momentum=0.9, imagenet_weights="auto",
                                   **{"arch": "timm:resnet18", "reduction_dim": DIM, **kw})


def test_a_timm_arch_builds_a_random_timm_global_from_the_global_rng():
    torch.manual_seed(5)
    model = _timm()
    torch.manual_seed(5)
    again = _timm()
    assert isinstance(model, TimmGlobal) and model.model_name == "resnet18" and model.training
    assert _same_weights(model, again)  # "auto" without a pretrained_file: random, never a download
    assert global_dim(model) == DIM and model(torch.randn(2, 3, 32, 32)).shape == (2, DIM)
    assert model.input_convention.channel_order == "RGB"
    unprojected = _timm(reduction_dim=None, pooling="gem+")
    assert global_dim(unprojected) == 512 and unprojected.projection is None
    assert global_dim(CVNetGlobal(50, DIM)) == DIM


def test_timm_parameters_the_forward_never_uses_are_frozen():
    """ConvNeXt's head.norm belongs to the classifier head the model is built without: no gradient ever reaches
    it, so it is frozen (DDP would wait for its gradient); everything the forward uses still trains, and the
    weights and the train mode are as they were."""
    torch.manual_seed(3)
    model = _timm(arch="timm:test_convnext")
    torch.manual_seed(3)
    again = _timm(arch="timm:test_convnext")
    assert _same_weights(model, again) and model.training
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["body.model.head.norm.weight", "body.model.head.norm.bias"]
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert freeze_unused_parameters(_timm(), torch.ones(2, 3, 32, 32)) == []  # a ResNet uses all of its own


def test_a_timm_run_writes_its_own_format_that_loads_back_exactly(tmp_path):
    torch.manual_seed(6)
    model = _timm(pooling="gem")
    with torch.no_grad():
        model.pool.p.fill_(2.5)  # a trained-looking value, not the initial one
    path = tmp_path / "last.pyth"
    atomic_torch_save(timm_global_checkpoint(model, step=3), path)
    saved = torch.load(path, weights_only=True)
    assert saved["format"] == TIMM_CHECKPOINT_FORMAT and saved["arch"] == "timm:resnet18" and saved["step"] == 3
    assert saved["dim"] == saved["reduction_dim"] == DIM and saved["pooling"] == "gem"
    assert saved["input_convention"] == model.input_convention.to_dict()
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    loaded = load_timm_global(path)
    assert torch.equal(torch.rand(1), before)  # the global RNG is left as it was
    assert _same_weights(loaded, model) and not loaded.training
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(images), model(images))
    resumed = _timm(pooling="gem", init_checkpoint=str(path))
    assert _same_weights(resumed, model) and resumed.training
    with pytest.raises(ConfigError, match="pooling gem"):
        _timm(pooling="gem+", init_checkpoint=str(path))
    with pytest.raises(CheckpointError, match="CVNet-Rerank needs CVNet-Global's ResNet"):
        read_backbone_checkpoint(path)  # train_rerank.py cannot use it


def test_arch_values_that_do_not_fit_are_named():
    with pytest.raises(ConfigError, match="has no model 'no_such_net'"):
        _timm(arch="timm:no_such_net")
    with pytest.raises(ConfigError, match="model.pooling=gem"):
        build_training_backbone(depth=50, reduction_dim=DIM, key_momentum=0.9, imagenet_weights=False,
                                pooling="gem+")
    with pytest.raises(ConfigError, match="model.arch must be"):
        _timm(arch="vit")
