"""What turns models and data into results: vector databases, extraction, re-ranking, evaluation, retrieval.

The public names are imported on first use, so that light modules (``helpers.config``, ``helpers.schemas``,
``cli``) load without torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["AbstractVectorDB", "TensorVectorDB", "FaissVectorDB", "PineconeVectorDB"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from helpers import vector_db

        return getattr(vector_db, name)
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")
