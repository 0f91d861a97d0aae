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
  trains with that class.  Its evidence from before stays in its old class's mixture (``beliefs``).  Off by
  default: on the noise benchmark the agreed class was right for ~95% of the relabeled digits, but the
  accuracy gained over leaving them out is not resolved (BENCHMARKS.md);
* **exclude** — belief >= ``exclude_above`` and no relabel: it leaves the selection;
* **down-weight** — otherwise (unsure): its loss weight becomes ``1 - belief``.

Nothing is flagged where the evidence is weak: a class whose evidence has no separate negative mode
(Ashman's D <= 2, or a lower mean >= 0) gives beliefs of zero, and a suspect must also lie three standard
deviations below the class's upper (clean) component.  ``max_fraction`` caps the suspected count (the most
suspected first).

Each class's mixture is fitted to a histogram of its evidence (``BINS`` bins over the class's range): a
few O(N) passes whose results (a minimum, a maximum, integer counts) no device's order of addition changes,
then the EM on C x ``BINS`` numbers (one kernel launch on a GPU: ``kernels/mixture.py``), then each sample's
belief at its exact value.  Ranks share the fitted
mixtures (O(C) numbers), not per-sample beliefs.  Every step is a device tensor operation; no host
synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernels.reference import passes
from .kernels.selection import smallest

KEEP, DOWNWEIGHT, EXCLUDE, RELABEL = 0, 1, 2, 3
ACTION_NAMES = {KEEP: "keep", DOWNWEIGHT: "down-weight", EXCLUDE: "exclude", RELABEL: "relabel"}
EVIDENCE = ("auto", "model", "clip", "both")
EM_ITERATIONS = 40
BINS = 256  # per class: the mixture is fitted to a histogram of the class's evidence
MIN_PER_CLASS = 8  # fewer samples with evidence in a class: no mixture, no suspicion
SEPARATION = 2.0  # Ashman's D above which two Gaussian components form two modes
OUTLIER_SD = 3.0  # a suspect lies this many of the upper component's standard deviations below its mean
SUSPECT_ABOVE = 0.5  # a belief above this is suspected
EXCLUDE_ABOVE = 0.9  # a suspect's belief from which it is left out (or relabeled), not down-weighted


@dataclass
class NoiseDecision:
    """Per sample: belief that the label is wrong, action, class to train with (-1: its own).
    A down-weighted sample's loss weight is ``1 - belief``."""

    belief: torch.Tensor  # float32, 0 where there is no evidence
    action: torch.Tensor  # int8: KEEP, DOWNWEIGHT, EXCLUDE or RELABEL
    new_label: torch.Tensor  # int32

    def counts(self) -> torch.Tensor:
        """Samples per action (int64, indexed by the action codes), on the device."""
        return action_counts(self.action)


def action_counts(action: torch.Tensor) -> torch.Tensor:
    """Samples per action code (int64, 4), on the device: a pass at a time (a bincount of the whole column
    would first widen it to int64, 8 bytes a sample)."""
    counts = torch.zeros(4, dtype=torch.int64, device=action.device)
    for a, b in passes(action.numel(), action.device):
        counts += torch.bincount(action[a:b].to(torch.int64), minlength=4)
    return counts


def class_histograms(x: torch.Tensor, cls: torch.Tensor, valid: torch.Tensor, num_classes: int,
                     bins: int = BINS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class, ``bins`` equal-width bins between the class's smallest and largest valid (and finite) value:
    the counts (int64, C x bins), the bin centres (float64, C x bins) and each class's valid count.  Two
    reductions that any order gives exactly (minimum, maximum) and integer counts: the same on every rank, and
    whatever the passes (``kernels.reference.passes``)."""
    dev = x.device
    lo = torch.full((num_classes,), float("inf"), dtype=torch.float64, device=dev)
    hi = torch.full((num_classes,), float("-inf"), dtype=torch.float64, device=dev)
    for a, b in passes(x.numel(), dev):
        v = valid[a:b] & torch.isfinite(x[a:b])
        c = torch.where(v, cls[a:b].to(torch.int64), 0)
        xv = x[a:b].to(torch.float64)
        lo.scatter_reduce_(0, c, torch.where(v, xv, float("inf")), "amin")
        hi.scatter_reduce_(0, c, torch.where(v, xv, float("-inf")), "amax")
    width = torch.where(hi > lo, (hi - lo) / bins, 1.0)
    lo = torch.where(torch.isfinite(lo), lo, 0.0)
    counts = torch.zeros(num_classes * bins + 1, dtype=torch.int64, device=dev)  # + a spare bin for the invalid
    for a, b in passes(x.numel(), dev):
        v = valid[a:b] & torch.isfinite(x[a:b])
        c = torch.where(v, cls[a:b].to(torch.int64), 0)
        xv = torch.where(v, x[a:b], 0.0).to(torch.float64)
        k = ((xv - lo[c]) / width[c]).floor().clamp_(0, bins - 1).to(torch.int64)
        counts += torch.bincount(torch.where(v, c * bins + k, num_classes * bins), minlength=counts.numel())
    counts = counts[:-1].view(num_classes, bins)
    centres = lo[:, None] + (torch.arange(bins, dtype=torch.float64, device=dev) + 0.5) * width[:, None]
    return counts, centres, counts.sum(1)


def fit_mixtures(x: torch.Tensor, cls: torch.Tensor, valid: torch.Tensor, num_classes: int,
                 iterations: int = EM_ITERATIONS) -> torch.Tensor:
    """Per class, a two-component Gaussian mixture fitted to the histogram of ``x[valid]`` (finite values)
    (``class_histograms``: ``BINS`` bins span the class's range, a small fraction of a component's spread):
    float64 rows ``MIXTURE_ROWS`` x C.  O(N) work in a few passes whatever the iterations; ``usable`` is 1
    where the class has ``MIN_PER_CLASS`` samples and a separate negative mode (bimodal: components apart by
    more than ``SEPARATION``, Ashman's D, and the lower one below zero), else 0: nothing is suspected there."""
    counts, centres, n = class_histograms(x, cls, valid, num_classes)
    w = counts.to(torch.float64)
    n1 = n.to(torch.float64).clamp_min(1.0)
    if x.is_cuda:  # one launch for every class and iteration
        from .kernels.mixture import em_triton

        mu_lo, mu_hi, var_lo, var_hi, pi_lo = em_triton(centres, w, n1, iterations)
    else:
        rows = _EM_ROWS.get(x.device.type, num_classes)
        fitted = [_em(centres[lo:lo + rows], w[lo:lo + rows], n1[lo:lo + rows], iterations)
                  for lo in range(0, num_classes, rows)]
        mu_lo, mu_hi, var_lo, var_hi, pi_lo = (torch.cat(part) for part in zip(*fitted, strict=True))
    separation = math.sqrt(2.0) * (mu_hi - mu_lo) / (var_lo + var_hi).sqrt()
    usable = (n >= MIN_PER_CLASS) & (separation > SEPARATION) & (mu_lo < 0)
    return torch.stack([mu_lo, mu_hi, var_lo, var_hi, pi_lo, usable.to(torch.float64)])


MIXTURE_ROWS = 6  # fit_mixtures' rows: mu_lo, mu_hi, var_lo, var_hi, pi_lo, usable

# Classes per EM block on the CPU: each iteration is a dozen operations over a block's rows x BINS, so blocks
# as large as this keep the operations few (1000 classes: 63 ms for 40 iterations, as fast as one block of
# 1024 and 2.4x faster than blocks of 128) and the temporaries bounded (~12 MB, half a block of 1024's); each
# row's arithmetic is the same whatever the block.  Elsewhere all classes at once.
_EM_ROWS = {"cpu": 512}


def _em(centres, w, n1, iterations: int):
    """EM for the two-component mixtures of histogram rows ``w`` at bin ``centres``; (mu_lo, mu_hi, var_lo,
    var_hi, pi_lo) per row, the lower component kept the lower.  Each iteration: every bin's share of the lower
    component from its log-odds (``log_odds_coefficients``), then each component's weighted count, sum and sum
    of squares (``kernels/mixture.py`` runs the same arithmetic)."""
    mean = (w * centres).sum(1) / n1
    var = (w * (centres - mean[:, None]) ** 2).sum(1) / n1
    floor = 1e-4 * var.clamp_min(1e-12) + 1e-8
    sd = var.sqrt()
    mu_lo, mu_hi = mean - sd, mean + sd
    var_lo = var_hi = var + floor
    pi_lo = torch.full_like(mean, 0.5)
    powers = torch.stack([torch.ones_like(centres), centres, centres * centres], dim=2)  # rows x bins x 3
    for _ in range(iterations):
        a, b, c = log_odds_coefficients(mu_lo, mu_hi, var_lo, var_hi, pi_lo)
        r = torch.sigmoid(torch.addcmul(b[:, None], a[:, None], centres).mul_(centres).add_(c[:, None])).mul_(w)
        lo = torch.bmm(r[:, None, :], powers)[:, 0]  # per row: count, sum, sum of squares
        hi = torch.bmm((w - r)[:, None, :], powers)[:, 0]
        mu_lo, var_lo = _moments(lo, floor)
        mu_hi, var_hi = _moments(hi, floor)
        pi_lo = lo[:, 0] / n1
        swap = mu_lo > mu_hi  # keep "lower" the lower one
        mu_lo, mu_hi = torch.where(swap, mu_hi, mu_lo), torch.where(swap, mu_lo, mu_hi)
        var_lo, var_hi = torch.where(swap, var_hi, var_lo), torch.where(swap, var_lo, var_hi)
        pi_lo = torch.where(swap, 1 - pi_lo, pi_lo)
    return mu_lo, mu_hi, var_lo, var_hi, pi_lo


def _moments(m, floor):
    """Mean and variance (plus ``floor``) of a component from its count, sum and sum of squares (rows x 3)."""
    count = m[:, 0].clamp_min(1e-12)
    mu = m[:, 1] / count
    var = (m[:, 2] - 2 * mu * m[:, 1] + mu * mu * m[:, 0]) / count
    return mu, var.clamp_min(0.0) + floor


def log_odds_coefficients(mu_lo, mu_hi, var_lo, var_hi, pi_lo):
    """(a, b, c) per row: the log-odds of the lower component at x is ``(a x + b) x + c``."""
    pi = pi_lo.clamp(1e-12, 1 - 1e-12)
    a = -0.5 * (1.0 / var_lo - 1.0 / var_hi)
    b = mu_lo / var_lo - mu_hi / var_hi
    c = (torch.log(pi) - torch.log(1 - pi) - 0.5 * (mu_lo * mu_lo / var_lo - mu_hi * mu_hi / var_hi)
         - 0.5 * torch.log(var_lo / var_hi))
    return a, b, c


def posterior_coefficients(mixtures: torch.Tensor) -> torch.Tensor:
    """Per class, what a sample's belief needs (float64, 4 x C): the log-odds of the lower component as a
    quadratic in the evidence x, ``(a x + b) x + c``, and the bound ``x`` must lie below to be suspected
    (below zero and ``OUTLIER_SD`` standard deviations under the upper component's mean; -inf in unusable
    classes).  O(C) work, so the per-sample pass is a few gathers, a comparison and one exponential."""
    mu_lo, mu_hi, var_lo, var_hi, pi_lo, usable = mixtures
    a, b, c = log_odds_coefficients(mu_lo, mu_hi, var_lo, var_hi, pi_lo)
    bound = torch.minimum(mu_hi - OUTLIER_SD * var_hi.sqrt(), torch.zeros_like(mu_hi))
    bound = torch.where(usable > 0, bound, float("-inf"))
    return torch.stack([a, b, c, bound])


def mixture_posterior(x: torch.Tensor, cls: torch.Tensor, valid: torch.Tensor, mixtures: torch.Tensor,
                      at_most: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's belief from its class's mixture (``fit_mixtures``), at its exact value: the posterior of
    the lower component, and 0 where ``x >= 0`` (no preference for another class), where ``valid`` is false
    or ``x`` is not finite, in unusable classes, and above ``OUTLIER_SD`` standard deviations under the upper
    component's mean.  Elementwise (float32 N): the same on every rank given the same mixtures, whatever the
    passes.  With ``at_most`` (float32 N), the smaller of it and the belief, written into it; else written
    into ``out`` (float32 N) when given."""
    a, b, c, bound = posterior_coefficients(mixtures)
    if at_most is not None:
        out = at_most
    elif out is None:
        out = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
    for lo, hi in passes(x.numel(), x.device):
        xs = x[lo:hi]
        v = valid[lo:hi] & torch.isfinite(xs)
        k = torch.where(v, cls[lo:hi].to(torch.int64), 0)
        xv = torch.where(v, xs, 0.0).to(torch.float64)
        r = torch.sigmoid((a[k] * xv + b[k]) * xv + c[k])
        r = torch.where(v & (xv < bound[k]), r.to(torch.float32), 0.0)
        out[lo:hi] = r if at_most is None else torch.minimum(out[lo:hi], r)
    return out


def _seen(label: torch.Tensor, settled: torch.Tensor | None) -> torch.Tensor:
    seen = label >= 0
    return seen if settled is None else seen & ~settled


def beliefs(label: torch.Tensor, model_margin: torch.Tensor | None, clip_margin: torch.Tensor | None,
            num_classes: int, settled: torch.Tensor | None = None, share=None,
            out: torch.Tensor | None = None, before=None) -> torch.Tensor:
    """Per sample, the belief that its label is wrong from the evidence given (None: not used): each
    source's per-class mixture belief, and with both the smaller (every source must point away).  Written
    into ``out`` (float32 N) when given.

    ``before`` (optional, an ``evidence.Before``): the ``settled`` (relabeled) samples' label and margins from
    before their relabel.  They are not judged, but their old class's mixture is fitted with that evidence:
    they were its lower mode, and without them the few wrong labels left there no longer make one (on the
    noise benchmark, recall fell from 0.88 to 0.77 with relabeling until they were kept; BENCHMARKS.md).

    ``share`` (optional) maps the stacked mixtures (sources x ``MIXTURE_ROWS`` x C, float64) to the ones to
    use: ranks take rank 0's, so that every rank decides alike from O(C) numbers; the rest is elementwise.
    """
    seen = _seen(label, settled)
    sources = [m for m in (model_margin, clip_margin) if m is not None]
    if not sources:
        return torch.zeros(label.numel(), dtype=torch.float32, device=label.device) if out is None else out.zero_()
    if before is not None and settled is not None:
        fit_label = torch.where(settled, before.label, label)
        olds = [old for m, old in ((model_margin, before.model_margin), (clip_margin, before.clip_margin))
                if m is not None]
        fits = torch.stack([fit_mixtures(torch.where(settled, old, m), fit_label, fit_label >= 0, num_classes)
                            for m, old in zip(sources, olds)])
    else:
        fits = torch.stack([fit_mixtures(m, label, seen, num_classes) for m in sources])
    if share is not None:
        fits = share(fits)
    belief = mixture_posterior(sources[0], label, seen, fits[0], out=out)
    for m, fit in zip(sources[1:], fits[1:]):
        mixture_posterior(m, label, seen, fit, at_most=belief)
    return belief


def act(belief: torch.Tensor, label: torch.Tensor, model_margin: torch.Tensor | None,
        model_pred: torch.Tensor | None, clip_margin: torch.Tensor | None, clip_pred: torch.Tensor | None,
        max_fraction: float = 1.0, exclude_above: float = EXCLUDE_ABOVE, relabel: bool = False,
        settled: torch.Tensor | None = None, out: torch.Tensor | None = None) -> NoiseDecision:
    """Action and class for every sample from its ``belief`` (see ``decide``); the actions written into
    ``out`` (int8 N) when given."""
    n, dev = label.numel(), label.device
    suspect = belief > SUSPECT_ABOVE
    cap = int(math.floor(max_fraction * n))
    # On the CPU, where counting costs no synchronisation, the usual case (within the cap) skips the ranking:
    # the same result, since every suspect then makes the cut.
    if cap < n and (dev.type != "cpu" or int(torch.count_nonzero(suspect)) > cap):
        suspect = _most_suspected(suspect, belief, label, model_margin, clip_margin, cap, settled)
    use_relabel = relabel and model_pred is not None and clip_pred is not None
    if use_relabel:
        new_label = torch.full((n,), -1, dtype=torch.int32, device=dev)
    else:  # nothing is relabeled: one -1 seen N times (no memory)
        new_label = torch.full((1,), -1, dtype=torch.int32, device=dev).expand(n)
    action = torch.empty(n, dtype=torch.int8, device=dev) if out is None else out
    for a, b in passes(n, dev):  # elementwise, a pass at a time (temporaries bounded)
        sus = suspect[a:b]
        sure = sus & (belief[a:b] >= exclude_above)
        if use_relabel:
            mp = model_pred[a:b]
            agreed = (mp == clip_pred[a:b]) & (mp >= 0) & (mp != label[a:b])
            new_label[a:b] = torch.where(sus & agreed, mp, -1)
            moved = sure & agreed
        else:
            moved = torch.zeros_like(sure)
        act_ = torch.where(sus, DOWNWEIGHT, KEEP)
        act_ = torch.where(sure, EXCLUDE, act_)
        action[a:b] = torch.where(moved, RELABEL, act_)
    return NoiseDecision(belief=belief, action=action, new_label=new_label)


def _most_suspected(suspect, belief, label, model_margin, clip_margin, cap: int, settled) -> torch.Tensor:
    """The ``cap`` suspects to act on (bool N): the highest beliefs; among equal beliefs at the cut (beliefs
    saturate at 1), those whose margins point further away, then the lowest indices.  Radix selections (no
    sort, no 8-byte key): a few bytes a sample of temporaries."""
    n, dev = belief.numel(), belief.device
    top = smallest(belief, suspect, cap, descending=True)
    edge = torch.full((), float("inf"), dtype=belief.dtype, device=dev)  # the cap-th belief
    for a, b in passes(n, dev):
        edge = torch.minimum(edge, torch.where(top[a:b], belief[a:b], float("inf")).min())
    tied = torch.empty(n, dtype=torch.bool, device=dev)
    for a, b in passes(n, dev):
        tied[a:b] = suspect[a:b] & (belief[a:b] == edge)
        top[a:b] &= belief[a:b] > edge

    def pull(a: int, b: int) -> torch.Tensor:  # how far the margins point away (float32), a pass at a time
        seen = _seen(label[a:b], None if settled is None else settled[a:b])
        total = torch.zeros(b - a, dtype=torch.float64, device=dev)
        for margin in (model_margin, clip_margin):
            if margin is not None:
                m = margin[a:b]
                total -= torch.where(seen & torch.isfinite(m), m, 0.0).to(torch.float64)
        return total.to(torch.float32)

    top |= smallest(pull, tied, cap - torch.count_nonzero(top), descending=True)
    return top


def decide(label: torch.Tensor, model_margin: torch.Tensor | None, model_pred: torch.Tensor | None,
           clip_margin: torch.Tensor | None, clip_pred: torch.Tensor | None, num_classes: int,
           max_fraction: float = 1.0, exclude_above: float = EXCLUDE_ABOVE, relabel: bool = False,
           settled: torch.Tensor | None = None, before=None) -> NoiseDecision:
    """Belief, action, class and weight for every sample from the evidence given (None: not used):
    ``act(beliefs(...), ...)``.

    ``label`` is the class each sample trains with (-1: never scored, no decision).  ``relabel``: give
    the agreed class to sure suspects instead of leaving them out.  ``settled`` (bool N) marks samples whose
    decision stands (relabeled ones): they are neither judged nor part of their new class's mixture, because
    their evidence restarted against the new class and is younger than everyone else's (a few late, confident
    visits beside margins averaged since the first epoch): mixed in, they become the class's upper
    component and hide the remaining wrong labels.  With ``before`` (see ``beliefs``) their old evidence
    stays in their old class's mixture.
    """
    belief = beliefs(label, model_margin, clip_margin, num_classes, settled, before=before)
    return act(belief, label, model_margin, model_pred, clip_margin, clip_pred, max_fraction, exclude_above,
               relabel, settled)
