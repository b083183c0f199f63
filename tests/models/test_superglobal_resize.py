"""SuperGlobal's Scale-GeM resize: the release's 2023 behaviour (no antialiasing, torchvision <= 0.16) and
torchvision's current default give different descriptors; the paper-row configs use the former."""
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from helpers.builders import build_model
from helpers.config import load_config
from helpers.schemas import EVAL

REPO = Path(__file__).resolve().parents[2]


def test_the_two_resize_settings_differ_and_each_is_torchvisions():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 97, 131)
    size = [int(97 * 0.7071), int(131 * 0.7071)]  # a downscale, where antialiasing changes the pixels
    for antialias in (False, True):
        model = build_model("superglobal", seed=1, options={"antialias": antialias, "scales": [0.7071]},
                            warn_random=False)
        with torch.no_grad():
            got = model(x)
            want = F.normalize(model.forward_single_scale(TF.resize(x, size, antialias=antialias)), dim=-1)
        assert torch.allclose(got, want, atol=1e-6)
    off = build_model("superglobal", seed=1, options={"antialias": False}, warn_random=False)
    on = build_model("superglobal", seed=1, options={"antialias": True}, warn_random=False)
    with torch.no_grad():
        assert (off(x) - on(x)).abs().max() > 1e-4


def test_paper_row_configs_resize_without_antialiasing():
    for name in ("superglobal_r50", "superglobal_r101", "superglobal_rerank_r50", "superglobal_rerank_r101"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml", schema=EVAL)
        assert cfg["model"]["superglobal"]["antialias"] is False, name
