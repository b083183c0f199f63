"""Checkpoint I/O: the input convention a checkpoint carries, official-key remapping and strict loading."""
from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# re-exported: the input convention travels with the weights, and checkpoints are written atomically
from common.convention import OFFICIAL_CONVENTION, TORCHVISION_CONVENTION, InputConvention  # noqa: F401
from common.errors import MissingFileError, ProjectRuntimeError
from common.io import atomic_torch_save, atomic_write  # noqa: F401
from models.weights import FETCH_COMMAND, check_recorded_sha256

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Official (pycls) key layout <-> this project's modules
# --------------------------------------------------------------------------------------------------------------

#: Prefixes under which the ResNet of a checkpoint is stored: the release, and some re-saved copies.
OFFICIAL_PREFIXES = ("encoder_q.", "globalmodel.")

#: pycls block sub-module -> torchvision Bottleneck sub-module.
_BLOCK_NAMES = {
    "f.a": "conv1",
    "f.a_bn": "bn1",
    "f.b": "conv2",
    "f.b_bn": "bn2",
    "f.c": "conv3",
    "f.c_bn": "bn3",
    "proj": "downsample.0",
    "bn": "downsample.1",
}
_BLOCK_NAMES_INV = {v: k for k, v in _BLOCK_NAMES.items()}
_STEM_NAMES = {"stem.conv": "conv1", "stem.bn": "bn1"}
_STEM_NAMES_INV = {v: k for k, v in _STEM_NAMES.items()}
_OFFICIAL_BLOCK = re.compile(r"s(\d)\.b(\d+)\.(f\.a_bn|f\.b_bn|f\.c_bn|f\.a|f\.b|f\.c|proj|bn)\.(\w+)")
_MODEL_BLOCK = re.compile(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.\d)\.(\w+)")


def official_to_model_key(key: str) -> str | None:
    """Map one official checkpoint key to this project's state-dict key; None when it is not recognised.

    ``encoder_q.s3.b2.f.b_bn.running_var`` -> ``backbone.layer3.1.bn2.running_var``;
    ``encoder_q.head.fc.weight`` -> ``head.fc.weight``; ``conv2ds.*`` and ``cv_learner.*`` are unchanged.
    """
    if key.startswith(("conv2ds.", "cv_learner.")):
        return key
    for prefix in OFFICIAL_PREFIXES:
        if key.startswith(prefix):
            key = key.removeprefix(prefix)
            break
    else:
        return None
    if key.startswith("head."):
        return key
    for official, tv in _STEM_NAMES.items():
        if key.startswith(official + "."):
            return "backbone." + tv + key.removeprefix(official)
    m = _OFFICIAL_BLOCK.fullmatch(key)
    if m is None:
        return None
    stage, block, sub, leaf = m.groups()
    return f"backbone.layer{stage}.{int(block) - 1}.{_BLOCK_NAMES[sub]}.{leaf}"


def model_to_official_key(key: str, prefix: str = "encoder_q.") -> str | None:
    """Inverse of :func:`official_to_model_key` (None for keys that have no official name)."""
    if key.startswith(("conv2ds.", "cv_learner.")):
        return key
    if key.startswith("head."):
        return prefix + key
    if not key.startswith("backbone."):
        return None
    key = key.removeprefix("backbone.")
    for tv, official in _STEM_NAMES_INV.items():
        if key.startswith(tv + "."):
            return prefix + official + key.removeprefix(tv)
    m = _MODEL_BLOCK.fullmatch(key)
    if m is None:
        return None
    stage, block, sub, leaf = m.groups()
    return f"{prefix}s{stage}.b{int(block) + 1}.{_BLOCK_NAMES_INV[sub]}.{leaf}"


# --------------------------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------------------------


class CheckpointError(ProjectRuntimeError):
    """A checkpoint that does not fit the model: the message names the offending keys."""


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint file, with every way a file can be damaged named:
    missing, empty, truncated, a byte changed in a stored record (the zip format's CRC32), not a checkpoint,
    holding Python objects that need unsafe unpickling, or not the file whose sha256 a ``SHA256SUMS`` beside it
    records (``prepare_data.py weights`` writes one). Each is an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"checkpoint not found: {path}. The official weights CVPR2022_CVNet_R50.pyth / CVPR2022_CVNet_R101.pyth "
            f"are fetched into weights/ and checked by `{FETCH_COMMAND}` (see README, 'Official weights')."
        )
    check_recorded_sha256(path)  # a file prepare_data.py recorded must still be that file
    refetch = f"fetch or copy it again ({FETCH_COMMAND} for the official files)"
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy; {refetch}")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointError(f"{path} is a damaged checkpoint archive ({exc}); {refetch}") from None
        if damaged is not None:
            raise CheckpointError(f"{path} is damaged: its record {damaged!r} fails its CRC32 check (a changed "
                                  f"or truncated byte); {refetch}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "global" not in str(exc).lower():  # not a disallowed class: the bytes are no checkpoint at all
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (its pickle stream is invalid): "
                                  f"truncated, damaged or another kind of file; {refetch}") from None
        raise CheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True): it contains Python objects that need "
            f"unsafe unpickling ({message}). Only load files you trust; if you trust this one, "
            "re-save its tensors: torch.save({'model_state': torch.load(p, weights_only=False)['model_state']}, "
            "new_path), and load new_path."
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, AttributeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {message}): "
                              f"truncated, damaged or another kind of file; {refetch}") from None


def _unwrap_state(checkpoint: Any, source: str = "checkpoint") -> Mapping[str, Tensor]:
    state = checkpoint.get("model_state", checkpoint) if isinstance(checkpoint, Mapping) else None
    if (not isinstance(state, Mapping) or not state or not all(isinstance(k, str) for k in state)
            or not all(isinstance(v, Tensor) for v in state.values())):
        raise CheckpointError(f"{source} holds no state dict: expected {{'model_state': {{name: tensor}}}} or a "
                              f"bare {{name: tensor}} dict, got {type(checkpoint).__name__}"
                              + (f" with keys {_list(map(str, checkpoint), 6)}" if isinstance(checkpoint, Mapping)
                                 else ""))
    return state


def check_finite_state(state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Every floating-point tensor of ``state`` must be finite: one NaN weight makes every descriptor NaN, and NaN
    scores rank in database order, which reads as a believable (wrong) table."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source} has NaN or Inf values in {len(bad)} tensor(s): {_list(bad, 6)}. The file "
                              "is damaged or came from a diverged training run; do not use it.")


def _list(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def remap_official_state_dict(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Official state dict -> this model's state dict, strictly.

    Every model key must be provided (``num_batches_tracked`` counters may be absent) with the same shape;
    every checkpoint key must map to a model key or to a part the model declares it does not use
    (``model.official_ignored_prefixes``, e.g. the re-ranking head for a global model). Otherwise
    :class:`CheckpointError` names the keys.
    """
    target = model.state_dict()
    derived = tuple(getattr(model, "derived_prefixes", ()))
    ignored_prefixes = tuple(getattr(model, "official_ignored_prefixes", ()))
    expected = {k for k in target if not k.startswith(derived)}

    out: dict[str, Tensor] = {}
    unexpected, ignored, mismatched = [], [], []
    for key, value in state.items():
        mkey = official_to_model_key(key)
        if mkey is None:
            unexpected.append(key)
        elif mkey in expected:
            if tuple(value.shape) != tuple(target[mkey].shape):
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[mkey].shape)}")
            else:
                out[mkey] = value
        elif mkey.startswith(ignored_prefixes):
            ignored.append(key)
        else:
            unexpected.append(key)
    missing = [k for k in expected - out.keys() if not k.endswith("num_batches_tracked")]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_list(mismatched)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__} (depth {getattr(model, 'depth', '?')}): "
            + "; ".join(problems)
        )
    if ignored:
        log.info("%s: %d checkpoint tensors not used by this model (%s)", type(model).__name__, len(ignored),
                 _list({k.split(".")[0] + "." + k.split(".")[1] for k in ignored}, 4))
    for key in expected - out.keys():  # absent BN counters: keep the model's own
        out[key] = target[key]
    return out


def load_official_checkpoint(model: nn.Module, path_or_state: str | os.PathLike | Mapping) -> dict[str, Any]:
    """Load a checkpoint in the official CVNet format into any of CVNetGlobal, CVNetRerank, SuperGlobal.

    Accepts ``CVPR2022_CVNet_R50.pyth`` / ``CVPR2022_CVNet_R101.pyth`` (or this project's training checkpoints,
    saved in the same layout), as a path or an already-loaded dict; ``model_state`` or a bare dict;
    ``encoder_q.`` or ``globalmodel.`` prefixes. Loading is strict (see :func:`remap_official_state_dict`) and
    uses ``torch.load(weights_only=True)``. Sets ``model.input_convention`` from the file (official files carry
    none and are BGR, :data:`OFFICIAL_CONVENTION`). Returns the checkpoint's metadata (everything but weights).
    """
    source = "checkpoint" if isinstance(path_or_state, Mapping) else os.fspath(path_or_state)
    checkpoint = path_or_state if isinstance(path_or_state, Mapping) else read_checkpoint(path_or_state)
    state = _unwrap_state(checkpoint, source)
    check_finite_state(state, source)
    meta = {k: v for k, v in checkpoint.items() if k not in ("model_state",)} if "model_state" in checkpoint else {}
    convention = meta.get("input_convention")
    try:
        parsed = InputConvention.from_dict(convention) if convention is not None else OFFICIAL_CONVENTION
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: malformed input_convention: {exc}") from None
    try:
        remapped = remap_official_state_dict(state, model)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    model.load_state_dict(remapped, strict=False)
    if hasattr(model, "after_official_load"):
        model.after_official_load()
    model.input_convention = parsed
    return meta


def official_state_dict(model: nn.Module, prefix: str = "encoder_q.") -> dict[str, Tensor]:
    """This model's weights in the official key layout (derived parts such as the key encoder left out)."""
    derived = tuple(getattr(model, "derived_prefixes", ()))
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith(derived):
            continue
        okey = model_to_official_key(key, prefix)
        if okey is not None:
            out[okey] = value.detach().cpu()
    return out


def save_official_checkpoint(
    model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None
) -> None:
    """Write ``{'model_state': official layout, 'input_convention': ..., **extra}`` atomically.

    ``extra`` must hold only what ``torch.load(weights_only=True)`` reads back (tensors, numbers, strings,
    lists, dicts).
    """
    convention = getattr(model, "input_convention", OFFICIAL_CONVENTION)
    payload = {"model_state": official_state_dict(model), "input_convention": convention.to_dict(),
               "depth": int(getattr(model, "depth", 50)), **(extra or {})}
    atomic_torch_save(payload, path)
