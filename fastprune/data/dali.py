"""DaliLoader: each epoch, read and decode only the samples the pruner selected, with NVIDIA DALI.

The pipeline is built once.  Its ``external_source`` callback hands DALI the file
paths, labels and indices of the current epoch's order, batch by batch; DALI's
own threads read the bytes (``fn.io.file.read``) and decode them (on the GPU,
``mixed``, when training on CUDA; on the CPU otherwise), so a file outside the
selection is never opened.  At an epoch boundary only the callback's order
changes and the iterator is reset: no rebuild.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..devices import default_workers
from .errors import find_bad_files
from .index import ImageFolderIndex
from .loader import IMAGENET_MEAN, IMAGENET_STD, EpochLoader, eval_resize

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INTERP = {"linear": "INTERP_LINEAR", "cubic": "INTERP_CUBIC", "nearest": "INTERP_NN"}


def require_dali():
    """Import DALI or explain how to get it (or what to use instead)."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin import pytorch  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DaliLoader needs NVIDIA DALI: pip install 'fastprune[dali]'. Without it, use the DataLoader "
            "fallback: DataLoader(fastprune.data.IndexedDataset(fastprune.data.ImageFileDataset(index)), "
            "sampler=pruner.sampler(), ...)") from e


class _EpochSource:
    """``external_source`` callback: batch ``info.iteration`` of the current order, from ``start``."""

    def __init__(self, files: list[str], labels: np.ndarray, batch_size: int):
        self.files = files
        self.labels = labels
        self.batch_size = batch_size
        self.order = np.zeros(0, dtype=np.int64)
        self.start = 0

    def __call__(self, info):
        lo = self.start + info.iteration * self.batch_size
        if lo >= self.order.size:
            raise StopIteration
        sel = self.order[lo:lo + self.batch_size]
        paths = [np.frombuffer(self.files[i].encode(), dtype=np.uint8) for i in sel.tolist()]
        return paths, [self.labels[sel[k:k + 1]] for k in range(sel.size)], [sel[k:k + 1] for k in range(sel.size)]


class DaliLoader(EpochLoader):
    """Iterates ``(images, labels, idx)`` over exactly ``pruner.epoch_indices``, in that order.

    Under ``torch.distributed`` that is this rank's shard, so each rank reads and decodes only its
    own selected samples.  Without a pruner, ``shard_id``/``num_shards`` split the index into
    strided parts (evaluation on several ranks).

    Every selected sample comes once per epoch, the last partial batch included.  Images are
    NCHW, normalised, on ``device``, in ``dtype`` (optionally channels_last memory).  Train:
    random-resized crop (area fraction in ``random_area``), horizontal flip (``hflip``), normalise;
    eval: resize the shorter side to ``resize_size`` (default ``image_size / 0.875``;
    ``resize_mode="squash"`` resizes both sides), centre crop ``image_size``.  Without a ``pruner``
    each iteration is one pass over the index.

    ``index`` is an ``ImageFolderIndex`` or the dataset's path (folder or CSV list).

    Iterating again within the same epoch continues where the last iteration stopped (the position
    is part of ``state_dict()``); after ``pruner.next_epoch()`` iteration starts the new epoch.

    ``on_error="raise"`` turns a missing, empty, corrupt or truncated file into an error naming it;
    ``on_error="skip"`` logs each such file, leaves it out, and reports them at the end of the epoch
    (``loader.skipped``).  With a pruner on several ranks, a skipped file's place is taken by another
    sample of the rank's shard instead, so that every rank still runs the same number of steps (DDP
    needs it; ``DistributedSampler`` pads the same way) and the ranks' positions stay aligned.
    """

    def __init__(self, index: ImageFolderIndex, pruner=None, batch_size: int = 256, train: bool = True,
                 device: str | torch.device | None = None, num_threads: int | None = None, image_size: int = 224,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, seed: int = 0,
                 prefetch: int = 2, on_error: str = "raise", shard_id: int | None = None,
                 num_shards: int | None = None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_size: int | None = None,
                 interpolation: str = "linear", resize_mode: str = "shorter", random_area=(0.08, 1.0),
                 hflip: bool = True):
        require_dali()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        if dtype not in _OUT_DTYPES:
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if interpolation not in _INTERP:
            raise ValueError(f"interpolation must be one of {', '.join(_INTERP)}, got {interpolation!r}")
        if resize_mode not in ("shorter", "squash"):
            raise ValueError(f"resize_mode must be 'shorter' or 'squash', got {resize_mode!r}")
        super().__init__(index, pruner, batch_size, device, on_error, shard_id, num_shards)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # DALI needs the device's number
        self.train, self.image_size = train, image_size
        self.dtype, self.channels_last, self.seed = dtype, channels_last, seed
        self.num_threads = num_threads or default_workers()
        self.prefetch = prefetch
        self.resize_size = resize_size or eval_resize(image_size)
        self.interpolation, self.resize_mode = interpolation, resize_mode
        if not (len(random_area) == 2 and 0 < random_area[0] <= random_area[1] <= 1):
            raise ValueError(f"random_area must be (min, max) with 0 < min <= max <= 1, got {random_area!r}")
        self.random_area, self.hflip = tuple(float(a) for a in random_area), bool(hflip)
        self.mean = [255.0 * m for m in mean]
        self.std = [255.0 * s for s in std]
        self._source = _EpochSource(self.index.files, self.index._labels, batch_size)
        self._pipe = self._iter = None
        self._clean = False  # the DALI iterator ended its last epoch and can be reset
        self.epoch_seconds = float("nan")

    # ---------------------------------------------------------------- pipeline

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        gpu = self.device.type == "cuda"
        size = self.image_size
        layout = "HWC" if self.channels_last else "CHW"
        out_type = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT

        @pipeline_def(enable_conditionals=False)
        def pipeline():
            paths, labels, idx = fn.external_source(source=self._source, num_outputs=3, batch=True,
                                                    batch_info=True, dtype=[types.UINT8, types.INT64, types.INT64])
            data = fn.io.file.read(paths)
            dec = "mixed" if gpu else "cpu"
            interp = getattr(types, _INTERP[self.interpolation])
            if self.train:
                images = fn.decoders.image_random_crop(data, device=dec, output_type=types.RGB,
                                                       random_area=list(self.random_area),
                                                       random_aspect_ratio=[0.75, 4 / 3])
                images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interp, antialias=True)
                mirror = fn.random.coin_flip(probability=0.5) if self.hflip else 0
                crop = None
            else:
                images = fn.decoders.image(data, device=dec, output_type=types.RGB)
                if self.resize_mode == "squash":
                    images = fn.resize(images, resize_x=self.resize_size, resize_y=self.resize_size,
                                       interp_type=interp, antialias=True)
                else:
                    images = fn.resize(images, resize_shorter=self.resize_size, interp_type=interp, antialias=True)
                mirror, crop = 0, (size, size)
            images = fn.crop_mirror_normalize(images, dtype=out_type, output_layout=layout, crop=crop,
                                              mean=self.mean, std=self.std, mirror=mirror)
            if gpu:
                labels, idx = labels.gpu(), idx.gpu()
            return images, labels, idx

        self._pipe = pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                              device_id=self.device.index if gpu else None, seed=self.seed & 0x7FFFFFFF,
                              prefetch_queue_depth=self.prefetch)
        self._pipe.build()
        self._iter = DALIGenericIterator(self._pipe, ["images", "labels", "idx"], auto_reset=False, size=-1)
        self._clean = False

    # --------------------------------------------------------------- iteration

    def _start(self, order):
        self._source.order = self._order(order)
        self._source.start = self.cursor.position
        if self._iter is not None and self._clean:
            self._iter.reset()
            self._clean = False
        else:
            self._build()  # first use, or the previous iteration stopped mid-epoch

    def _run(self, epoch, order):
        t0 = time.perf_counter()
        started = False
        while True:
            try:
                if not started:
                    started = True
                    self._start(order)  # building the iterator already prefetches: errors can start here
                out = next(self._iter)[0]
            except StopIteration:
                self._clean = True
                break
            except RuntimeError as e:
                self._recover(order, e)  # raises unless on_error="skip"
                started = False
                continue
            images, labels, idx = out["images"], out["labels"], out["idx"]
            self.cursor.position += idx.numel()  # handed out = consumed, as state_dict() reports it
            yield self._to_device(images), labels.view(-1).to(self.device), idx.view(-1).to(self.device)
        self.epoch_seconds = time.perf_counter() - t0
        self.cursor.end_pass()
        self._warn_skipped()

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels_last
        images = images.to(self.device, non_blocking=True)
        if images.dtype != self.dtype:
            images = images.to(self.dtype)
        return images

    def _recover(self, order, error: Exception):
        """A batch failed in DALI: name the bad files; with on_error='skip' leave them out and go on."""
        self._iter = self._pipe = None  # DALI invalidates a pipeline after an error
        current = self._order(order)
        lo = self.cursor.position
        window = current[lo:lo + self.batch_size * (self.prefetch + 1)]
        bad = find_bad_files(self.index.files, window.tolist())
        if not bad:
            names = ", ".join(self.index.files[i] for i in window[:4].tolist())
            raise RuntimeError(f"DALI failed on a batch starting with {names}: {error}") from error
        self._found(bad, error)

    # --------------------------------------------------------------- resume

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self._iter = self._pipe = None
        self._clean = False
