"""The ground floor: what models/, datasets/ and helpers/ all use (atomic file writes, hashes, input conventions).

Nothing here imports from the project's other packages, so every floor above can import it.
"""
