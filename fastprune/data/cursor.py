"""EpochCursor: which samples a loader serves this epoch, and how far it got (resumable)."""

from __future__ import annotations

from typing import Callable

import torch


def _check_shard(pruner, shard_id, num_shards) -> tuple[int, int]:
    if pruner is not None:
        want = (pruner.rank, pruner.world_size)
        if (shard_id, num_shards) not in ((None, None), want):
            raise ValueError(f"shard_id={shard_id}, num_shards={num_shards} disagree with the pruner's rank "
                             f"{want[0]} of {want[1]}; with a pruner the loader follows its shard (leave them unset)")
        return want
    shard_id = 0 if shard_id is None else shard_id
    num_shards = 1 if num_shards is None else num_shards
    for name, v, lo in (("num_shards", num_shards, 1), ("shard_id", shard_id, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if shard_id >= num_shards:
        raise ValueError(f"shard_id={shard_id} must be smaller than num_shards={num_shards}")
    return shard_id, num_shards


class EpochCursor:
    """The order a loader serves and its position in it.

    With a pruner: the pruner's shard for this rank of the current selection.  Without one: every
    sample in index order, or every ``num_shards``-th from ``shard_id`` (evaluation on several
    ranks; shards may differ in length by one).  ``state_dict()`` records the position; a run
    resumed mid-epoch under another world size serves the rest of the epoch's global selection,
    re-sharded (every rank stops at the same position, so the ranks' consumed parts together are a
    prefix of the global order).
    """

    def __init__(self, num_samples: int, pruner=None, shard_id: int | None = None, num_shards: int | None = None):
        self.num_samples, self.pruner = num_samples, pruner
        self.shard_id, self.num_shards = _check_shard(pruner, shard_id, num_shards)
        self.epoch = None  # epoch of the order in progress
        self.position = 0  # samples handed out from that order
        self.start = 0  # where that order starts in the global selection (resume under another world size)
        self.passes = 0  # completed passes without a pruner

    def current(self) -> tuple[int, torch.Tensor]:
        """(epoch, the order this loader serves in it), without moving."""
        if self.pruner is None:
            return self.passes, torch.arange(self.shard_id, self.num_samples, self.num_shards)
        epoch = self.pruner.epoch
        return epoch, self.pruner.shard(self.start if epoch == self.epoch else 0)

    def begin(self, usable: Callable[[torch.Tensor], int] = len) -> tuple[int, torch.Tensor]:
        """Start (or continue) an iteration: a new epoch, or a finished one, starts from the beginning."""
        epoch, order = self.current()
        if epoch != self.epoch or self.position >= usable(order):
            self.epoch, self.position, self.start = epoch, 0, 0
            epoch, order = self.current()
        return epoch, order

    def end_pass(self):
        if self.pruner is None:
            self.passes += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "passes": self.passes, "start": self.start,
                "world_size": self.num_shards if self.pruner is not None else 1}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.position = sd["epoch"], int(sd["position"])
        self.passes, self.start = int(sd.get("passes", 0)), int(sd.get("start", 0))
        world = int(sd.get("world_size", 1))
        if self.pruner is not None and world != self.num_shards and self.position:
            self.start += self.position * world  # the ranks' consumed parts together: a global prefix
            self.position = 0
