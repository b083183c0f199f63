"""hubconf.py: torch.hub.load(source="local") builds each entry; an official file loads strictly; no weights warns."""
from pathlib import Path

import pytest
import torch

from helpers.builders import build_model
from models import CVNetGlobal, CVNetRerank, SuperGlobal
from models.checkpoint import CheckpointError, official_state_dict

REPO = Path(__file__).resolve().parents[1]


def _official_file(path: Path, depth: int = 50) -> Path:
    glob = build_model("cvnet_global", depth=depth, seed=1, warn_random=False)
    rerank = build_model("cvnet_rerank", depth=depth, seed=2, warn_random=False)
    torch.save({"model_state": {**official_state_dict(glob), **official_state_dict(rerank)}}, path)
    return path


def test_entries_are_listed():
    import hubconf

    names = {n for n in dir(hubconf) if not n.startswith("_") and callable(getattr(hubconf, n))}
    assert {f"{m}_r{d}" for m in ("cvnet_global", "cvnet_rerank", "superglobal") for d in (50, 101)} <= names


@pytest.mark.parametrize("entry,cls", [("cvnet_global_r50", CVNetGlobal), ("superglobal_r50", SuperGlobal),
                                       ("cvnet_rerank_r50", CVNetRerank)])
def test_official_file_loads(tmp_path, entry, cls):
    path = _official_file(tmp_path / "CVPR2022_CVNet_R50.pyth")
    model = torch.hub.load(str(REPO), entry, source="local", weights=str(path))
    assert type(model) is cls and not model.training and model.depth == 50
    ref = build_model("cvnet_rerank", weights=path)
    assert torch.equal(model.backbone.layer1[0].conv1.weight, ref.backbone.layer1[0].conv1.weight)


def test_random_weights_warn_and_options_pass_through(caplog):
    model = torch.hub.load(str(REPO), "superglobal_r50", source="local", weights=None, sgem=False)
    assert model.sgem is False
    assert "RANDOM weights" in caplog.text


def test_wrong_depth_is_refused(tmp_path):
    path = _official_file(tmp_path / "r50.pyth")
    with pytest.raises(CheckpointError):
        torch.hub.load(str(REPO), "cvnet_global_r101", source="local", weights=str(path))
