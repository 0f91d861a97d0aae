"""The fused step's error report: what the kernel counted on the device (bad labels and indices, non-finite
rows, duplicate indices), read without stalling the training step, and raised or warned about once.

The device counters only grow (``kernels.common``: a count and the smallest offending value per kind).  What
was already reported is remembered on the host, so a count recorded while a report is on its way is never lost:
not when the report only warns, and not when it raises (then the reported kind's count is taken off the device
counters, and whatever came after the snapshot, or of another kind, stays there for the next report).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .kernels import common as K

_COUNT_SLOTS = tuple(range(K.ERR_LABEL_COUNT, K.ERR_SLOTS, 2))  # each kind's count; its example follows it
_FATAL_SLOTS = (K.ERR_LABEL_COUNT, K.ERR_INDEX_COUNT)  # bad labels and indices always raise


class StepErrors:
    """The report of one pruner's step counters (``counters``: int64[``ERR_SLOTS``] on the pruner's device).

    ``poll()`` looks at a copy on its way to the host (CUDA, ``validate="async"``) without waiting; ``check()``
    reports what is new in a snapshot (by default the counters themselves, a sync on CUDA); ``reset()`` forgets
    everything (a loaded state starts afresh).
    """

    def __init__(self, counters: torch.Tensor, *, num_samples: int, num_classes: int, ignore_index: int,
                 validate: str):
        self.counters = counters
        self.num_samples, self.num_classes, self.ignore_index = num_samples, num_classes, ignore_index
        self.validate = validate
        self._host = torch.zeros(K.ERR_SLOTS, dtype=torch.int64, pin_memory=counters.device.type == "cuda")
        self._event = None  # marks when the copy into ``_host`` is complete
        self._reported = [0] * K.ERR_SLOTS  # counts already reported
        self._dup_warned = False

    def poll(self) -> None:
        """Report what the last copy brought, if it has arrived, and start the next copy (no waiting)."""
        if self.counters.device.type != "cuda" or self.validate != "async":
            return
        if self._event is not None:
            if not self._event.query():
                return
            self.check(self._host)
        self._host.copy_(self.counters, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def new_fatal(self, snapshot: Sequence[int]) -> bool:
        """Whether ``snapshot`` (the counters as a list) holds bad labels or indices not yet reported."""
        return any(snapshot[s] > self._reported[s] for s in _FATAL_SLOTS)

    def reset(self) -> None:
        """Zero the device counters and forget every report."""
        self.counters.zero_()
        self._event = None
        self._reported = [0] * K.ERR_SLOTS

    def check(self, snapshot: torch.Tensor | Sequence[int] | None = None) -> None:
        """Raise or warn for what ``snapshot`` (default: the counters now) holds beyond the last report.

        One error is raised at a time (bad labels, then bad indices, then non-finite rows with ``validate="sync"``);
        its kind's count in the snapshot is taken off the device counters, so that a caller who handles the error
        can go on, and nothing counted after the snapshot, nor another kind, is lost: the next report has it."""
        if snapshot is None:
            snapshot = self.counters if self.counters.device.type == "cpu" else self.counters.cpu()
        c = snapshot.tolist() if isinstance(snapshot, torch.Tensor) else list(snapshot)
        new = {slot: c[slot] - self._reported[slot] for slot in _COUNT_SLOTS}
        if not any(v > 0 for v in new.values()):
            return
        example = {slot + 1: K.example_value(c[slot + 1]) for slot in _COUNT_SLOTS}
        if new[K.ERR_LABEL_COUNT]:
            self._take_off(K.ERR_LABEL_COUNT, c)
            raise ValueError(
                f"labels: value {example[K.ERR_LABEL_VALUE]} is outside [0, {self.num_classes}) and is not "
                f"ignore_index={self.ignore_index} ({new[K.ERR_LABEL_COUNT]} bad rows; they were left out)")
        if new[K.ERR_INDEX_COUNT]:
            self._take_off(K.ERR_INDEX_COUNT, c)
            raise IndexError(
                f"indices: value {example[K.ERR_INDEX_VALUE]} is outside [0, num_samples={self.num_samples}) "
                f"({new[K.ERR_INDEX_COUNT]} bad rows; they were left out)")
        if new[K.ERR_NONFINITE_COUNT]:
            msg = (f"logits: {new[K.ERR_NONFINITE_COUNT]} rows had a non-finite loss (NaN or Inf logits; "
                   f"the first at batch row {example[K.ERR_NONFINITE_ROW]}); their scores were left unchanged "
                   "and the returned loss is non-finite")
            if self.validate == "sync":
                self._take_off(K.ERR_NONFINITE_COUNT, c)
                raise ValueError(msg)
            self._reported[K.ERR_NONFINITE_COUNT] = c[K.ERR_NONFINITE_COUNT]
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        if new[K.ERR_DUP_COUNT]:
            self._reported[K.ERR_DUP_COUNT] = c[K.ERR_DUP_COUNT]
            if not self._dup_warned:
                self._dup_warned = True
                warnings.warn(
                    f"indices: sample {example[K.ERR_DUP_VALUE]} appeared twice in one batch ({c[K.ERR_DUP_COUNT]} "
                    "repeats so far); each sample's score is updated once per step, by its first row",
                    RuntimeWarning, stacklevel=3)

    def _take_off(self, slot: int, snapshot: list[int]) -> None:
        """Before raising about one kind: its device count less the snapshot's (on the device's stream, after every
        step launched so far), its example cleared where nothing is left (where something is, the example stays
        the smallest value since the kind was last clear); the other kinds wait for the next report."""
        count, example = self.counters[slot:slot + 1], self.counters[slot + 1:slot + 2]
        count.sub_(snapshot[slot])
        example.masked_fill_(count == 0, 0)
        self._reported[slot] = 0
        self._event = None  # a copy on its way holds the old count: the next poll starts a new one
