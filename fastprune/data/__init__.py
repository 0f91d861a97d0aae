"""Data paths that feed the pruner.

- ``ImageFolderIndex``: a dataset's files and labels (ImageNet-style folder or CSV list), cached scan.
- ``DaliLoader``: NVIDIA DALI pipeline reading and decoding only the pruner's selection each epoch.
- ``TorchLoader``: the same interface without DALI (PIL in ``DataLoader`` workers).
- ``IndexedDataset`` + ``ImageFileDataset``: the fallback for a plain ``DataLoader`` with
  ``pruner.sampler()``.
"""

from .dali import DaliLoader, require_dali
from .errors import BadFile, SkippedFiles
from .index import ImageFolderIndex
from .indexed import IndexedDataset
from .torch_loader import ImageFileDataset, TorchLoader, default_transform, open_rgb

__all__ = ["BadFile", "DaliLoader", "ImageFileDataset", "ImageFolderIndex", "IndexedDataset", "SkippedFiles",
           "TorchLoader", "default_transform", "open_rgb", "require_dali"]
