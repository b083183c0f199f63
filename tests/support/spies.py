"""Spies: a function that records the keyword arguments it is called with (:func:`recording`), and the check that a
benchmark measures the device it was given (:func:`header_device`: setup_process answers a device, the header
records what it received)."""
from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
import torch


class Stopped(Exception):
    """Raised by a spy once it has recorded what it was called with."""


def header_device(monkeypatch: pytest.MonkeyPatch, module: ModuleType, argv: list[str]) -> Any:
    """The device ``module.main(argv)`` hands machine_info (what its header reports), when setup_process
    resolves ``cuda:1``; the run stops there, before anything would need the GPU."""
    seen: dict[str, Any] = {}

    def machine_info(device: Any = None) -> dict:
        seen["device"] = device
        raise Stopped

    monkeypatch.setattr(module, "setup_process", lambda args: torch.device("cuda", 1))
    monkeypatch.setattr(module, "machine_info", machine_info)
    with pytest.raises(Stopped):
        module.main(argv)
    return seen["device"]


def recording(calls: list, fn: Any) -> Any:
    """``fn`` that first appends its keyword arguments to ``calls``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return fn(*args, **kwargs)

    return wrapper
