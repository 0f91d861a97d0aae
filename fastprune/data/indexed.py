"""IndexedDataset: any map-style dataset, returning ``(x, y, index)`` for ``pruner.step``."""

from __future__ import annotations

import torch


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset whose items are ``(x, y)`` so that items become ``(x, y, index)``.

    Use with ``DataLoader(IndexedDataset(ds), sampler=pruner.sampler(), ...)``: the default collate
    turns the indices into the int64 tensor that ``pruner.step`` expects.
    """

    def __init__(self, dataset):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError(f"dataset must be a map-style dataset (with __getitem__ and __len__), "
                             f"got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"dataset item {index} must be an (x, y) pair, got {type(item).__name__}"
                             f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}")
        x, y = item
        return x, y, index
