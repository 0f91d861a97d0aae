"""The loader without DALI: a map-style dataset over an index, for a plain DataLoader.

    ds = IndexedDataset(ImageFileDataset(index, train=True))
    loader = DataLoader(ds, batch_size=256, sampler=pruner.sampler(), num_workers=8)

PIL decodes each file and torchvision applies the same augmentations as DaliLoader.
Only the sampled files are opened, so pruning saves reads here too.
"""

from __future__ import annotations

import math

import torch

from .dali import IMAGENET_MEAN, IMAGENET_STD
from .errors import check_file, raise_for_bad_file
from .index import ImageFolderIndex


def default_transform(train: bool, image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """torchvision transforms matching DaliLoader's: random-resized crop + flip, or resize + centre crop."""
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if train:
        return T.Compose([T.RandomResizedCrop(image_size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(math.floor(image_size / 0.875 + 0.5)), T.CenterCrop(image_size), *norm])


class ImageFileDataset(torch.utils.data.Dataset):
    """``(image, label)`` for each file of an ``ImageFolderIndex``; errors name the file."""

    def __init__(self, index: ImageFolderIndex, train: bool = True, image_size: int = 224, transform=None):
        if not isinstance(index, ImageFolderIndex):
            raise ValueError(f"index must be a fastprune.data.ImageFolderIndex, got {type(index).__name__}")
        self.index = index
        self.files = index.files
        self.labels = index.labels.tolist()
        self.transform = transform if transform is not None else default_transform(train, image_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - report which file, whatever PIL raised
            raise_for_bad_file((i, path, check_file(path) or f"unreadable image ({e})"), 1, e)
        return self.transform(image), self.labels[i]
