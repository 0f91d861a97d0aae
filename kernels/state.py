"""The per-sample state the fused step reads and writes, as one bundle.

Every implementation of the step (the Triton kernel, its PyTorch reference, the
ahead-of-time build) and its callers take a ``SampleState``; the list of fields
lives here once (``FIELDS``), so that a new per-sample signal is one entry here
plus the lines that compute it, not a new argument threaded through each of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from . import common as K


@dataclass(frozen=True)
class Field:
    """One per-sample column: its dtype, its value before any step, and what it holds."""

    name: str
    dtype: torch.dtype
    empty: float
    doc: str


FIELDS = (
    Field("scores", torch.float32, 0.0, "EMA of the sample's loss (its first visit sets it)"),
    Field("visits", torch.int32, 0, "steps that scored the sample"),
    Field("consistency", torch.float32, 0.0, "cosine of its CLIP image embedding with its label's text"),
    Field("weights", torch.float32, 1.0, "its loss weight this epoch (read by the step, set by selection)"),
    Field("stamp", torch.int32, -1, "id of the step that last scored it (tells a batch's rows apart)"),
    Field("margin_sum", torch.float32, 0.0, "sum of its margins z_y - max_{c != y} z_c over scored visits"),
    Field("margin_count", torch.int32, 0, "visits in margin_sum (restarts when the sample is relabeled)"),
    Field("pred", torch.int32, -1, "the model's class at its latest scored visit"),
    Field("label", torch.int32, -1, "the label its latest scored visit trained with"),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)


@dataclass
class SampleState:
    """The step's state: one length-N tensor per ``FIELDS`` entry, plus the step's device counters
    (``errors``: int64[ERR_SLOTS], see ``common``; ``dups``: the duplicate-row count between the step's
    two launches, zero between steps).  All on one device."""

    scores: torch.Tensor
    visits: torch.Tensor
    consistency: torch.Tensor
    weights: torch.Tensor
    stamp: torch.Tensor
    margin_sum: torch.Tensor
    margin_count: torch.Tensor
    pred: torch.Tensor
    label: torch.Tensor
    errors: torch.Tensor
    dups: torch.Tensor

    @classmethod
    def empty(cls, num_samples: int, device: torch.device | str = "cpu") -> SampleState:
        """Every field at its value before any step; counters zeroed."""
        cols = {f.name: torch.full((num_samples,), f.empty, dtype=f.dtype, device=device) for f in FIELDS}
        return cls(**cols, errors=torch.zeros(K.ERR_SLOTS, dtype=torch.int64, device=device),
                   dups=torch.zeros(1, dtype=torch.int32, device=device))

    @property
    def num_samples(self) -> int:
        return self.scores.numel()

    def columns(self) -> dict[str, torch.Tensor]:
        """The per-sample tensors by name, in ``FIELDS`` order (the kernel's argument order)."""
        return {name: getattr(self, name) for name in FIELD_NAMES}

    def clone(self) -> SampleState:
        return SampleState(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def to(self, device: torch.device | str) -> SampleState:
        """A copy on ``device``."""
        return SampleState(**{f.name: getattr(self, f.name).to(device, copy=True) for f in fields(self)})

    def check(self) -> None:
        """Raise if a field has the wrong dtype, length or device (the kernels trust them)."""
        n, dev = self.num_samples, self.scores.device
        for f in FIELDS:
            t = getattr(self, f.name)
            if t.dtype != f.dtype or t.shape != (n,) or t.device != dev or not t.is_contiguous():
                raise ValueError(f"SampleState.{f.name} must be a contiguous {f.dtype} tensor of shape ({n},) on "
                                 f"{dev}, got {t.dtype} {tuple(t.shape)} on {t.device}")
        if self.errors.dtype != torch.int64 or self.errors.shape != (K.ERR_SLOTS,) or self.errors.device != dev:
            raise ValueError(f"SampleState.errors must be int64[{K.ERR_SLOTS}] on {dev}")
        if self.dups.dtype != torch.int32 or self.dups.shape != (1,) or self.dups.device != dev:
            raise ValueError(f"SampleState.dups must be int32[1] on {dev}")
