"""PyTorch Lightning: a callback that trains every epoch on the pruner's selection.

    pruning = PruningCallback(num_samples=len(ds), num_classes=10)
    trainer = lightning.Trainer(max_epochs=90, callbacks=[pruning])

    class Model(lightning.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            return self.pruner.step(self(x), y, idx)   # instead of F.cross_entropy(self(x), y)

        def train_dataloader(self):                    # any plain DataLoader; the callback sets its sampler
            return DataLoader(fastprune.data.IndexedDataset(ds), batch_size=64, shuffle=True)

The callback builds the pruner in ``setup()`` (on every rank, after Lightning has created the process group,
so under DDP the pruner shards and merges by itself), gives the train loader the pruner's sampler, calls
``next_epoch()`` at the end of every training epoch, logs what was kept, and keeps the pruner's state in
Lightning's checkpoints so that a resumed run makes the same selections as an uninterrupted one.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastprune.integrations.lightning needs PyTorch Lightning: pip install 'fastprune[lightning]'"
                      ) from e

from ..pruner import DynamicPruner, EpochSampler

_HOOK = "train_dataloader"
METRICS = ("fastprune/kept_fraction", "fastprune/suspected_noisy", "fastprune/visits_saved")


class ShardSampler(DistributedSampler):
    """This rank's shard of the pruner's current selection, in order; follows ``next_epoch()``.

    It is a ``DistributedSampler`` because Lightning keeps a loader's ``DistributedSampler`` as it is, and
    wraps any other sampler in one under DDP: the pruner's shard would be split again and each rank would
    train only part of it.  After a mid-epoch resume it serves the rest of the interrupted epoch, while its
    length still counts the part served before the interruption (Lightning counts those batches as done).
    """

    def __init__(self, pruner: DynamicPruner):
        super().__init__(range(pruner.num_samples), num_replicas=pruner.world_size, rank=pruner.rank, shuffle=True)
        self.pruner = pruner
        self._resume_epoch = None  # the interrupted epoch, while it is being finished
        self._served = 0  # samples of that epoch this rank trained before the interruption
        self._rest = None  # what remains of it for this rank

    def resume(self, epoch: int, served: int, world_size: int) -> None:
        """Serve epoch ``epoch`` from where a run with ``world_size`` ranks stopped, each having trained
        ``served`` samples of its shard (together, a prefix of the epoch's global order)."""
        if served <= 0 or epoch != self.pruner.epoch:
            self._resume_epoch = None
            return
        if world_size == self.pruner.world_size:
            rest = self.pruner.epoch_indices[served:]
        else:  # re-shard the remainder for the new world size
            rest = self.pruner.shard(min(served * world_size, self.pruner.global_indices.numel()))
        self._resume_epoch, self._served, self._rest = epoch, served, rest

    def _order(self) -> tuple[int, torch.Tensor]:
        if self._resume_epoch is not None and self._resume_epoch == self.pruner.epoch:
            return self._served, self._rest
        self._resume_epoch = None
        return 0, self.pruner.epoch_indices

    def __iter__(self):
        return iter(self._order()[1].tolist())

    def __len__(self) -> int:
        served, rest = self._order()
        return served + int(rest.numel())

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the pruner's epoch decides the order."""


class PruningCallback(pl.Callback):
    """Dynamic dataset pruning under Lightning's own loops (single device, DDP, resume).

    Args:
        num_samples, num_classes, and any other ``DynamicPruner`` argument.  ``epochs`` defaults to
        ``Trainer(max_epochs)`` and ``device`` to the strategy's device; CLIP tables passed as
        ``image_emb``/``text_emb`` are moved there.

    What it does:

    - ``setup("fit")``: builds the pruner on every rank and sets it as ``pl_module.pruner`` (the module's
      ``training_step`` returns ``self.pruner.step(logits, y, idx)``); wraps the module's (or the datamodule's)
      ``train_dataloader()`` so that the plain ``DataLoader`` it returns is rebuilt around the pruner's sampler;
      sets ``Trainer.reload_dataloaders_every_n_epochs = 1`` because every epoch has its own length, which
      Lightning reads only when it loads the train loader.
    - ``on_train_epoch_end``: logs ``fastprune/kept_fraction`` (the epoch's selection over the dataset),
      ``fastprune/suspected_noisy`` (samples the noise decisions act on) and ``fastprune/visits_saved`` through
      ``pl_module.log``, then calls ``next_epoch()`` (collective under DDP: every rank runs this hook).
    - ``state_dict``/``load_state_dict``: the pruner's state (merged over ranks first, so every rank must save,
      as Lightning's ``ModelCheckpoint`` does) and how far this rank got into the epoch; a run resumed from an
      end-of-epoch, after-validation or mid-epoch checkpoint trains the same samples and makes the same
      selections as an uninterrupted one.
    """

    def __init__(self, num_samples: int, num_classes: int, **pruner_options):
        self.num_samples, self.num_classes = num_samples, num_classes
        self.pruner_options = pruner_options
        self.pruner: DynamicPruner | None = None
        self._sampler: ShardSampler | None = None
        self._batch_size: int | None = None
        self._batches = 0  # batches this rank trained in the pruner's current epoch (restored on resume)
        self._batches_here = 0  # of those, the ones this process ran (the others came with a checkpoint)
        self._pending: dict | None = None  # a checkpoint's state that arrived before the pruner was built
        self._restored = False
        self._wrapped = []  # (object, had its own attribute, its value) for every hook we wrapped
        self._last_step_seen = None  # pruner.last_step when the epoch started: a step replaces it

    # ------------------------------------------------------------------ setup

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.pruner is None:
            self.pruner = self._build(trainer)
            self._sampler = ShardSampler(self.pruner)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        held = getattr(pl_module, "pruner", None)
        if held is not None and held is not self.pruner:
            raise ValueError(f"{type(pl_module).__name__}.pruner is already set to another object "
                             f"({type(held).__name__}); PruningCallback builds the pruner itself (on every rank, once "
                             "the process group exists) and sets it there: remove yours")
        pl_module.pruner = self.pruner
        if trainer.reload_dataloaders_every_n_epochs != 1:
            if trainer.reload_dataloaders_every_n_epochs > 1:
                warnings.warn("PruningCallback sets Trainer(reload_dataloaders_every_n_epochs=1): every pruned epoch "
                              "has its own length, which Lightning reads when it loads the train loader",
                              UserWarning, stacklevel=2)
            trainer.reload_dataloaders_every_n_epochs = 1
        self._wrap_hook(trainer.datamodule if trainer.datamodule is not None else pl_module)

    def _build(self, trainer: pl.Trainer) -> DynamicPruner:
        options = dict(self.pruner_options)
        if "epochs" not in options:
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise ValueError("PruningCallback needs epochs=... when Trainer(max_epochs) is not set: the pruner "
                                 "plans warm-up and annealing over the run's epochs")
            options["epochs"] = trainer.max_epochs
        device = torch.device(options.get("device") or trainer.strategy.root_device)
        options["device"] = device
        for key in ("image_emb", "text_emb"):
            if isinstance(options.get(key), torch.Tensor):
                options[key] = options[key].to(device)
        if trainer.world_size == 1:
            options.setdefault("process_group", False)  # Lightning runs one process: keep the pruner local
        return DynamicPruner(self.num_samples, self.num_classes, **options)

    def _wrap_hook(self, owner) -> None:
        """Make ``owner.train_dataloader()`` return its loader rebuilt around the pruner's sampler."""
        if any(obj is owner for obj, _, _ in self._wrapped):
            return
        if not is_overridden(_HOOK, owner):
            return  # Lightning reports the missing loader itself
        original = getattr(owner, _HOOK)

        def train_dataloader():
            return self._with_sampler(original(), f"{type(owner).__name__}.{_HOOK}()")

        own = _HOOK in vars(owner)
        self._wrapped.append((owner, own, vars(owner).get(_HOOK)))
        setattr(owner, _HOOK, train_dataloader)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwrap_hooks()  # Lightning skips teardown() after an exception

    def _unwrap_hooks(self) -> None:
        for owner, own, value in self._wrapped:  # leave the user's objects as they were
            if own:
                setattr(owner, _HOOK, value)
            else:
                delattr(owner, _HOOK)
        self._wrapped = []

    def _with_sampler(self, loader, source: str) -> DataLoader:
        """``loader`` with the pruner's sampler: kept when it already follows the pruner, else rebuilt (a plain
        DataLoader over a map-style dataset with the default random or sequential sampler)."""
        if self._follows_pruner(getattr(loader, "sampler", None)):
            self._batch_size = getattr(loader, "batch_size", None)
            return loader
        if type(loader) is not DataLoader:
            raise TypeError(f"{source} returned {type(loader).__name__}; PruningCallback can give the pruner's sampler "
                            "only to a torch.utils.data.DataLoader. Build this one with sampler=self.pruner.sampler() "
                            "(under DDP with Trainer(use_distributed_sampler=False): Lightning would split each "
                            "rank's shard again; a mid-epoch resume then restarts the epoch's order)")
        if isinstance(loader.dataset, IterableDataset):
            raise ValueError(f"{source}: an IterableDataset decides its own order and cannot take the pruner's "
                             "sampler; wrap a map-style dataset in fastprune.data.IndexedDataset")
        if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
            raise ValueError(f"{source}: the DataLoader has a custom batch_sampler (or batch_size=None), which "
                             "cannot take the pruner's sampler; give it a batch_size instead")
        if type(loader.sampler) not in (RandomSampler, SequentialSampler):
            raise ValueError(f"{source}: the DataLoader already has its own sampler ({type(loader.sampler).__name__}); "
                             "leave sampler unset (shuffle=True is fine): the pruner's sampler replaces it")
        if len(loader.dataset) != self.pruner.num_samples:
            raise ValueError(f"{source}: the dataset has {len(loader.dataset)} samples but the pruner was built with "
                             f"num_samples={self.pruner.num_samples}")
        kwargs = {name: getattr(loader, name) for name in _LOADER_SETTINGS if hasattr(loader, name)}
        self._batch_size = loader.batch_size
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=self._sampler, **kwargs)

    def _follows_pruner(self, sampler) -> bool:
        """Whether ``sampler`` serves this rank's shard of the pruner's selection (its own, or ``pruner.sampler()``)."""
        return sampler is self._sampler or (isinstance(sampler, EpochSampler) and sampler.pruner is self.pruner)

    # --------------------------------------------------------------- training

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        behind = trainer.current_epoch - self.pruner.epoch
        if behind < 0:
            raise ValueError(f"the pruner is at epoch {self.pruner.epoch} but the trainer at epoch "
                             f"{trainer.current_epoch}: the checkpoint's pruner state comes from another run")
        if behind > 1 or (behind and not self._restored):
            warnings.warn(f"the checkpoint holds no pruner state for epoch {trainer.current_epoch}: the pruner moves "
                          f"on from epoch {self.pruner.epoch} without having trained those epochs", UserWarning,
                          stacklevel=2)
        for _ in range(behind):  # a checkpoint taken after an epoch's last batch, before its epoch end
            self._advance()
        for loader in _flat(trainer.train_dataloader):
            sampler = getattr(loader, "sampler", None)
            if not self._follows_pruner(sampler):
                raise ValueError(
                    f"the train loader draws from {type(sampler).__name__}, not the pruner's sampler; a loader passed "
                    "to Trainer.fit(train_dataloaders=...) cannot be given it: define train_dataloader() in the "
                    "LightningModule or a LightningDataModule instead (the callback gives its DataLoader the sampler)")
        self._last_step_seen = self.pruner.last_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        self._batches_here += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruner = self.pruner
        if self._batches_here and pruner.last_step is self._last_step_seen:
            raise RuntimeError(f"the pruner scored no sample in epoch {pruner.epoch}: training_step must return "
                               "self.pruner.step(logits, y, idx) instead of F.cross_entropy(logits, y)")
        record = pruner.history[-1]
        pl_module.log_dict({
            METRICS[0]: record["kept"] / pruner.num_samples,
            METRICS[1]: float(pruner.suspected_noisy().numel()),
            METRICS[2]: pruner.visits_saved,
        }, on_step=False, on_epoch=True, sync_dist=pruner.world_size > 1)  # equal on every rank
        self._advance()

    def _advance(self) -> None:
        self.pruner.next_epoch()
        self._batches = self._batches_here = 0
        self._last_step_seen = self.pruner.last_step

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        if self.pruner is None:
            return {}
        self.pruner.sync()  # every rank's updates since the last merge (collective; a no-op in one process)
        shard = self.pruner.epoch_indices.numel()
        served = shard if self._batch_size is None else min(shard, self._batches * self._batch_size)
        return {"pruner": self.pruner.state_dict(), "batches": self._batches, "served": served,
                "world_size": self.pruner.world_size}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.pruner is None:
            self._pending = state_dict
        else:
            self._restore(state_dict)

    def _restore(self, state: dict) -> None:
        self.pruner.load_state_dict(state["pruner"])
        self._batches = int(state["batches"])
        self._sampler.resume(self.pruner.epoch, int(state["served"]), int(state["world_size"]))
        self._restored = True


# What a rebuilt DataLoader keeps from the user's (whichever this torch version has).
_LOADER_SETTINGS = [name for name in ("num_workers", "collate_fn", "pin_memory", "drop_last", "timeout",
                                      "worker_init_fn", "multiprocessing_context", "generator", "prefetch_factor",
                                      "persistent_workers", "pin_memory_device", "in_order")
                    if name in inspect.signature(DataLoader).parameters]


def _flat(loaders) -> list:
    """The loaders in Lightning's ``trainer.train_dataloader`` (one loader, or a collection of them)."""
    if isinstance(loaders, dict):
        return [x for v in loaders.values() for x in _flat(v)]
    if isinstance(loaders, (list, tuple)):
        return [x for v in loaders for x in _flat(v)]
    return [] if loaders is None else [loaders]
