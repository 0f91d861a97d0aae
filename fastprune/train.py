"""Drop-in training for ImageNet-style folders: the library behind ``fastprune train``."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import inspect
import json
import math
import os
import time
from dataclasses import KW_ONLY, MISSING, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import distributed as _dist
from .data import ImageFolderIndex
from .data.loader import LOADERS
from .devices import default_workers, resolve_device
from .noise import EVIDENCE
from .policies import POLICIES
from .pruner import DynamicPruner
from .report import topk_correct, write_report, write_suspected_noisy
from .rundir import (RunLock, RunLocked, check_outside, describe_load_error, prepare_dir, remove_stale_temporaries,
                     write_log)
from .rundir import atomic_save as _atomic_save
from .sample_table import SAMPLES_FILE, SELECTION_FILE, SampleTable, SelectionRecord, record_selection
from .schedule import SCHEDULES, SampleSchedule, expected_total_samples

OPTIMIZERS = ("sgd", "adamw")

GROUPS = {  # the groups of `fastprune train`'s arguments, in --help's order
    "data": "data",
    "model": "model",
    "optim": "optimisation and learning-rate schedule",
    "loader": "loading and augmentation",
    "pruning": "pruning (DynamicPruner arguments)",
    "noise": "noise handling (DynamicPruner arguments)",
    "run": "the run: output, device, checkpoints",
}


def _arg(group: str, default=MISSING, *, help: str | None = None, factory=MISSING, choices=None,
         pruner: bool = False):
    """A TrainConfig field that is an argument of ``fastprune train`` (a positional one without a default).

    ``pruner``: a DynamicPruner argument of the same name; without a default here it takes DynamicPruner's."""
    meta = {"group": group, "help": help, "choices": choices, "pruner": pruner}
    return field(default=default, default_factory=factory, metadata=meta)


def _pruner_defaults(cls):
    """Give each ``pruner`` field without a default DynamicPruner's default: one source for both."""
    params = inspect.signature(DynamicPruner).parameters
    for name, f in vars(cls).items():
        if isinstance(f, dataclasses.Field) and f.metadata.get("pruner"):
            if name not in params:
                raise TypeError(f"TrainConfig.{name} is marked pruner, but DynamicPruner has no argument {name!r}")
            if f.default is MISSING and params[name].default is inspect.Parameter.empty:
                raise TypeError(f"TrainConfig.{name} needs a default: DynamicPruner's {name!r} has none")
            if f.default is MISSING:
                f.default = params[name].default
    return cls


@dataclass
@_pruner_defaults
class TrainConfig:
    """Everything ``fastprune train`` takes.

    A field made with ``_arg`` is an argument of the sub-command (``fastprune.cli`` generates them: flag, type,
    default and bool-ness from the field, help, group and choices from its metadata); one marked ``pruner`` is
    passed to DynamicPruner under its name (``pruner_kwargs``) and defaults to DynamicPruner's default.
    """

    # data
    data: str = _arg("data", help="training folder root/<class>/<image> (or a path,label CSV)")
    val: str | None = _arg("data", None, help="validation folder with the same classes")
    _: KW_ONLY  # the rest by name: their order follows the groups, not a call's positions
    skip_bad_files: bool = _arg("data", False, help="log and leave out missing, empty or corrupt images instead of "
                                                    "stopping at the first (either loader; the run's checkpoint "
                                                    "lists them)")
    # model
    arch: str = _arg("model", "resnet50", help="torchvision or timm model name, or smallcnn")
    compile: bool = _arg("model", False, help="torch.compile the model")
    channels_last: bool | None = _arg("model", None, help="channels_last memory format (default: on CUDA)")
    # optimisation and learning-rate schedule
    epochs: int = _arg("optim", 90, pruner=True)
    batch_size: int = _arg("optim", 256, help="per process")
    lr: float = _arg("optim", 0.1)
    optimizer: str = _arg("optim", "sgd", help="sgd (momentum + Nesterov) or adamw", choices=OPTIMIZERS)
    momentum: float = _arg("optim", 0.9)
    weight_decay: float = _arg("optim", 5e-5)
    schedule: str = _arg("optim", "cosine", help="over samples actually trained, so it follows the shrinking epochs",
                         choices=SCHEDULES)
    lr_warmup: float = _arg("optim", 0.02, help="fraction of training with linear lr warm-up")
    label_smoothing: float = _arg("optim", pruner=True)
    # loading and augmentation
    loader: str = _arg("loader", "auto", help="auto: DALI when installed, else the torch DataLoader fallback",
                       choices=LOADERS)
    workers: int = _arg("loader", factory=default_workers,
                        help="decoding threads/processes (default: one per core, at most 8)")
    image_size: int = _arg("loader", 224)
    crop_area: tuple = (0.08, 1.0)  # random-resized-crop area fraction (no flag)
    hflip: bool = True  # (no flag)
    # pruning
    keep_ratio: float = _arg("pruning", help="expected fraction of the data trained on in a pruned epoch",
                             pruner=True)
    policy: str = _arg("pruning", help="'full' trains on everything: the baseline", choices=POLICIES, pruner=True)
    ema: float = _arg("pruning", help="weight of the old score in the per-sample loss EMA", pruner=True)
    warmup: int = _arg("pruning", help="epochs on the full set before pruning", pruner=True)
    anneal: float = _arg("pruning", help="fraction of final epochs on the full set", pruner=True)
    embeddings: str | None = _arg("pruning", None, help="directory from `fastprune embed` (for consistency)")
    subset: str | None = _arg("pruning", None, help="train only on this subset file (`fastprune prune-static`)")
    # noise handling
    noise_ratio: float = _arg("noise", help="the most of the data the noise decisions may relabel, leave out or "
                                            "down-weight (0: off); the amount itself is found per class from the "
                                            "evidence", pruner=True)
    noise_evidence: str = _arg("noise", help="evidence of wrong labels: the model's margin, CLIP's, or both (auto: "
                                             "both with --embeddings, else the model's)", choices=EVIDENCE,
                               pruner=True)
    noise_relabel: bool = _arg("noise", help="relabel sure suspects where the model and CLIP agree on another class "
                                             "(needs --embeddings)", pruner=True)
    noise_start: int | None = _arg("noise", help="first epoch that uses the noise decisions (default: a fifth of "
                                                 "--epochs, at least 2)", pruner=True)
    # the run
    out: str = _arg("run", "runs/fastprune", help="run directory: log.jsonl, checkpoint.pt, plots")
    device: str | None = _arg("run", None)
    resume: bool = _arg("run", False, help="continue the run in --out after an interruption")
    checkpoint_every: int = _arg("run", 0, help="also checkpoint every N steps inside an epoch (0: epoch ends only)")
    max_nonfinite_steps: int = _arg("run", 100, help="stop when the loss has been NaN or inf this many steps in a "
                                                     "row (0: never; default 100)")
    seed: int = _arg("run", help="model initialisation, augmentation and selection draws", pruner=True)
    extra: dict = field(default_factory=dict)

    def pruner_kwargs(self) -> dict:
        """The DynamicPruner arguments this configuration sets (its fields marked ``pruner``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("pruner")}

    def check(self) -> None:
        """Raise ``ValueError`` for a setting no run can use (the pruner checks its own arguments)."""
        def number(name, lo, hi=math.inf, lo_open=False, hi_open=False, integer=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not math.isfinite(v) \
                    or v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
                kind = "an integer" if integer else "a finite number"
                rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
                raise ValueError(f"--{name.replace('_', '-')} must be {kind} in {rng}, got {v!r}")

        number("lr", 0.0, lo_open=True)
        number("momentum", 0.0, 1.0, hi_open=True)
        number("weight_decay", 0.0)
        number("lr_warmup", 0.0, 1.0)
        number("label_smoothing", 0.0, 1.0, hi_open=True)
        for name in ("epochs", "batch_size", "image_size"):
            number(name, 1, integer=True)
        for name in ("workers", "checkpoint_every", "max_nonfinite_steps"):
            number(name, 0, integer=True)
        lo, hi = self.crop_area
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 1):
            raise ValueError(f"--crop-area must be two numbers 0 < MIN <= MAX <= 1, got {self.crop_area!r}")
        resolve_device(self.device, "--device")  # a device this machine lacks fails here, before any work


class NonFiniteLoss(RuntimeError):
    """The training loss stayed non-finite for ``max_nonfinite_steps`` consecutive steps."""


class SmallCNN(torch.nn.Module):
    """A small convolutional network for small images (the demo, tests, quick CPU runs)."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        c = width

        def block(i, o):
            return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1, bias=False), torch.nn.BatchNorm2d(o),
                                       torch.nn.ReLU(inplace=True))

        self.features = torch.nn.Sequential(block(3, c), block(c, c), torch.nn.MaxPool2d(2), block(c, 2 * c),
                                            torch.nn.MaxPool2d(2), block(2 * c, 4 * c),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(4 * c, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def build_model(arch: str, num_classes: int) -> torch.nn.Module:
    """``smallcnn``, a torchvision model name, or (when installed) a timm model name."""
    if arch == "smallcnn":
        return SmallCNN(num_classes)
    import torchvision

    if arch in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and arch in timm.list_models():
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    import difflib

    known = ["smallcnn", *torchvision.models.list_models(module=torchvision.models)]
    close = difflib.get_close_matches(arch, known + (timm.list_models() if timm else []), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown architecture {arch!r} (torchvision{', timm' if timm else ''} or smallcnn){hint}")


def _channels_last(cfg, device) -> bool:
    return cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"


def make_loader(kind, index, pruner, cfg, train, device, shard=(None, None)):
    """(loader, description): DaliLoader when ``kind`` is dali (or auto with DALI installed), else the fallback.

    ``shard`` = (shard_id, num_shards) splits a pruner-less loader (evaluation) over ranks."""
    from .data import TorchLoader

    if kind == "auto":
        try:
            import nvidia.dali  # noqa: F401

            kind = "dali"
        except ImportError:
            kind = "torch"
    channels_last = _channels_last(cfg, device)
    on_error = "skip" if cfg.skip_bad_files else "raise"
    if kind == "dali":
        from .data import DaliLoader

        loader = DaliLoader(index, pruner, batch_size=cfg.batch_size, train=train, device=device,
                            num_threads=max(1, cfg.workers), image_size=cfg.image_size, channels_last=channels_last,
                            seed=cfg.seed + (pruner.rank if pruner is not None else 0),  # ranks draw apart
                            random_area=cfg.crop_area, hflip=cfg.hflip, shard_id=shard[0],
                            num_shards=shard[1], on_error=on_error)
        return loader, "DALI (GPU decode)" if device.type == "cuda" else "DALI (CPU decode)"
    if kind != "torch":
        raise ValueError(f"loader must be 'auto', 'dali' or 'torch', got {kind!r}")
    loader = TorchLoader(index, pruner, batch_size=cfg.batch_size, train=train, device=device,
                         num_workers=cfg.workers, image_size=cfg.image_size, channels_last=channels_last,
                         random_area=cfg.crop_area, hflip=cfg.hflip, seed=cfg.seed, shard_id=shard[0],
                         num_shards=shard[1], on_error=on_error)
    return loader, "torch DataLoader fallback (PIL decode)"


def _optimizer(cfg, model):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def evaluate(model, loader, device) -> tuple[float, float | None]:
    """Top-1 and top-5 accuracy (top-5 is None with fewer than 5 classes).

    Under ``torch.distributed`` each rank evaluates its shard of the loader and the counts are summed."""
    model.eval()
    hits1 = torch.zeros((), dtype=torch.int64, device=device)
    hits5 = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for images, labels, _ in loader:
        with autocast:
            logits = model(images)
        h1, h5 = topk_correct(logits.float(), labels)
        hits1 += h1
        hits5 += h5
        n += labels.numel()
    counts = torch.stack([hits1, hits5, torch.tensor(n, device=device)])
    if _distributed():
        torch.distributed.all_reduce(counts)
    hits1, hits5, n = counts.tolist()
    classes = loader.index.num_classes
    return hits1 / max(n, 1), (hits5 / max(n, 1) if classes >= 5 else None)


# What a checkpoint of `fastprune train` holds (besides "dataset", the training data's fingerprint).
CHECKPOINT_KEYS = ("config", "model", "optimizer", "schedule", "pruner", "loader", "history", "epoch", "step", "rng")


def load_run_checkpoint(path: Path, device) -> dict:
    """The checkpoint of the run to resume.  A damaged file (truncated, garbage) or one that ``fastprune train``
    did not write is a one-line error naming it: torch's own errors name neither the file nor the cause."""
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
    except OSError:
        raise  # unreadable (permissions, ...): the error names the file
    except Exception as e:  # noqa: BLE001 - pickle, zip and EOF errors all mean: damaged
        raise ValueError(f"cannot resume: the checkpoint {str(path)!r} cannot be read: {describe_load_error(path, e)}; "
                         "start a new run in another --out") from e
    if not isinstance(ck, dict):
        raise ValueError(f"cannot resume: {str(path)!r} is not a checkpoint of fastprune train (it holds a "
                         f"{type(ck).__name__}, not a dict)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ck]
    if missing:
        raise ValueError(f"cannot resume: {str(path)!r} is not a checkpoint of fastprune train (it lacks "
                         f"{', '.join(map(repr, missing))})")
    return ck


# Settings a resumed run may change: where and how fast it runs, and how long (the schedule follows the new
# epoch count).  The data folders may move: the training data is compared by its fingerprint instead.
RESUME_CHANGEABLE = frozenset({"out", "resume", "epochs", "workers", "device", "compile", "loader",
                               "checkpoint_every", "max_nonfinite_steps", "extra", "data", "val"})


def check_resumable(ck: dict, cfg: TrainConfig, index: ImageFolderIndex) -> str | None:
    """Refuse to resume a checkpoint made with other settings (all but ``RESUME_CHANGEABLE``) or on other
    training data (``index``, compared by its fingerprint), listing every difference; returns a caution
    about the data to log (e.g. the files' times changed: a copy), or None."""
    saved = ck.get("config")
    if not isinstance(saved, dict):
        raise ValueError("the checkpoint has no configuration to compare with; it was not written by fastprune train")
    now = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    saved = json.loads(json.dumps(saved, default=str))
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)!r} in the run, {now[k]!r} now"
             for k in now if k not in RESUME_CHANGEABLE and saved.get(k) != now[k]]
    recorded = ck.get("dataset")
    why, caution = index.compare(recorded if isinstance(recorded, dict) else {"fingerprint": recorded})
    if why is not None:
        diffs.append(f"the training data: {cfg.data!r} is not the data the run trained on ({why})")
    if diffs:
        raise ValueError("cannot resume: the settings differ from the run's checkpoint: " + "; ".join(diffs)
                         + ". Pass the run's settings again (only --epochs, --workers, --device, --compile, --loader, "
                         "--checkpoint-every, --max-nonfinite-steps and where --data and --val lie may change), or "
                         "start a new run in another --out")
    return caution


def selection_hash(order: torch.Tensor) -> str:
    return hashlib.sha256(order.numpy().tobytes()).hexdigest()[:16]


def train(cfg: TrainConfig, log: Callable[[str], None] = print,
          on_epoch_end: Callable[[int, dict], None] | None = None, progress: bool = True) -> dict:
    """Train ``cfg.arch`` on ``cfg.data`` with the pruner; returns the run summary.

    Writes ``log.jsonl`` (one line per epoch), ``checkpoint.pt`` (atomic; model, optimiser,
    schedule, pruner, loader state and RNG states), ``selection.npz`` (the last selection that pruned), and
    at the end ``samples.npz``, ``suspected_noisy.csv``, ``summary.json`` and the report (plots, the
    mislabeled-sample gallery) into ``cfg.out``.

    Under ``torchrun`` (or with a process group already initialised) every process trains a DDP
    replica on its shard of each epoch's selection (``batch_size`` is per process); rank 0 logs and
    writes the files.  Resuming needs ``cfg.out`` readable by every rank (a shared file system)
    and may use another number of processes.
    """
    cfg.check()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    check_outside(out, data=cfg.data, val=cfg.val)
    # os.path: a path the system refuses (a name too long, say) is reported by prepare_dir, naming --out
    if not cfg.resume and os.path.exists(out / "log.jsonl"):
        raise FileExistsError(f"{str(out)!r} already holds a run; pass --resume to continue it or choose --out")
    if cfg.resume and not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"nothing to resume: {str(ckpt_path)!r} does not exist")
    own_group, device = _dist.init_from_env(cfg.device)
    finished = False
    try:
        with _run_lock(out, log):
            summary = _train(cfg, out, ckpt_path, device, log, on_epoch_end, progress)
        finished = True
        return summary
    finally:
        if own_group:
            _leave_group(finished)


@contextlib.contextmanager
def _run_lock(out: Path, log):
    """Rank 0 holds the run directory's lock for the run; every rank learns whether it got it."""
    distributed = _distributed()
    main = not distributed or torch.distributed.get_rank() == 0
    lock, error = None, None
    if main:
        prepare_dir(out, "--out")  # created and writable, or a one-line error, before any long work
        try:
            lock = RunLock(out).__enter__()
        except FileExistsError as e:
            error = str(e)
    if distributed:
        shared = [error]
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise RunLocked(error)
    if lock is not None and lock.stale:
        log(f"note: replaced the stale lock of process {lock.stale.get('pid')} (no longer running) in {out}")
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _leave_group(finished: bool) -> None:
    """Tear down the process group this run created, while the interpreter is fully alive.

    DDP's reducer and the pruner keep the group referenced from reference cycles; left to the
    interpreter's exit, gloo's worker threads release tensors after Python is finalised and the
    process aborts ("terminate called without an active exception", seen on a loaded CI machine).
    """
    gc.collect()  # the DDP replica and everything else of the run, freed now
    if finished:
        torch.distributed.barrier()  # no rank tears the group down while rank 0 still writes its files
    torch.distributed.destroy_process_group()
    gc.collect()


def _train(cfg, out, ckpt_path, device, log, on_epoch_end, progress) -> dict:
    """This process's part of the run: build, restore (--resume), start, train epoch by epoch, finish."""
    distributed = _distributed()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    if rank != 0:  # rank 0 speaks and writes for all
        log, progress = (lambda msg: None), False
    else:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out, older=cfg.resume)  # a fresh --out may be a user's folder
    ck = load_run_checkpoint(ckpt_path, device) if cfg.resume else None  # a damaged one fails before the scan
    run = build_run(cfg, out, ckpt_path, device, rank, world, log, progress)
    if ck is not None:
        restore(run, ck)
    start(run, fresh=ck is None)
    t_run = time.perf_counter()
    for epoch in range(run.first_epoch, cfg.epochs):
        record = run_epoch(run, epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    return finish(run, time.perf_counter() - t_run)


@dataclass
class Run:
    """What one process's training run works with: built by ``build_run``, moved on by every step."""

    cfg: TrainConfig
    out: Path
    ckpt_path: Path
    device: torch.device
    rank: int
    world: int
    log: Callable[[str], None]
    progress: bool
    index: ImageFolderIndex
    dataset: dict  # the training data's identity, saved in every checkpoint
    model: torch.nn.Module
    pruner: DynamicPruner
    optimizer: torch.optim.Optimizer
    schedule: SampleSchedule
    loader: object
    loader_name: str
    val_loader: object | None
    bad_run: torch.Tensor  # consecutive steps with a non-finite loss, counted on the device (no sync)
    net: torch.nn.Module | None = None  # what trains: the model in DDP, compiled (``start``)
    eval_net: torch.nn.Module | None = None
    history: list[dict] = field(default_factory=list)
    first_epoch: int = 0  # where this process starts: > 0 when resumed
    step: int = 0  # optimizer steps of the whole run

    @property
    def main(self) -> bool:
        return self.rank == 0


def build_run(cfg, out, ckpt_path, device, rank, world, log, progress) -> Run:
    """Scan the data and build the model, pruner, optimiser, schedule and loaders as a new run starts."""
    index, dataset, val_index = _open_data(cfg, log, progress, rank == 0)
    image_emb = text_emb = None
    if cfg.embeddings:
        from .embeddings import Embeddings

        emb = Embeddings.load(cfg.embeddings, index=index, device=device)
        image_emb, text_emb = emb.image, emb.text
    initial_subset = None
    if cfg.subset:
        from .static import load_subset

        initial_subset, _ = load_subset(cfg.subset, index=index)
    torch.manual_seed(cfg.seed)  # model init and augmentation draws; a resumed run restores the RNG states
    model = build_model(cfg.arch, index.num_classes).to(device)
    pruner = DynamicPruner(len(index), index.num_classes, **cfg.pruner_kwargs(), image_emb=image_emb,
                           text_emb=text_emb, device=device, initial_subset=initial_subset)
    if _channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model)
    schedule = SampleSchedule(cfg.lr, cfg.schedule, cfg.lr_warmup)
    loader, loader_name = make_loader(cfg.loader, index, pruner, cfg, True, device)
    val_loader = make_loader(cfg.loader, val_index, None, cfg, False, device, (rank, world))[0] if val_index else None
    return Run(cfg=cfg, out=out, ckpt_path=ckpt_path, device=device, rank=rank, world=world, log=log,
               progress=progress, index=index, dataset=dataset, model=model, pruner=pruner, optimizer=optimizer,
               schedule=schedule, loader=loader, loader_name=loader_name, val_loader=val_loader,
               bad_run=torch.zeros((), dtype=torch.int64, device=device))


def _open_data(cfg, log, progress: bool, main: bool) -> tuple[ImageFolderIndex, dict, ImageFolderIndex | None]:
    """The training data's index and identity, and the validation data's index (its images checked)."""
    index = ImageFolderIndex(cfg.data)
    if index.num_classes < 2:
        raise ValueError(f"the training data {cfg.data!r} has one class ({index.classes[0]!r}): there is nothing to "
                         "tell apart (the loss is zero); a classifier needs two classes or more, one folder each")
    dataset = index.identity()  # one stat per file: once, not at every checkpoint
    val_index = None
    if cfg.val:
        val_index = ImageFolderIndex(cfg.val)
        if val_index.classes != index.classes:
            only_t = sorted(set(index.classes) - set(val_index.classes))[:3]
            only_v = sorted(set(val_index.classes) - set(index.classes))[:3]
            raise ValueError(f"--val has other classes than the training data ({len(val_index.classes)} vs "
                             f"{len(index.classes)}; only in train: {only_t}, only in val: {only_v})")
        _check_val_files(val_index, cfg, log, progress, main, _distributed())
    return index, dataset, val_index


def _check_val_files(val_index, cfg, log, progress: bool, main: bool, distributed: bool) -> None:
    """Look at every validation image before the first epoch (rank 0; a quick header check), so that a broken
    one stops the run now and not after an epoch of training; with --skip-bad-files, say how many are left out."""
    from .data.errors import scan_headers

    bad = scan_headers(val_index.files, progress, desc="checking --val images") if main else None
    if distributed:
        shared = [bad]
        torch.distributed.broadcast_object_list(shared, src=0)
        bad = shared[0]
    if not bad:
        return
    first = f"{bad[0].path}: {bad[0].reason}"
    if not cfg.skip_bad_files:
        raise ValueError(f"--val has {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} (first: {first}); "
                         "repair or remove them, or pass --skip-bad-files to evaluate without them")
    log(f"note: --val: {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} will be left out of evaluation "
        f"(first: {first})")


def restore(run: Run, ck: dict) -> None:
    """Continue from the checkpoint ``ck`` (refused if made with other settings or data): every state, the
    history, the step, the RNG states; the log is rewritten from the checkpoint, the run's commit point."""
    caution = check_resumable(ck, run.cfg, run.index)
    if caution is not None:
        run.log(f"note: resuming on {run.cfg.data}: {caution}")
    try:
        run.model.load_state_dict(ck["model"])
        run.optimizer.load_state_dict(ck["optimizer"])
        run.schedule.load_state_dict(ck["schedule"])
        run.pruner.load_state_dict(ck["pruner"])
        run.loader.load_state_dict(ck["loader"])
        run.history, run.first_epoch, run.step = list(ck["history"]), int(ck["epoch"]), int(ck["step"])
        torch.set_rng_state(ck["rng"]["torch"])
        if run.device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"cannot resume: the state saved in {str(run.ckpt_path)!r} cannot be restored "
                         f"({type(e).__name__}: {detail}); the file is damaged: start a new run in another "
                         "--out") from e
    if run.main:  # an epoch logged after the checkpoint (killed in between) is not logged twice
        write_log(run.out / "log.jsonl", run.history)
    run.log(f"resumed {run.out} at epoch {run.first_epoch} (step {run.step})")


def start(run: Run, fresh: bool) -> None:
    """Wrap the model now that its weights are final (DDP over processes, --compile), say what runs, and
    record a ``fresh`` run's first selection."""
    cfg, device = run.cfg, run.device
    net = run.model
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    run.net = torch.compile(net) if cfg.compile else net
    run.eval_net = run.net if run.world == 1 else run.model  # ranks evaluate different numbers of batches: no DDP
    where = (f"{device}" if run.world == 1
             else f"{run.world} processes ({device.type}, {torch.distributed.get_backend()})")
    run.log(f"fastprune train: {len(run.index)} images, {run.index.num_classes} classes, {cfg.arch} on {where}, "
            f"loader: {run.loader_name}, policy {cfg.policy} keep {cfg.keep_ratio}")
    if run.main and fresh:
        record_selection(run.pruner, run.out, cfg.epochs, replace=True)  # whatever an older run left goes


def run_epoch(run: Run, epoch: int) -> dict:
    """One epoch: train, evaluate, log it, then commit it (``commit_epoch``); returns its log record."""
    pruner, schedule = run.pruner, run.schedule
    selected = pruner.global_indices
    schedule.set_total(expected_total_samples(pruner))  # the run's length, re-estimated every epoch
    schedule.advance(0, run.optimizer)
    t0 = time.perf_counter()
    trained, lr = train_one_epoch(run, epoch)
    train_s = time.perf_counter() - t0
    top1, top5 = evaluate(run.eval_net, run.val_loader, run.device) if run.val_loader is not None else (None, None)
    n = len(run.index)
    record = {"epoch": epoch, "policy": pruner.history[-1]["policy"], "samples_trained": int(selected.numel()),
              "kept_fraction": selected.numel() / n, "suspected_noisy": _acted_on(pruner.history[-1]),
              "visits_saved": pruner.visits_saved, "train_seconds": round(train_s, 3),
              "epoch_seconds": round(time.perf_counter() - t0, 3),
              "images_per_s": round(trained * run.world / max(train_s, 1e-9), 1), "val_top1": top1,
              "val_top5": top5, "lr": lr if trained else schedule.lr(), "selection": selection_hash(selected),
              "step": run.step, "world_size": run.world}
    run.history.append(record)
    acc = f", val top-1 {top1:.2%}" + (f" top-5 {top5:.2%}" if top5 is not None else "") if top1 is not None else ""
    run.log(f"epoch {epoch}: trained {selected.numel()}/{n} ({record['kept_fraction']:.0%}) in {train_s:.1f} s, "
            f"{record['images_per_s']:.0f} img/s, visits saved {pruner.visits_saved:.1%}{acc}")
    commit_epoch(run, epoch, record)
    return record


def train_one_epoch(run: Run, epoch: int) -> tuple[int, float | None]:
    """Train on this process's part of the epoch's selection (from where a resumed run stopped in it),
    checkpointing every --checkpoint-every steps; returns the images trained and the last learning rate."""
    cfg, pruner, optimizer = run.cfg, run.pruner, run.optimizer
    run.net.train()
    state = run.loader.state_dict()
    done = state["position"] if state["epoch"] == epoch else 0  # > 0 when resuming inside this epoch
    bar = tqdm(total=pruner.epoch_indices.numel(), initial=done, unit="img", desc=f"epoch {epoch}",
               disable=not run.progress, leave=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda")
    trained, lr = 0, None
    for images, labels, idx in run.loader:
        with autocast:
            logits = run.net(images)
        loss = pruner.step(logits, labels, idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = run.schedule.advance(idx.numel(), optimizer)
        trained += idx.numel()
        run.step += 1
        bar.update(idx.numel())
        run.bad_run = torch.where(torch.isfinite(loss.detach()), 0, run.bad_run + 1)  # on the device: no sync
        if run.step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")  # a sync every 50 steps only
            _check_loss(run)
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
            save_checkpoint(run, epoch, mid_epoch=True)
    bar.close()
    _check_loss(run)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return trained, lr


def _check_loss(run: Run) -> None:
    """Stop after --max-nonfinite-steps non-finite losses in a row (a sync: at the loop's sync points only)."""
    limit = run.cfg.max_nonfinite_steps
    if limit and int(run.bad_run) >= limit:
        raise NonFiniteLoss(
            f"the training loss has been non-finite (NaN or inf) for the last {int(run.bad_run)} steps, up to step "
            f"{run.step}; the run stops (its last checkpoint stays in {str(run.out)!r}). Lower --lr, check the data "
            "and any embeddings for non-finite values, or raise --max-nonfinite-steps")


def commit_epoch(run: Run, epoch: int, record: dict) -> None:
    """Select the next epoch, then checkpoint: the epoch's commit point; its log record follows (a resumed run
    rebuilds the log from the checkpoint)."""
    t_select = time.perf_counter()
    run.pruner.next_epoch()
    record["select_seconds"] = round(time.perf_counter() - t_select, 3)
    if run.main:  # the last selection that pruned, for the report's histograms
        record_selection(run.pruner, run.out, run.cfg.epochs)
    save_checkpoint(run, epoch + 1)
    if run.main:
        with open(run.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def save_checkpoint(run: Run, epoch: int, mid_epoch: bool = False) -> None:
    """Write ``checkpoint.pt`` atomically (rank 0), to resume in ``epoch``.  Every rank calls it: it gathers."""
    if mid_epoch:
        run.pruner.sync()  # collective: the saved scores hold every rank's updates
    loader_state = _loader_state(run)
    if not run.main:
        return
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else None}
    _atomic_save({"config": dataclasses.asdict(run.cfg), "dataset": run.dataset, "epoch": epoch, "step": run.step,
                  "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                  "schedule": run.schedule.state_dict(), "scaler": None, "pruner": run.pruner.state_dict(),
                  "loader": loader_state, "history": run.history, "rng": rng}, run.ckpt_path)


def _loader_state(run: Run) -> dict:
    """The loader's state; under several processes with every rank's unreadable files (collective)."""
    state = run.loader.state_dict()
    if run.world > 1 and "bad" in state:
        parts = [None] * run.world
        torch.distributed.all_gather_object(parts, state["bad"])
        state["bad"] = {i: v for part in parts for i, v in part.items()}
    return state


def finish(run: Run, total_s: float) -> dict:
    """The run's summary; rank 0 writes the per-sample table, the suspects, ``summary.json`` and the report."""
    cfg, history, n = run.cfg, run.history, len(run.index)
    summary = {"epochs": cfg.epochs, "final_top1": history[-1]["val_top1"] if history else None,
               "best_top1": max((h["val_top1"] for h in history if h["val_top1"] is not None), default=None),
               "total_seconds": round(total_s, 1),
               "samples_trained": sum(h["samples_trained"] for h in history),
               "visits_saved": 1.0 - sum(h["samples_trained"] for h in history) / max(1, len(history) * n),
               "loader": run.loader_name, "final_top5": history[-1]["val_top5"] if history else None,
               "policy": cfg.policy, "keep_ratio": cfg.keep_ratio, "noise_ratio": cfg.noise_ratio}
    if run.main:
        out = run.out
        table = SampleTable.from_pruner(run.pruner, run.index)
        table.save(out / SAMPLES_FILE)  # what `fastprune report` re-makes the report from
        summary["suspected_noisy"] = write_suspected_noisy(run.pruner, run.index, out / "suspected_noisy.csv")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        selection = SelectionRecord.load(out / SELECTION_FILE) if (out / SELECTION_FILE).is_file() else None
        write_report(history, table, selection, out, log=run.log)
    run.log(format_summary(summary))
    return summary


def _acted_on(record: dict) -> int:
    """Samples the noise decisions act on in an epoch's selection record (older records: those left out)."""
    return sum(record.get(k, 0) for k in ("relabeled", "excluded", "down_weighted")) if "excluded" in record \
        else record["noisy"]


def format_summary(s: dict) -> str:
    top1 = "-" if s["final_top1"] is None else f"{s['final_top1']:.2%}"
    best = "-" if s["best_top1"] is None else f"{s['best_top1']:.2%}"
    return ("| epochs | final top-1 | best top-1 | samples trained | visits saved vs. full | suspected noisy | time |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {s['epochs']} | {top1} | {best} | {s['samples_trained']} | {s['visits_saved']:.1%} | "
            f"{s.get('suspected_noisy', 0)} | {s['total_seconds']:.1f} s |")
