"""A tiny LightningModule, its data and a run helper for the Lightning tests; run as a script under torchrun,
the DDP program (2 gloo processes): an uninterrupted run, an interrupted one and its resumption."""

from __future__ import annotations

import glob
import json
import os
import sys

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from fastprune.data import IndexedDataset
from fastprune.integrations.lightning import METRICS, PruningCallback
from fastprune.schedule import ProgressScheduler

N, C, D, BATCH = 48, 3, 8, 8
last_run_seen: list = []  # the batches of the latest run, also when it was interrupted


def dataset(flip: float = 0.0) -> TensorDataset:
    """Three well separated clusters; ``flip`` of the labels moved to the next class (planted noise)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % C
    x = torch.randn(N, D, generator=g) * 0.5
    x[torch.arange(N), y] += 3.0
    if flip:
        flipped = torch.randperm(N, generator=g)[:int(flip * N)]
        y = y.clone()
        y[flipped] = (y[flipped] + 1) % C
    return TensorDataset(x, y)


class Model(L.LightningModule):
    """A linear classifier whose training step is the pruner's; records what it trained, per epoch."""

    def __init__(self, loader: str = "plain", plain_loss: bool = False, flip: float = 0.0, validate: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(D, C)
        self.loader, self.plain_loss, self.flip, self.validate = loader, plain_loss, flip, validate
        global last_run_seen
        self.seen = last_run_seen = []  # (pruner epoch, sample indices) of every batch trained
        self.globals = []
        self.scheduler = None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.append((self.pruner.epoch, idx.tolist()))
        if self.plain_loss:
            return torch.nn.functional.cross_entropy(self(x), y)
        return self.pruner.step(self(x), y, idx)

    def on_train_epoch_start(self):
        self.globals.append(self.pruner.global_indices.tolist())

    def train_dataloader(self):
        data = IndexedDataset(dataset(self.flip))
        if self.loader == "own_sampler":
            return DataLoader(data, batch_size=BATCH, sampler=torch.utils.data.WeightedRandomSampler(torch.ones(N), N))
        if self.loader == "subclass":
            return type("MyLoader", (DataLoader,), {})(data, batch_size=BATCH)
        if self.loader == "subclass_with_pruner_sampler":
            return type("MyLoader", (DataLoader,), {})(data, batch_size=BATCH, sampler=self.pruner.sampler())
        if self.loader == "short":
            return DataLoader(torch.utils.data.Subset(data, range(N - 1)), batch_size=BATCH)
        return DataLoader(data, batch_size=BATCH, shuffle=True)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def val_dataloader(self):
        return DataLoader(IndexedDataset(dataset()), batch_size=16)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=self.pruner.total_steps(BATCH))
        self.scheduler = ProgressScheduler(cycle, self.pruner, BATCH)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(IndexedDataset(dataset()), batch_size=BATCH, shuffle=True)


class MemoryLogger(Logger):
    """Keeps what Lightning logs."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Interrupted(Exception):
    """Stands for a crash."""


class StopAt(L.Callback):
    """Raises ``Interrupted`` before batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            raise Interrupted(f"stopped at epoch {self.epoch}, batch {self.batch}")


class Run:
    def __init__(self, trainer, model, callback, logger):
        self.trainer, self.model, self.callback, self.logger = trainer, model, callback, logger


def fit(root: str, epochs=4, checkpoint: dict | None = None, stop_at=None, ckpt_path=None, validate=False,
        datamodule=False, loader="plain", plain_loss=False, flip=0.0, own_pruner=False, max_steps=-1,
        strategy="auto", devices=1, **pruner_options) -> Run:
    """Train ``Model`` with the pruning callback under a real Trainer (the pruner plans 4 epochs)."""
    options = dict(keep_ratio=0.5, warmup=1, anneal=0.25, seed=3, **pruner_options)
    callback = PruningCallback(N, C, **options) if epochs is None else PruningCallback(N, C, epochs=4, **options)
    callbacks = [callback]
    if checkpoint is not None:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_top_k=-1, **checkpoint))
    if stop_at is not None:
        callbacks.append(StopAt(*stop_at))
    model = Model(loader=loader, plain_loss=plain_loss, flip=flip, validate=validate)
    if own_pruner:
        model.pruner = object()
    logger = MemoryLogger()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, max_steps=max_steps,
                        callbacks=callbacks, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=checkpoint is not None, num_sanity_val_steps=0,
                        limit_val_batches=1.0 if validate else 0,
                        default_root_dir=root, log_every_n_steps=1)
    if loader == "to_fit":
        trainer.fit(model, train_dataloaders=DataLoader(IndexedDataset(dataset()), batch_size=BATCH))
    elif datamodule:
        trainer.fit(model, datamodule=Data())
    else:
        trainer.fit(model, ckpt_path=ckpt_path)
    return Run(trainer, model, callback, logger)


def differences(a, b, path: str = "") -> list[str]:
    """Where two nested states (dicts, lists, tensors, numbers) differ; tensors bit for bit, NaN equal to NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.shape == b.shape and a.dtype == b.dtype and bool(
            ((a == b) | (a.isnan() & b.isnan())).all() if a.is_floating_point() else torch.equal(a, b))
        return [] if same else [path]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def ddp_main(root: str) -> None:
    """Under torchrun: three fits with Lightning's DDP strategy; each rank writes what it saw."""
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    ddp = dict(strategy="ddp", devices=2)
    whole = fit(os.path.join(root, "whole"), checkpoint=dict(every_n_epochs=1), **ddp)
    seen, globals_ = list(whole.model.seen), whole.model.globals
    try:
        fit(os.path.join(root, "cut"), checkpoint=dict(every_n_epochs=1), stop_at=(2, 1), **ddp)
    except Interrupted:
        pass
    else:
        raise AssertionError("the interrupted run went through")
    last = glob.glob(os.path.join(root, "cut", "ckpt", "epoch=1-*.ckpt"))  # saved at the end of epoch 1
    resumed = fit(os.path.join(root, "cut"), checkpoint=dict(every_n_epochs=1), ckpt_path=last[0], **ddp)
    pruner = whole.callback.pruner
    weights_equal = all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in whole.model.state_dict().items())
    same_pruner = not differences(pruner.state_dict(), resumed.callback.pruner.state_dict())
    out = {"history": pruner.history, "global": pruner.global_indices.tolist(), "globals": globals_, "seen": seen,
           "visits_total": int(pruner.visits.sum()),
           "logged": [m[METRICS[0]] for m in whole.logger.metrics if METRICS[0] in m],
           "resumed_equal": same_pruner and weights_equal}
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    ddp_main(sys.argv[1])
