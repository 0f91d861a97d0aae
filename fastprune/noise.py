"""Decisions on likely wrong labels, per class and found from the data.

Each source of evidence (the model's area under the margin, CLIP's margin) is split per class by a
two-component one-dimensional Gaussian mixture (as DivideMix and CLIPCleaner split losses): the
posterior of the lower component is the source's belief that a label is wrong.  A source only ever
suspects a sample whose margin is negative, i.e. that prefers another class: an atypical but correct
sample (low cosine to every class, hard for the model) keeps a positive margin and is never touched.
With both sources, a sample is suspected only where both point away from its label: the belief is the
smaller of the two.

What happens to a suspected sample (belief > 0.5):

* **relabel** (opt-in) — belief >= ``exclude_above`` and both sources agree on the same other class: it
  trains with that class.  Off by default: on the noise benchmark the agreed class was right for ~90% of
  the relabeled digits, and the wrong tenth cost more accuracy than leaving them all out (BENCHMARKS.md);
* **exclude** — belief >= ``exclude_above`` and no relabel: it leaves the selection;
* **down-weight** — otherwise (unsure): its loss weight becomes ``1 - belief``.

Nothing is flagged where the evidence is weak: a class whose evidence has no separate negative mode
(Ashman's D <= 2, or a lower mean >= 0) gives beliefs of zero, and a suspect must also lie three standard
deviations below the class's upper (clean) component.  ``max_fraction`` caps the suspected count (the most
suspected first).
Every step is a device tensor operation over N; no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KEEP, DOWNWEIGHT, EXCLUDE, RELABEL = 0, 1, 2, 3
ACTION_NAMES = {KEEP: "keep", DOWNWEIGHT: "down-weight", EXCLUDE: "exclude", RELABEL: "relabel"}
EVIDENCE = ("auto", "model", "clip", "both")
EM_ITERATIONS = 40
MIN_PER_CLASS = 8  # fewer samples with evidence in a class: no mixture, no suspicion
SEPARATION = 2.0  # Ashman's D above which two Gaussian components form two modes
OUTLIER_SD = 3.0  # a suspect lies this many of the upper component's standard deviations below its mean


@dataclass
class NoiseDecision:
    """Per sample: belief that the label is wrong, action, class to train with (-1: its own).
    A down-weighted sample's loss weight is ``1 - belief``."""

    belief: torch.Tensor  # float32, 0 where there is no evidence
    action: torch.Tensor  # int8: KEEP, DOWNWEIGHT, EXCLUDE or RELABEL
    new_label: torch.Tensor  # int32

    def counts(self) -> torch.Tensor:
        """Samples per action (int64, indexed by the action codes), on the device."""
        return torch.bincount(self.action.to(torch.int64), minlength=4)


def _per_class_sum(values: torch.Tensor, cls: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.zeros(num_classes, dtype=values.dtype, device=values.device).index_add_(0, cls, values)


def _log_normal(x, mu, var):
    return -0.5 * ((x - mu) ** 2 / var + torch.log(2 * math.pi * var))


def mixture_belief(x: torch.Tensor, cls: torch.Tensor, valid: torch.Tensor, num_classes: int,
                   iterations: int = EM_ITERATIONS) -> torch.Tensor:
    """Per-class two-component Gaussian mixture on ``x``: posterior of the lower component, and 0 where
    ``x >= 0`` (no preference for another class), where ``valid`` is false, in classes with fewer than
    ``MIN_PER_CLASS`` valid samples or without a separate negative mode, and above ``OUTLIER_SD`` standard
    deviations under the upper component's mean.  Float64 sums, so the result does not depend on N's size."""
    xv = torch.where(valid, x, 0.0).to(torch.float64)
    c = torch.where(valid, cls.to(torch.int64), 0)
    w = valid.to(torch.float64)
    n = _per_class_sum(w, c, num_classes)
    n1 = n.clamp_min(1.0)
    mean = _per_class_sum(xv * w, c, num_classes) / n1
    var = _per_class_sum((xv - mean[c]) ** 2 * w, c, num_classes) / n1
    floor = 1e-4 * var.clamp_min(1e-12) + 1e-8
    sd = var.sqrt()
    mu_lo, mu_hi = mean - sd, mean + sd
    var_lo = var_hi = var + floor
    pi_lo = torch.full_like(mean, 0.5)

    def responsibility():  # of the lower component
        a = torch.log(pi_lo.clamp_min(1e-12))[c] + _log_normal(xv, mu_lo[c], var_lo[c])
        b = torch.log((1 - pi_lo).clamp_min(1e-12))[c] + _log_normal(xv, mu_hi[c], var_hi[c])
        return torch.sigmoid(a - b) * w

    for _ in range(iterations):
        r = responsibility()
        n_lo = _per_class_sum(r, c, num_classes)
        n_hi = n - n_lo
        mu_lo = _per_class_sum(r * xv, c, num_classes) / n_lo.clamp_min(1e-12)
        mu_hi = _per_class_sum((w - r) * xv, c, num_classes) / n_hi.clamp_min(1e-12)
        var_lo = _per_class_sum(r * (xv - mu_lo[c]) ** 2, c, num_classes) / n_lo.clamp_min(1e-12) + floor
        var_hi = _per_class_sum((w - r) * (xv - mu_hi[c]) ** 2, c, num_classes) / n_hi.clamp_min(1e-12) + floor
        pi_lo = n_lo / n1
        swap = mu_lo > mu_hi  # keep "lower" the lower one
        mu_lo, mu_hi = torch.where(swap, mu_hi, mu_lo), torch.where(swap, mu_lo, mu_hi)
        var_lo, var_hi = torch.where(swap, var_hi, var_lo), torch.where(swap, var_lo, var_hi)
        pi_lo = torch.where(swap, 1 - pi_lo, pi_lo)
    r = responsibility()  # from the final, ordered components
    # A class has a mode of wrong labels only if its mixture is bimodal: components apart by more than
    # SEPARATION (Ashman's D) and the lower one on the wrong side of zero.  Otherwise nothing is suspected.
    separation = math.sqrt(2.0) * (mu_hi - mu_lo) / (var_lo + var_hi).sqrt()
    bimodal = (separation > SEPARATION) & (mu_lo < 0)
    enough = ((n >= MIN_PER_CLASS) & bimodal)[c]
    outlier = xv < (mu_hi - OUTLIER_SD * var_hi.sqrt())[c]  # far below what the class's clean samples show
    return torch.where(valid & enough & (x < 0) & outlier, r.to(torch.float32), 0.0)


def _seen(label: torch.Tensor, settled: torch.Tensor | None) -> torch.Tensor:
    seen = label >= 0
    return seen if settled is None else seen & ~settled


def beliefs(label: torch.Tensor, model_margin: torch.Tensor | None, clip_margin: torch.Tensor | None,
            num_classes: int, settled: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample, the belief that its label is wrong from the evidence given (None: not used): each
    source's per-class mixture belief, and with both the smaller (every source must point away).

    The only part of a decision whose per-class sums may differ in their last bits between devices that
    sum in different orders (atomics); ``act`` is elementwise and exact, so ranks share only this.
    """
    seen, belief = _seen(label, settled), None
    for margin in (model_margin, clip_margin):
        if margin is not None:
            b = mixture_belief(margin, label, seen & torch.isfinite(margin), num_classes)
            belief = b if belief is None else torch.minimum(belief, b)
    return belief if belief is not None else torch.zeros(label.numel(), dtype=torch.float32, device=label.device)


def act(belief: torch.Tensor, label: torch.Tensor, model_margin: torch.Tensor | None,
        model_pred: torch.Tensor | None, clip_margin: torch.Tensor | None, clip_pred: torch.Tensor | None,
        max_fraction: float = 1.0, exclude_above: float = 0.9, relabel: bool = False,
        settled: torch.Tensor | None = None) -> NoiseDecision:
    """Action and class for every sample from its ``belief`` (see ``decide``)."""
    n, dev = label.numel(), label.device
    seen = _seen(label, settled)
    pull = torch.zeros(n, dtype=torch.float64, device=dev)
    for margin in (model_margin, clip_margin):
        if margin is not None:  # how far the margins point away
            pull -= torch.where(seen & torch.isfinite(margin), margin, 0.0).to(torch.float64)
    suspect = belief > 0.5
    cap = int(math.floor(max_fraction * n))
    if cap < n:  # the most suspected first; equal beliefs (saturated at 1) by how far the margins point away
        key = torch.where(suspect, belief.to(torch.float64) + 1e-6 * torch.sigmoid(pull), -1.0)
        top = torch.zeros(n, dtype=torch.bool, device=dev)
        if cap > 0:
            top[torch.topk(key, cap).indices] = True
        suspect = suspect & top
    agreed = torch.zeros(n, dtype=torch.bool, device=dev)
    new_label = torch.full((n,), -1, dtype=torch.int32, device=dev)
    if relabel and model_pred is not None and clip_pred is not None:
        agreed = (model_pred == clip_pred) & (model_pred >= 0) & (model_pred != label)
        new_label = torch.where(suspect & agreed, model_pred, new_label)
    sure = suspect & (belief >= exclude_above)
    relabel = sure & agreed
    exclude = sure & ~agreed
    down = suspect & ~relabel & ~exclude
    action = torch.full((n,), KEEP, dtype=torch.int8, device=dev)
    action = torch.where(down, DOWNWEIGHT, action).to(torch.int8)
    action = torch.where(exclude, EXCLUDE, action).to(torch.int8)
    action = torch.where(relabel, RELABEL, action).to(torch.int8)
    return NoiseDecision(belief=belief, action=action, new_label=new_label)


def decide(label: torch.Tensor, model_margin: torch.Tensor | None, model_pred: torch.Tensor | None,
           clip_margin: torch.Tensor | None, clip_pred: torch.Tensor | None, num_classes: int,
           max_fraction: float = 1.0, exclude_above: float = 0.9, relabel: bool = False,
           settled: torch.Tensor | None = None) -> NoiseDecision:
    """Belief, action, class and weight for every sample from the evidence given (None: not used):
    ``act(beliefs(...), ...)``.

    ``label`` is the class each sample trains with (-1: never scored, no decision).  ``relabel``: give
    the agreed class to sure suspects instead of leaving them out.  ``settled`` (bool N) marks samples whose
    decision stands (relabeled ones): they are neither judged nor part of a class's mixture, because their
    evidence restarted against the new class and is younger than everyone else's (a few late, confident
    visits beside margins averaged since the first epoch): mixed in, they become the class's upper
    component and hide the remaining wrong labels.
    """
    belief = beliefs(label, model_margin, clip_margin, num_classes, settled)
    return act(belief, label, model_margin, model_pred, clip_margin, clip_pred, max_fraction, exclude_above,
               relabel, settled)
