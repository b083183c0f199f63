"""Vector databases behind one interface; faiss and pinecone are imported only when their class is built."""
from helpers.vector_db.base import AbstractVectorDB, CorruptIndexError
from helpers.vector_db.faiss import FaissVectorDB
from helpers.vector_db.pinecone import PineconeVectorDB, PineconeWriteError
from helpers.vector_db.tensor import TensorVectorDB

__all__ = [
    "AbstractVectorDB",
    "CorruptIndexError",
    "FaissVectorDB",
    "PineconeVectorDB",
    "PineconeWriteError",
    "TensorVectorDB",
]
