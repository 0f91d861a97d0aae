"""The loader without DALI: a map-style dataset over an index, for a plain DataLoader.

    ds = IndexedDataset(ImageFileDataset(index, train=True))
    loader = DataLoader(ds, batch_size=256, sampler=pruner.sampler(), num_workers=8)

PIL decodes each file and torchvision applies the same augmentations as DaliLoader.
Only the sampled files are opened, so pruning saves reads here too.
"""

from __future__ import annotations

import math

import torch

from .cursor import EpochCursor
from .dali import IMAGENET_MEAN, IMAGENET_STD
from .errors import check_file, raise_for_bad_file
from .index import ImageFolderIndex
from .indexed import IndexedDataset


def default_transform(train: bool, image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      random_area=(0.08, 1.0), hflip: bool = True):
    """torchvision transforms matching DaliLoader's: random-resized crop + flip, or resize + centre crop."""
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if train:
        flip = [T.RandomHorizontalFlip()] if hflip else []
        return T.Compose([T.RandomResizedCrop(image_size, scale=tuple(random_area)), *flip, *norm])
    return T.Compose([T.Resize(math.floor(image_size / 0.875 + 0.5)), T.CenterCrop(image_size), *norm])


class ImageFileDataset(torch.utils.data.Dataset):
    """``(image, label)`` for each file of an ``ImageFolderIndex``; errors name the file.

    Random augmentations are drawn from a generator seeded by ``(seed, epoch, index)``, so they
    depend neither on the order nor on the worker that loads a sample, and a resumed run repeats
    them exactly.  Set ``epoch`` before each epoch (``TorchLoader`` does).
    """

    def __init__(self, index: ImageFolderIndex, train: bool = True, image_size: int = 224, transform=None,
                 seed: int = 0):
        if not isinstance(index, ImageFolderIndex):
            raise ValueError(f"index must be a fastprune.data.ImageFolderIndex, got {type(index).__name__}")
        self.index = index
        self.files = index.files
        self.labels = index.labels.tolist()
        self.transform = transform if transform is not None else default_transform(train, image_size)
        self.seed, self.epoch = seed, 0

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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_033 + i) % (1 << 63))
            return self.transform(image), self.labels[i]


class TorchLoader:
    """The fallback with DaliLoader's interface: ``(images, labels, idx)`` over the pruner's epoch order
    (this rank's shard under ``torch.distributed``), on ``device``, resumable mid-epoch (``state_dict``),
    decoded by PIL in ``num_workers`` processes.  Without a pruner: every sample in index order, or
    the ``shard_id``-th of ``num_shards`` strided parts (evaluation on several ranks)."""

    def __init__(self, index: ImageFolderIndex, pruner=None, batch_size: int = 256, train: bool = True,
                 device=None, num_workers: int = 4, image_size: int = 224, transform=None,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, random_area=(0.08, 1.0),
                 hflip: bool = True, seed: int = 0, shard_id: int | None = None, num_shards: int | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if pruner is not None and pruner.num_samples != len(index):
            raise ValueError(f"pruner has num_samples={pruner.num_samples} but the index has {len(index)} samples")
        self.index, self.pruner, self.batch_size = index, pruner, batch_size
        self.device = torch.device(device or (pruner.device if pruner is not None else "cpu"))
        if transform is None:
            transform = default_transform(train, image_size, random_area=random_area, hflip=hflip)
        self.images = ImageFileDataset(index, transform=transform, seed=seed)
        self.dataset = IndexedDataset(self.images)
        self.num_workers, self.channels_last, self.dtype = num_workers, channels_last, dtype
        self.cursor = EpochCursor(len(index), pruner, shard_id, num_shards)

    def __len__(self) -> int:
        return -(-self.cursor.current()[1].numel() // self.batch_size)

    def __iter__(self):
        cur = self.cursor
        epoch, order = cur.begin()
        self.images.epoch = epoch
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size,
                                             sampler=order[cur.position:].tolist(), num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        rng = torch.get_rng_state()
        batches = iter(loader)  # draws its worker seed from the global RNG: put the stream back
        torch.set_rng_state(rng)
        for x, y, idx in batches:
            cur.position += idx.numel()  # handed out = consumed
            x = x.to(self.device, self.dtype, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)
        cur.end_pass()

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.cursor.load_state_dict(sd)
