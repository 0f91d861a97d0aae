"""The loader without DALI: ``TorchLoader`` (DaliLoader's interface), or a map-style dataset for a plain
DataLoader.

    loader = TorchLoader(index, pruner, batch_size=256, num_workers=8, on_error="skip")
    ds = IndexedDataset(ImageFileDataset(index, train=True))
    loader = DataLoader(ds, batch_size=256, sampler=pruner.sampler(), num_workers=8)

PIL decodes each file to the pixels DALI's decoder gives (``open_rgb``) and torchvision applies the same
augmentations as DaliLoader.  Only the sampled files are opened, so pruning saves reads here too.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import BadFile, raise_for_bad_file, why_unusable
from .index import ImageFolderIndex, as_index
from .indexed import IndexedDataset
from .loader import IMAGENET_MEAN, IMAGENET_STD, EpochLoader, eval_resize

_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grey PNGs open as I;16 (older PIL: I)


def open_rgb(path: str):
    """``path`` as an 8-bit RGB PIL image, decoded the way DaliLoader's decoder does it, so that both loaders
    see the same pixels: EXIF orientation applied; 16-bit samples scaled (``round(v * 255 / 65535)``), not
    clipped; float samples read as 0..1; alpha dropped, not blended; palette (transparency too), 1-bit, grey
    and CMYK converted as PIL does.  (16-bit RGB PNGs: PIL keeps the high byte, DALI rounds: 1 level apart.)"""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()  # the whole file: a damaged one fails here
        try:
            ImageOps.exif_transpose(im, in_place=True)
        except Exception:  # noqa: BLE001 - a damaged EXIF block: the image as stored
            pass
        if im.mode == "RGB":
            return im
        if im.mode in _WIDE_GREY or im.mode == "F":
            return Image.fromarray(_to_8bit(np.asarray(im), im.mode), "L").convert("RGB")
        return im.convert("RGB")


def _to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        a = np.nan_to_num(a.astype(np.float32), nan=0.0)
        return np.floor(np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    a = np.clip(a, 0, 65535).astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535): never a tie


def default_transform(train: bool, image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      random_area=(0.08, 1.0), hflip: bool = True):
    """torchvision transforms matching DaliLoader's: random-resized crop + flip, or resize + centre crop."""
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if train:
        flip = [T.RandomHorizontalFlip()] if hflip else []
        return T.Compose([T.RandomResizedCrop(image_size, scale=tuple(random_area)), *flip, *norm])
    return T.Compose([T.Resize(eval_resize(image_size)), T.CenterCrop(image_size), *norm])


class ImageFileDataset(torch.utils.data.Dataset):
    """``(image, label)`` for each file of an ``ImageFolderIndex`` (or of the dataset at a path), decoded by
    ``open_rgb``; an unusable file raises a one-line error naming it.

    ``mark_bad=True`` returns ``(BadFile(index, path, reason), label)`` for an unusable file instead, so that
    a loader decides in its main process (raise, or leave it out) rather than in a worker process, whose
    errors reach the user as a long traceback.

    Random augmentations are drawn from a generator seeded by ``(seed, epoch, index)``, so they
    depend neither on the order nor on the worker that loads a sample, and a resumed run repeats
    them exactly.  Set ``epoch`` before each epoch (``TorchLoader`` does).
    """

    def __init__(self, index: ImageFolderIndex | str, train: bool = True, image_size: int = 224, transform=None,
                 seed: int = 0, mark_bad: bool = False):
        index = as_index(index)
        self.index = index
        self.files = index.files
        self.labels = index.labels.tolist()
        self.transform = transform if transform is not None else default_transform(train, image_size)
        self.seed, self.epoch = seed, 0
        self.mark_bad = mark_bad

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        try:
            image = open_rgb(path)
        except Exception as e:  # noqa: BLE001 - report which file, whatever PIL raised
            bad = BadFile(i, path, why_unusable(path, e))
            if self.mark_bad:
                return bad, self.labels[i]
            raise_for_bad_file(bad, 1, e, hint="fastprune.data.TorchLoader(..., on_error='skip') leaves such "
                                               "files out")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_033 + i) % (1 << 63))
            return self.transform(image), self.labels[i]


def _collate(samples):
    """A batch of ``(x, y, index)``: the usable samples collated (None when there are none), and the
    ``(position in the batch, BadFile)`` of the others."""
    bad = [(k, s[0]) for k, s in enumerate(samples) if isinstance(s[0], BadFile)]
    if not bad:
        return (*torch.utils.data.default_collate(samples), [])
    good = [s for s in samples if not isinstance(s[0], BadFile)]
    return (*(torch.utils.data.default_collate(good) if good else (None, None, None)), bad)


def _place(good: torch.Tensor, subs: torch.Tensor, keep: list[int], at: list[int]) -> torch.Tensor:
    """A batch with ``good`` at positions ``keep`` and ``subs`` at positions ``at``."""
    out = good.new_empty((len(keep) + len(at), *good.shape[1:]))
    out[keep] = good
    out[at] = subs
    return out


class TorchLoader(EpochLoader):
    """DaliLoader's interface without DALI: ``(images, labels, idx)`` over the pruner's epoch order
    (this rank's shard under ``torch.distributed``), on ``device``, resumable mid-epoch (``state_dict``),
    decoded by PIL in ``num_workers`` processes.  Without a pruner: every sample in index order, or
    the ``shard_id``-th of ``num_shards`` strided parts (evaluation on several ranks).

    ``index`` is an ``ImageFolderIndex`` or the dataset's path.  ``on_error`` works as DaliLoader's:
    ``"raise"`` turns a missing, empty, corrupt or truncated file into a one-line error naming it
    (raised here, not in a worker); ``"skip"`` logs each such file, leaves it out (its batch comes one
    shorter; later epochs leave it out from the start), reports them at the end of the epoch
    (``loader.skipped``) and keeps them in ``state_dict()["bad"]``.  With a pruner on several ranks
    another sample of the rank's shard takes a skipped file's place instead, so that every rank runs the
    same number of steps.
    """

    default_device = "cpu"

    def __init__(self, index: ImageFolderIndex | str, pruner=None, batch_size: int = 256, train: bool = True,
                 device=None, num_workers: int = 4, image_size: int = 224, transform=None,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, random_area=(0.08, 1.0),
                 hflip: bool = True, seed: int = 0, shard_id: int | None = None, num_shards: int | None = None,
                 on_error: str = "raise"):
        super().__init__(index, pruner, batch_size, device, on_error, shard_id, num_shards)
        if transform is None:
            transform = default_transform(train, image_size, random_area=random_area, hflip=hflip)
        self.images = ImageFileDataset(self.index, transform=transform, seed=seed, mark_bad=True)
        self.dataset = IndexedDataset(self.images)
        self.num_workers, self.channels_last, self.dtype = num_workers, channels_last, dtype

    def _run(self, epoch, order):
        cur = self.cursor
        self.images.epoch = epoch
        serve = self._order(order)  # without the files known to be unusable
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size,
                                             sampler=serve[cur.position:].tolist(), num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda", collate_fn=_collate)
        rng = torch.get_rng_state()
        batches = iter(loader)  # draws its worker seed from the global RNG: put the stream back
        torch.set_rng_state(rng)
        try:
            for x, y, idx, bad in batches:
                if bad:
                    x, y, idx = self._unusable(order, x, y, idx, bad)
                    if idx is None:  # the whole batch left out
                        continue
                cur.position += idx.numel()  # handed out = consumed
                x = x.to(self.device, self.dtype, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)
        finally:
            # on an error the traceback keeps this frame: end the workers now, not whenever it is freed (an
            # iterator collected late waits seconds for its workers)
            del batches
        cur.end_pass()
        self._warn_skipped()

    def _unusable(self, order, x, y, idx, bad):
        """A batch with unusable files: raise naming the first, or leave them out; on several ranks
        substitutes from the shard (decoded here) take their places."""
        self._found([b for _, b in bad])
        if self.pruner is None or self.pruner.world_size == 1:
            return x, y, idx
        subs = []
        for k, _ in bad:
            while True:
                j = int(self._order(order)[self.cursor.position + k])  # a substitute now that the file is known
                item = self.images[j]
                if not isinstance(item[0], BadFile):
                    break
                self._found([item[0]])
            subs.append((*item, j))
        subs = torch.utils.data.default_collate(subs)
        if idx is None:
            return subs
        at = [k for k, _ in bad]
        keep = [k for k in range(idx.numel() + len(at)) if k not in at]
        return tuple(_place(good, sub, keep, at) for good, sub in zip((x, y, idx), subs, strict=True))
