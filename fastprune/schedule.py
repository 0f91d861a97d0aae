"""Learning-rate schedules over samples actually trained, so they follow the shrinking epochs."""

from __future__ import annotations

import math
import warnings

import torch

SCHEDULES = ("cosine", "step", "constant")


class SampleSchedule:
    """Linear warm-up, then cosine or step decay, as a function of training progress.

    Progress is ``samples trained / samples the whole run will train``.  The denominator is
    re-estimated at every epoch start from the pruner (exact for epochs already selected,
    expected for the rest), so a pruned run reaches the end of its schedule when it really ends
    rather than at the epoch count a full run would have.
    """

    def __init__(self, base_lr: float, kind: str = "cosine", warmup: float = 0.05, final_lr: float = 0.0,
                 milestones=(0.5, 0.75), gamma: float = 0.1):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {kind!r}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"lr warm-up must be a fraction of training in [0, 1), got {warmup!r}")
        self.base_lr, self.kind, self.warmup, self.final_lr = base_lr, kind, warmup, final_lr
        self.milestones, self.gamma = tuple(milestones), gamma
        self.samples_done = 0
        self.total_samples = 1

    def lr(self) -> float:
        t = min(1.0, self.samples_done / max(1, self.total_samples))
        if t < self.warmup:
            return self.base_lr * (t + 1e-8) / self.warmup
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "step":
            return self.base_lr * self.gamma ** sum(t >= m for m in self.milestones)
        u = (t - self.warmup) / max(1e-8, 1.0 - self.warmup)
        return self.final_lr + 0.5 * (self.base_lr - self.final_lr) * (1.0 + math.cos(math.pi * u))

    def set_total(self, total_samples: int):
        self.total_samples = max(1, int(total_samples))

    def advance(self, samples: int, optimizer) -> float:
        """Count ``samples`` trained and set the optimizer's learning rate for the next step."""
        self.samples_done += int(samples)
        lr = self.lr()
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"samples_done": self.samples_done, "total_samples": self.total_samples}

    def load_state_dict(self, sd: dict):
        self.samples_done = int(sd["samples_done"])
        self.total_samples = int(sd["total_samples"])


def expected_total_samples(pruner) -> int:
    """Samples the whole run will train: exact for selected epochs, expected for the rest."""
    return sum(pruner.steps_per_epoch(1, epoch=e) for e in range(pruner.epochs))


class ProgressScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Steps a per-step PyTorch scheduler by the pruned run's progress, so that it ends when the run ends.

    A scheduler such as ``OneCycleLR(total_steps=T)`` or ``CosineAnnealingLR(T_max=T)`` assumes the run takes
    exactly ``T`` steps; a pruned run's length is only known as it goes (later epochs' sizes are expected
    values, and infobatch's random drops keep a few samples more or fewer).  ``OneCycleLR`` raises past ``T``
    steps, a cosine rises again, and a run shorter than ``T`` stops before the schedule's end.

    Build the scheduler as usual for ``length = pruner.total_steps(batch_size)`` steps, wrap it, and call
    ``step()`` after every optimizer step.  Each call moves the wrapped scheduler to
    ``(length - 1) * done // (total - 1)`` of its own steps, where ``done = pruner.step_count`` (batches
    trained, restored with the pruner's state) and ``total`` is ``pruner.total_steps(batch_size)``
    re-estimated whenever a new epoch has been selected (exact once the last epoch is): the first batch trains
    with the schedule's first learning rate and the last batch with its last (step ``length - 1``, as in a
    plain run).  It never moves back, and batches past the plan keep the last rate (``OneCycleLR`` would raise
    there, a cosine would come back up).  When the run takes exactly ``length`` batches, every batch gets the
    plain scheduler's value.  Progress is read from the
    pruner, not counted in calls: calling ``step()`` more often is harmless (Accelerate's prepared scheduler
    steps once per process), and a scheduler rebuilt on resume starts where the pruner is.

    Args:
        scheduler: a scheduler stepped once per optimizer step (any ``LRScheduler``).
        pruner: the ``DynamicPruner`` whose ``step()`` computes the training loss.
        batch_size: this rank's batch size (the loader's).
        length: the steps ``scheduler`` was built for; read from ``OneCycleLR.total_steps`` or
            ``CosineAnnealingLR.T_max`` when not given.  With gradient accumulation over ``k`` batches, build
            it for ``pruner.total_steps(batch_size) // k`` optimizer steps: progress is a fraction either way.
        drop_last: whether the loader drops each epoch's last partial batch.
    """

    def __init__(self, scheduler, pruner, batch_size: int, length: int | None = None, drop_last: bool = False):
        if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            raise ValueError("scheduler must be a torch.optim.lr_scheduler.LRScheduler, "
                             f"got {type(scheduler).__name__}")
        if length is None:
            length = getattr(scheduler, "total_steps", None) or getattr(scheduler, "T_max", None)
            if length is None:
                raise ValueError(f"length: give the number of steps {type(scheduler).__name__} was built for")
        for name, value in (("length", length), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.scheduler, self.pruner, self.length = scheduler, pruner, length
        self.batch_size, self.drop_last = batch_size, bool(drop_last)
        self._total = None
        self._estimated_at = None  # the pruner epoch whose selection the estimate includes
        super().__init__(scheduler.optimizer)

    def run_steps(self) -> int:
        """The batches the whole run trains on this rank: exact for the epochs selected so far, expected after."""
        if self._estimated_at != self.pruner.epoch:
            self._total = self.pruner.total_steps(self.batch_size, self.drop_last)
            self._estimated_at = self.pruner.epoch
        return max(1, self._total)

    def get_lr(self) -> list:
        target = min(self.length - 1, (self.length - 1) * self.pruner.step_count // max(1, self.run_steps() - 1))
        if self.scheduler.last_epoch < target:
            with warnings.catch_warnings():  # catching up on resume, before the first optimizer step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                while self.scheduler.last_epoch < target:
                    self.scheduler.step()
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count, "_last_lr": self._last_lr,
                "base_lrs": self.base_lrs, "length": self.length, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        self.scheduler.load_state_dict(state.pop("scheduler"))
        self.__dict__.update(state)
        self._estimated_at = None
