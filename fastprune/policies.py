"""Which selection policy applies in which epoch, and how many samples it keeps.

The policies themselves run on the device (``fastprune.kernels.selection``, with the Triton passes of
``fastprune.kernels.select`` on CUDA); this
module holds the schedule around them: warm-up and annealing epochs train on
the full (noise-filtered) set, the others use the chosen policy.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("infobatch", "topk", "random", "full")


@dataclass(frozen=True)
class Schedule:
    """Warm-up / pruning / annealing phases over ``epochs`` epochs."""

    policy: str
    epochs: int
    warmup: int
    anneal: float

    @property
    def anneal_start(self) -> int:
        """First epoch of the annealing phase (the last ``round(anneal * epochs)`` epochs)."""
        return self.epochs - int(round(self.anneal * self.epochs))

    def policy_for(self, epoch: int) -> str:
        """The policy that builds ``epoch``'s selection (epochs past the schedule train in full)."""
        if epoch < self.warmup or epoch >= self.anneal_start:
            return "full"
        return self.policy

    def expected_kept(self, epoch: int, num_samples: int, keep_ratio: float) -> int:
        """Expected number of samples trained in ``epoch`` before any noise filtering."""
        if self.policy_for(epoch) == "full":
            return num_samples
        return int(round(keep_ratio * num_samples))
