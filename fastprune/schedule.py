"""Learning-rate schedules over samples actually trained, so they follow the shrinking epochs."""

from __future__ import annotations

import math


class SampleSchedule:
    """Linear warm-up, then cosine or step decay, as a function of training progress.

    Progress is ``samples trained / samples the whole run will train``.  The denominator is
    re-estimated at every epoch start from the pruner (exact for epochs already selected,
    expected for the rest), so a pruned run reaches the end of its schedule when it really ends
    rather than at the epoch count a full run would have.
    """

    def __init__(self, base_lr: float, kind: str = "cosine", warmup: float = 0.05, final_lr: float = 0.0,
                 milestones=(0.5, 0.75), gamma: float = 0.1):
        if kind not in ("cosine", "step", "constant"):
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
