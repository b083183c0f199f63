"""What turns models and data into results: vector databases, extraction, re-ranking, evaluation, retrieval."""
from helpers.vector_db import AbstractVectorDB, FaissVectorDB, PineconeVectorDB, TensorVectorDB

__all__ = ["AbstractVectorDB", "TensorVectorDB", "FaissVectorDB", "PineconeVectorDB"]
