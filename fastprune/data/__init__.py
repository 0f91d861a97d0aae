"""Data paths that feed the pruner: datasets that return each sample's index."""

from .indexed import IndexedDataset

__all__ = ["IndexedDataset"]
