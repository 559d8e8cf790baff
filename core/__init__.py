"""Pieces both stages share: the one user-facing error type, paths, and the cache format."""
