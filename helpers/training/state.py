"""Seeds, runtime determinism, RNG capture / restore and the training checkpoint file (what a resume reads)."""
from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import InvalidValueError, MissingFileError
from common.io import atomic_torch_save

TRAIN_STATE_NAME = "train_state.pth"
TRAIN_STATE_FORMAT = "cvnet-train-state-v1"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_runtime(*, threads: int | None = None, deterministic: bool = False) -> None:
    """CPU thread count and deterministic kernels (exact replays on CPU; slower cuDNN choices on GPU)."""
    if threads:
        torch.set_num_threads(int(threads))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        # cuBLAS needs this for deterministic GEMMs; harmless elsewhere
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and python RNG states as tensors and builtins.

    The form survives ``torch.load(weights_only=True)`` (no numpy arrays, no pickled objects).
    """
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


def save_train_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Atomically write a training checkpoint (tensors and builtins only: it reloads with weights_only=True)."""
    atomic_torch_save({"format": TRAIN_STATE_FORMAT, **state}, path)


def load_train_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save_train_state`; a clear error when it is absent or of another kind."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no training checkpoint to resume from at {path} (start without --resume)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise InvalidValueError(f"{path} is not a training checkpoint of this project (format {TRAIN_STATE_FORMAT})")
    return state
