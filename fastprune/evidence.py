"""Per-sample evidence that a label is wrong: the model's own margin and CLIP's margin.

The fused step accumulates each sample's margin ``z_y - max_{c != y} z_c`` in the step state
(``SampleState.margin_sum`` / ``margin_count``: the area under the margin, AUM, Pleiss et al. 2020,
is their ratio), with its latest prediction and the label it trained with; this module reads them.
CLIP's margin
``cos(e, t_y) - max_{c != y} cos(e, t_c)`` and its preferred class come from the image embeddings:
computed once, in chunks on the device, for a fixed table; per step for per-batch embeddings.

An atypical but correctly labelled sample has a low cosine to every class yet a positive margin;
a flipped one has a negative margin.  Everything stays on the pruner's device; nothing here
synchronises with the host during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import SampleState
from .kernels.reference import passes

CLIP_CHUNK_ELEMENTS = 1 << 24  # rows x classes of one chunk of the table's similarity product


def margins_and_preferred(sims: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sims[i, y_i] - max_{c != y_i} sims[i, c]`` and the first maximal class of each row.

    One class only: the margin is +inf (no other class to prefer).
    """
    y = labels.to(torch.int64)[:, None]
    own = sims.gather(1, y)[:, 0]
    if sims.shape[1] == 1:
        return torch.full_like(own, float("inf")), torch.zeros_like(own, dtype=torch.int32)
    other = sims.scatter(1, y, float("-inf")).amax(dim=1)
    return own - other, sims.argmax(dim=1).to(torch.int32)


def _unit(x: torch.Tensor, dtype: torch.dtype = torch.float32, eps: float = 1e-8) -> torch.Tensor:
    x = x.to(dtype)
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


@dataclass
class Before:
    """Relabeled samples' label and margins from just before their relabel (-1 and NaN elsewhere): their
    old class's mixture is fitted with them (see ``noise.beliefs``)."""

    label: torch.Tensor  # int32
    model_margin: torch.Tensor  # float32 (the area under the margin then)
    clip_margin: torch.Tensor  # float32

    FIELDS = ("label", "model_margin", "clip_margin")


class Evidence:
    """Per sample: the model's evidence (the step state's margin sum and count, prediction and label)
    and CLIP's margin and preferred class."""

    def __init__(self, state: SampleState):
        n = state.num_samples
        self.state = state
        # One slot past the end takes the writes of rows that update nothing, so that a step needs no
        # host-side filtering; the fields are views without it.
        self._clip_margin = torch.full((n + 1,), float("nan"), dtype=torch.float32, device=state.scores.device)
        self._clip_pred = torch.full((n + 1,), -1, dtype=torch.int32, device=state.scores.device)
        self.num_samples = n
        self.clip_margin = self._clip_margin[:n]
        self.clip_pred = self._clip_pred[:n]
        self.before: Before | None = None  # allocated at the first relabel (12 bytes a sample)

    @property
    def pred(self) -> torch.Tensor:
        return self.state.pred

    @property
    def label(self) -> torch.Tensor:
        return self.state.label

    # ------------------------------------------------------------------ per step

    def _slot(self, indices: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, indices.to(torch.int64), self.num_samples)  # left-out rows: the spare slot

    def record_clip_batch(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                          indices: torch.Tensor, valid: torch.Tensor) -> None:
        """CLIP's margin of this batch's images (per-batch embeddings): the latest view of a sample wins.

        In float64, rounded to float32: a matrix product's last bits may depend on how many rows it has, and
        a sample's margin should not depend on the batch it came in (another world size makes other batches).
        """
        sims = _unit(image_emb, torch.float64) @ _unit(text_emb, torch.float64).T
        margin, preferred = margins_and_preferred(sims, torch.where(valid, labels.to(torch.int64), 0))
        slot = self._slot(indices, valid)
        self._clip_margin.index_put_((slot,), margin.to(torch.float32))
        self._clip_pred.index_put_((slot,), preferred)

    def restart(self, mask: torch.Tensor, new_label: torch.Tensor) -> None:
        """Samples in ``mask`` now train with ``new_label``: their evidence starts again against it, and what it
        was against their old label is kept in ``before``."""
        if self.before is None:
            self.before = self._empty_before()
        model_margin = self.model_margin()
        for lo, hi in passes(self.num_samples, mask.device):
            m = mask[lo:hi]
            b = self.before
            b.label[lo:hi] = torch.where(m, self.label[lo:hi], b.label[lo:hi])
            b.model_margin[lo:hi] = torch.where(m, model_margin[lo:hi], b.model_margin[lo:hi])
            b.clip_margin[lo:hi] = torch.where(m, self.clip_margin[lo:hi], b.clip_margin[lo:hi])
        self.state.margin_sum.masked_fill_(mask, 0.0)
        self.state.margin_count.masked_fill_(mask, 0)
        self.label.copy_(torch.where(mask, new_label, self.label))
        self.clip_margin.masked_fill_(mask, float("nan"))
        self.clip_pred.masked_fill_(mask, -1)

    def _empty_before(self) -> Before:
        n, dev = self.num_samples, self.state.scores.device
        nan = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)
        return Before(torch.full((n,), -1, dtype=torch.int32, device=dev), nan, nan.clone())

    # ------------------------------------------------------------------ fixed table

    def complete_clip_table(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
        """CLIP's margin and preferred class of every scored sample of a fixed table not yet computed:
        each sample once, in chunks of an (n x C) product on the device (synchronises: epoch-level)."""
        todo = torch.nonzero((self.clip_pred < 0) & (self.label >= 0))[:, 0]
        if todo.numel() == 0:
            return
        text = _unit(text_emb)
        chunk = max(1, CLIP_CHUNK_ELEMENTS // text.shape[0])
        for lo in range(0, todo.numel(), chunk):
            rows = todo[lo:lo + chunk]
            margin, preferred = margins_and_preferred(_unit(image_emb[rows]) @ text.T, self.label[rows])
            self.clip_margin[rows] = margin
            self.clip_pred[rows] = preferred

    # ------------------------------------------------------------------ queries

    def model_margin(self) -> torch.Tensor:
        """Area under the margin: the mean margin over a sample's scored visits (NaN where never scored)."""
        total, count = self.state.margin_sum, self.state.margin_count
        out = torch.empty_like(total)
        for lo, hi in passes(total.numel(), total.device):
            c = count[lo:hi].to(torch.float32)
            out[lo:hi] = torch.where(c > 0, total[lo:hi] / c.clamp_min(1.0), float("nan"))
        return out

    # ------------------------------------------------------------------ ranks

    def merge_columns(self, batch_clip: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """What ranks merge (``distributed.merge``): float columns (the margin sum; CLIP's margin with
        per-batch embeddings), counters of the visits (the margin count) and class columns (the model's
        prediction, the label; CLIP's class with per-batch embeddings)."""
        floats = [self.state.margin_sum] + ([self.clip_margin] if batch_clip else [])
        classes = [self.pred, self.label] + ([self.clip_pred] if batch_clip else [])
        return floats, [self.state.margin_count], classes

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        """CLIP's columns (the model's evidence is saved with the step state)."""
        return {"clip_margin": self.clip_margin.clone(), "clip_pred": self.clip_pred.clone()}

    def before_state_dict(self) -> dict | None:
        """The relabeled samples' evidence from before their relabel (None: nothing relabeled yet)."""
        return None if self.before is None else {f: getattr(self.before, f).clone() for f in Before.FIELDS}

    def load_state_dict(self, sd: dict | None, before: dict | None = None) -> None:
        """Restore; ``None`` (a state saved before the evidence existed) starts it empty.  ``before``: what
        ``before_state_dict`` gave (None: nothing kept, e.g. a state saved before it existed)."""
        if sd is None:
            self.clip_margin.fill_(float("nan"))
            self.clip_pred.fill_(-1)
        else:
            self.clip_margin.copy_(sd["clip_margin"])
            self.clip_pred.copy_(sd["clip_pred"])
        self.before = None
        if before is not None:
            self.before = self._empty_before()
            for f in Before.FIELDS:
                getattr(self.before, f).copy_(before[f])
