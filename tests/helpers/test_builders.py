"""helpers.builders: one model builder (kinds, aliases, seeded random weights, strict official loading) and one
database factory."""
import pytest
import torch

from helpers.builders import (
    GLOBAL_KINDS,
    backend_name,
    build_model,
    build_superglobal_reranker,
    copy_backbone,
    faiss_device_options,
    kind_of,
    load_database,
    make_database,
    model_kind,
)
from models import CVNetGlobal, CVNetRerank, SuperGlobal, SuperGlobalRerank
from models.checkpoint import CheckpointError, official_state_dict, save_official_checkpoint


@pytest.mark.parametrize("kind,cls", [("cvnet_global", CVNetGlobal), ("cvnet", CVNetGlobal),
                                      ("CVNetGlobal", CVNetGlobal), ("superglobal", SuperGlobal),
                                      ("SuperGlobal", SuperGlobal), ("cvnet_rerank", CVNetRerank)])
def test_kinds_and_aliases(kind, cls):
    model = build_model(kind, warn_random=False)
    assert type(model) is cls and not model.training
    assert kind_of(model) == model_kind(kind)


def test_unknown_kind():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("resnet")
    with pytest.raises(ValueError, match="model must be one of"):
        model_kind("timm_global")  # a timm model is built by its name, timm:<name>


def test_one_kind_name_per_model():
    """timm:<name> names a timm model when it is built; its kind is timm_global, as everywhere else."""
    assert model_kind("timm:resnet18") == "timm_global"
    assert set(GLOBAL_KINDS) == {"cvnet_global", "superglobal", "timm_global"}
    rerank = build_model("cvnet_rerank", warn_random=False)
    assert kind_of(rerank) == "cvnet_rerank"
    with pytest.raises(TypeError, match="CVNetGlobal, SuperGlobal, TimmGlobal"):
        kind_of(rerank, among=GLOBAL_KINDS)


def test_seeded_weights_are_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("superglobal", seed=7, warn_random=False)
    after = torch.rand(1)
    b = build_model("superglobal", seed=7, warn_random=False)
    c = build_model("superglobal", seed=8, warn_random=False)
    assert torch.equal(after, expected_next)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.fc.weight, c.head.fc.weight)


def test_random_weights_are_announced(caplog):
    build_model("cvnet_global", seed=1)
    assert "RANDOM weights" in caplog.text and "CVPR2022_CVNet_R50.pyth" in caplog.text


def test_official_file_loads_into_every_kind(tmp_path):
    # an official file holds the whole ResNet with its head (encoder_q.*) and the re-ranking head
    source = build_model("cvnet_rerank", seed=3, warn_random=False)
    full = build_model("cvnet_global", seed=4, warn_random=False)
    state = {**official_state_dict(full), **official_state_dict(source)}
    path = tmp_path / "w.pyth"
    torch.save({"model_state": state}, path)
    for kind in ("cvnet_global", "superglobal", "cvnet_rerank"):
        model = build_model(kind, weights=path, seed=99)
        assert torch.equal(model.backbone.conv1.weight, source.backbone.conv1.weight)
    rerank = build_model("cvnet_rerank", weights=path)
    assert all(torch.equal(x, y) for x, y in zip(rerank.state_dict().values(), source.state_dict().values()))


def test_wrong_depth_file_is_refused(tmp_path):
    save_official_checkpoint(build_model("cvnet_global", seed=0, warn_random=False), tmp_path / "w.pyth")
    with pytest.raises(CheckpointError):
        build_model("cvnet_global", depth=101, weights=tmp_path / "w.pyth")


def test_options_and_copy_backbone():
    sg = build_model("superglobal", options={"scales": [1.0], "sgem": False}, warn_random=False)
    assert sg.scales == (1.0,) and sg.sgem is False
    target = build_model("cvnet_rerank", seed=5, warn_random=False)
    copy_backbone(source=sg, target=target)
    assert torch.equal(target.backbone.layer3[0].conv1.weight, sg.backbone.layer3[0].conv1.weight)
    assert isinstance(build_superglobal_reranker(M=10, K=3), SuperGlobalRerank)


def test_database_factory_round_trip(tmp_path):
    x = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    for backend in ("tensor", "faiss"):
        db = make_database(backend, 8)
        assert backend_name(db) == backend
        db.add(x)
        db.save(tmp_path / backend)
        back = load_database(backend, tmp_path / backend)
        assert len(back) == 5 and torch.allclose(back.get([3]), x[3:4])
    with pytest.raises(ValueError, match="tensor, faiss, pinecone"):
        make_database("annoy", 8)
    with pytest.raises(TypeError):
        backend_name(object())


def test_databases_are_placed_for_the_device(tmp_path):
    """A tensor database lives on the device; faiss searches on the GPU a ``cuda:N`` names (when its build can)
    and never on a GPU for the CPU; no device keeps each back-end's default."""
    assert faiss_device_options(None) == {}
    assert faiss_device_options("cpu") == {"use_gpu": False}
    assert faiss_device_options(torch.device("cuda", 2)) == {"gpu_device": 2}
    assert faiss_device_options("cuda") == {"gpu_device": 0}
    assert make_database("tensor", 4).device == make_database("tensor", 4, device="cpu").device == torch.device("cpu")
    flat = make_database("faiss", 4, device="cuda:1")  # faiss-cpu here: it searches on the CPU, GPU 1 recorded
    assert flat.gpu_device == 1 and make_database("faiss", 4, device="cuda:1", gpu_device=0).gpu_device == 0
    flat.add(torch.nn.functional.normalize(torch.randn(3, 4), dim=1))
    flat.save(tmp_path / "f")
    assert load_database("faiss", tmp_path / "f", device="cuda:3").gpu_device == 3


def test_timm_kinds_build_random_or_load_a_trained_run(tmp_path, caplog):
    pytest.importorskip("timm")
    from models import TimmGlobal
    from models.timm_global import timm_global_checkpoint

    model = build_model("timm:resnet18", seed=4, options={"pooling": "gem+"})
    assert isinstance(model, TimmGlobal) and model.pooling == "gem+" and "RANDOM weights" in caplog.text
    again = build_model("timm:resnet18", seed=4, options={"pooling": "gem+"}, warn_random=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    torch.save(timm_global_checkpoint(model), tmp_path / "run.pyth")
    loaded = build_model("timm:resnet18", weights=tmp_path / "run.pyth")
    assert torch.equal(loaded.body.model.conv1.weight, model.body.model.conv1.weight)
    with pytest.raises(CheckpointError, match="holds timm:resnet18, not timm:resnet34"):
        build_model("timm:resnet34", weights=tmp_path / "run.pyth")
