"""What DaliLoader and TorchLoader share: the preprocessing constants, and ``EpochLoader``, the part of a
loader that does not depend on how it decodes."""

from __future__ import annotations

import math

import torch

from ..devices import resolve_device
from .cursor import EpochCursor
from .errors import SkipsBadFiles
from .index import ImageFolderIndex, as_index

LOADERS = ("auto", "dali", "torch")  # what a command may ask for; auto: DALI when installed
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_resize(image_size: int) -> int:
    """The shorter side an eval image is resized to before the centre crop of ``image_size``."""
    return math.floor(image_size / 0.875 + 0.5)


class EpochLoader(SkipsBadFiles):
    """Iterates ``(images, labels, idx)`` over the pruner's epoch order (or the index, without one).

    Checks the arguments every loader takes, keeps the position in the epoch's order (``cursor``),
    starts each epoch (the files known to be unusable left out again) and saves and restores the
    position (``state_dict``).  A subclass decodes: ``_run(epoch, order)`` yields the batches from
    ``cursor.position`` on and advances it by each batch it hands out.  ``device=None`` means the
    pruner's device, else ``default_device`` (None: CUDA when available).
    """

    default_device: str | None = None

    def __init__(self, index: ImageFolderIndex | str, pruner, batch_size: int, device, on_error: str,
                 shard_id: int | None, num_shards: int | None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self._init_bad_files(on_error)
        index = as_index(index)  # after the cheap checks: a path is scanned here
        if pruner is not None and pruner.num_samples != len(index):
            raise ValueError(f"pruner has num_samples={pruner.num_samples} but the index has {len(index)} samples")
        self.cursor = EpochCursor(len(index), pruner, shard_id, num_shards)
        if device is None:
            device = pruner.device if pruner is not None else self.default_device
        self.device: torch.device = resolve_device(device, "device")
        self.index, self.pruner, self.batch_size = index, pruner, batch_size

    def __len__(self) -> int:
        return -(-self.cursor.current()[1].numel() // self.batch_size)

    def __iter__(self):
        cur = self.cursor
        epoch, order = cur.begin(lambda o: self._order(o.numpy()).size)
        order = order.numpy()
        if cur.position == 0:  # an epoch starts
            self._epoch_starts(order)
        return self._run(epoch, order)

    def _run(self, epoch: int, order):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Position in the current epoch, for resuming an interrupted epoch at the next unseen batch."""
        return {**self.cursor.state_dict(), **self._bad_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.cursor.load_state_dict(sd)
        self._load_bad_state(sd)
