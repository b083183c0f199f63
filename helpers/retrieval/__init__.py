"""Retrieval over your own images: the Retriever (index, query, re-rank, save, load), its image handling and
save format, what ``retrieve.py`` runs, the result grid's tiles and the web demo.

    from helpers.retrieval import Retriever
"""
from helpers.retrieval.retriever import Hit, Retriever

__all__ = ["Hit", "Retriever"]
