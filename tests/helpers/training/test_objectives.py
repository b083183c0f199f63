"""The momentum key encoder of any global model follows CVNetGlobal's own EMA rule bit for bit."""
import copy

import torch

from helpers.training.objectives import BackboneObjective, MomentumKeyEncoder
from models.cvnet import CVNetGlobal
from models.losses import CurricularFace


def test_the_generic_key_encoder_is_cvnets_key_encoder_bit_for_bit():
    torch.manual_seed(0)
    model = CVNetGlobal(50, 16, momentum=0.8)
    generic = MomentumKeyEncoder(model, 0.8)
    assert not any(p.requires_grad for p in generic.parameters())
    images = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        model.train()
        model(images)  # moves BN running statistics, as a training step does
        with torch.no_grad():
            for p in model.backbone.parameters():
                p.add_(0.01 * torch.randn_like(p))
            for p in model.head.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.update_key_encoder()
        generic.update(model)
    key_state = {**{f"backbone.{k}": v for k, v in model.key_backbone.state_dict().items()},
                 **{f"head.{k}": v for k, v in model.key_head.state_dict().items()}}
    generic_state = {k: v for k, v in generic.encoder.state_dict().items() if not k.startswith("key_")}
    assert key_state.keys() == generic_state.keys()
    assert all(torch.equal(v, generic_state[k]) for k, v in key_state.items())
    model.eval()
    generic.eval()
    assert torch.equal(generic(images), model.key_forward(images))


def test_the_objective_routes_keys_to_the_right_encoder():
    torch.manual_seed(1)
    model = CVNetGlobal(50, 16, momentum=0.5)
    builtin = BackboneObjective(model, CurricularFace(16, 3))
    assert list(builtin.state_dict()) == ["model." + k for k in model.state_dict()] + \
        ["classifier." + k for k in CurricularFace(16, 3).state_dict()]  # CVNet's layout: no extra encoder
    plain = copy.deepcopy(model.backbone)  # any module: here a ResNet trunk with a GeM-free mean pool
    net = torch.nn.Sequential(plain, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    generic = BackboneObjective(net, CurricularFace(2048, 3), MomentumKeyEncoder(net, 0.5))
    images = torch.randn(2, 3, 32, 32)
    generic.eval()
    assert torch.equal(generic.keys(images), net(images))  # starts as the model
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    generic.update_keys()
    moved = dict(generic.key_encoder.encoder.named_parameters())
    assert all(torch.allclose(moved[n], p - 0.5) for n, p in net.named_parameters())
    assert generic.training is False and generic.key_encoder.training is False  # follows its owner's mode
