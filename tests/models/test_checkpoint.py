"""Official checkpoint layout: key mapping, strict loading, clear errors, weights_only, round trips."""
import pytest
import torch

from models import (
    CheckpointError,
    CVNetGlobal,
    CVNetRerank,
    InputConvention,
    SuperGlobal,
    load_official_checkpoint,
    save_official_checkpoint,
)
from models.checkpoint import model_to_official_key, official_state_dict, official_to_model_key
from tests.support import release_reference as ref


@pytest.fixture(scope="module")
def official_state():
    net = ref.RerankReference(50)
    ref.randomize_(net, seed=3)
    return net.state_dict()


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, official_state):
    """A file shaped like CVPR2022_CVNet_R50.pyth: model_state plus pycls bookkeeping."""
    path = tmp_path_factory.mktemp("weights") / "CVPR2022_CVNet_R50.pyth"
    torch.save({"epoch": 10, "model_state": official_state, "cfg": "MODEL:\n  DEPTH: 50\n"}, path)
    return path


def test_key_examples_from_the_spec():
    assert official_to_model_key("encoder_q.s3.b2.f.b_bn.running_var") == "backbone.layer3.1.bn2.running_var"
    assert official_to_model_key("encoder_q.s2.b1.proj.weight") == "backbone.layer2.0.downsample.0.weight"
    assert official_to_model_key("encoder_q.s2.b1.bn.running_mean") == "backbone.layer2.0.downsample.1.running_mean"
    assert official_to_model_key("globalmodel.stem.conv.weight") == "backbone.conv1.weight"
    assert official_to_model_key("encoder_q.stem.bn.bias") == "backbone.bn1.bias"
    assert official_to_model_key("encoder_q.head.pool.p") == "head.pool.p"
    assert official_to_model_key("cv_learner.block1.0.conv1.weight") == "cv_learner.block1.0.conv1.weight"
    assert official_to_model_key("encoder_q.s3.b2.f.z.weight") is None
    assert official_to_model_key("module.stem.conv.weight") is None


@pytest.mark.parametrize("depth", [50, 101])
def test_key_mapping_round_trips(depth):
    names = list(CVNetRerank(depth).state_dict()) + list(SuperGlobal(depth).state_dict())
    for key in names:
        official = model_to_official_key(key)
        assert official is not None, key
        assert official_to_model_key(official) == key


@pytest.mark.parametrize("cls", [CVNetGlobal, CVNetRerank, SuperGlobal])
def test_official_file_loads_strictly_into_every_model(official_file, official_state, cls):
    model = cls(50)
    meta = load_official_checkpoint(model, official_file)
    assert meta["epoch"] == 10
    assert model.input_convention.channel_order == "BGR"
    loaded = official_state_dict(model)
    for key, value in loaded.items():
        assert torch.equal(value, official_state[key]), key
    # a global model takes the backbone and head, the re-ranker the first three stages and the 4D network
    if cls is CVNetRerank:
        assert not any(k.startswith(("encoder_q.s4.", "encoder_q.head.")) for k in loaded)
        assert any(k.startswith("cv_learner.") for k in loaded)
    else:
        assert "encoder_q.head.pool.p" in loaded and not any(k.startswith("conv2ds.") for k in loaded)


def test_bare_dict_and_globalmodel_prefix(official_state):
    renamed = {k.replace("encoder_q.", "globalmodel.", 1): v for k, v in official_state.items()}
    model = SuperGlobal(50)
    load_official_checkpoint(model, renamed)
    assert torch.equal(model.head.pool.p, official_state["encoder_q.head.pool.p"])


def test_missing_num_batches_tracked_is_tolerated(official_state):
    trimmed = {k: v for k, v in official_state.items() if not k.endswith("num_batches_tracked")}
    load_official_checkpoint(CVNetGlobal(50), {"model_state": trimmed})


def test_missing_key_is_named(official_state):
    broken = dict(official_state)
    del broken["encoder_q.s3.b2.f.b_bn.running_var"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): backbone\.layer3\.1\.bn2\.running_var"):
        load_official_checkpoint(CVNetGlobal(50), {"model_state": broken})


def test_unexpected_key_is_named(official_state):
    broken = dict(official_state)
    broken["encoder_q.s5.b1.f.a.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): encoder_q\.s5\.b1\.f\.a\.weight"):
        load_official_checkpoint(SuperGlobal(50), {"model_state": broken})


def test_wrong_shape_is_named(official_state):
    broken = dict(official_state)
    broken["encoder_q.head.fc.weight"] = torch.zeros(512, 2048)
    with pytest.raises(CheckpointError, match=r"encoder_q\.head\.fc\.weight: checkpoint \(512, 2048\)"):
        load_official_checkpoint(CVNetGlobal(50), {"model_state": broken})


def test_depth_mismatch_fails(official_state):
    with pytest.raises(CheckpointError, match="missing keys"):
        load_official_checkpoint(CVNetRerank(101), {"model_state": official_state})


def test_nothing_loaded_on_failure(official_state):
    model = CVNetGlobal(50)
    before = model.head.fc.weight.clone()
    broken = dict(official_state)
    del broken["encoder_q.stem.conv.weight"]
    with pytest.raises(CheckpointError):
        load_official_checkpoint(model, {"model_state": broken})
    assert torch.equal(model.head.fc.weight, before)


class _Payload:
    pass


def test_unsafe_pickle_gets_a_clear_error(tmp_path, official_state):
    path = tmp_path / "unsafe.pyth"
    torch.save({"model_state": official_state, "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_official_checkpoint(CVNetGlobal(50), path)


def test_missing_file_says_what_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="CVPR2022_CVNet_R50.pyth"):
        load_official_checkpoint(CVNetGlobal(50), tmp_path / "nope.pyth")


def test_not_a_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="no state dict"):
        load_official_checkpoint(CVNetGlobal(50), {"model_state": {"a": 3}})


def test_save_round_trip_keeps_weights_and_convention(tmp_path, official_state):
    model = CVNetGlobal(50)
    load_official_checkpoint(model, {"model_state": official_state})
    model.input_convention = InputConvention("RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    path = tmp_path / "run" / "last.pyth"
    save_official_checkpoint(model, path, extra={"step": 5})
    assert not list(path.parent.glob("*.tmp"))
    fresh = CVNetGlobal(50)
    meta = load_official_checkpoint(fresh, path)
    assert meta["step"] == 5 and meta["depth"] == 50
    assert fresh.input_convention == model.input_convention
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    # the same file serves the other models too (the re-ranker's 4D network is simply absent)
    load_official_checkpoint(SuperGlobal(50), path)


def test_atomic_write_replaces_whole_file_with_umask_permissions(tmp_path):
    import os
    import stat

    from models.checkpoint import atomic_write

    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    old_mask = os.umask(0o022)
    try:
        atomic_write(path, lambda tmp: open(tmp, "wb").write(b"new") and None)
    finally:
        os.umask(old_mask)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    with pytest.raises(RuntimeError):
        atomic_write(path, lambda tmp: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ---------------------------------------------------------------------------------------------------------------
# Damaged and malformed files: each is a CheckpointError that names the file
# ---------------------------------------------------------------------------------------------------------------


def _saved(tmp_path):
    import torch

    from helpers.builders import build_model
    from models.checkpoint import save_official_checkpoint

    path = tmp_path / "w.pyth"
    save_official_checkpoint(build_model("cvnet_global", seed=0, warn_random=False), path)
    return path, torch


def _load(path):
    from helpers.builders import build_model
    from models.checkpoint import load_official_checkpoint

    return load_official_checkpoint(build_model("cvnet_global", seed=1, warn_random=False), path)


def test_flipped_byte_in_tensor_data_is_caught(tmp_path):
    import struct
    import zipfile

    from models.checkpoint import CheckpointError

    path, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    data[record.header_offset + 30 + name_len + extra_len + record.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"w\.pyth is damaged: its record .* fails its CRC32 check"):
        _load(path)


@pytest.mark.parametrize("damage,message", [
    ("zero", r"w\.pyth is empty \(0 bytes\)"),
    ("truncated", r"w\.pyth is not a readable PyTorch checkpoint"),
    ("text", r"w\.pyth is not a readable PyTorch checkpoint"),
    ("int_keys", r"w\.pyth holds no state dict"),
    ("empty_dict", r"w\.pyth holds no state dict"),
])
def test_damaged_or_foreign_files_name_the_path(tmp_path, damage, message):
    from models.checkpoint import CheckpointError

    path, torch = _saved(tmp_path)
    data = path.read_bytes()
    if damage == "zero":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "text":
        path.write_text("not a checkpoint\n")
    elif damage == "int_keys":
        torch.save({101: torch.zeros(1)}, path)
    else:
        torch.save({}, path)
    with pytest.raises(CheckpointError, match=message):
        _load(path)


def test_nan_weight_is_refused_with_the_tensor_named(tmp_path):
    from models.checkpoint import CheckpointError

    path, torch = _saved(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k in ckpt["model_state"] if k.endswith("s3.b2.f.b.weight"))
    ckpt["model_state"][key][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=rf"w\.pyth has NaN or Inf values in 1 tensor\(s\): {key}"):
        _load(path)


@pytest.mark.parametrize("convention,message", [
    ({"channel_order": "BGR", "mean": [0.4, 0.4], "std": [0.2, 0.2, 0.2]}, "mean must be 3 finite numbers"),
    ({"channel_order": "BGR", "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.0, 0.2]}, "std must be positive"),
    ({"channel_order": "BGR", "mean": [0.4, 0.4, 0.4]}, "exactly channel_order, mean and std"),
    ({"channel_order": "BRG", "mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}, "channel_order must be"),
])
def test_malformed_input_convention_is_refused(tmp_path, convention, message):
    from models.checkpoint import CheckpointError

    path, torch = _saved(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["input_convention"] = convention
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=rf"w\.pyth: malformed input_convention: .*{message}"):
        _load(path)
