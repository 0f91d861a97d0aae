"""Epoch selection: the pipeline every device runs, with its passes plugged in.

``select_reference`` computes the statistics between the per-sample passes (the
noise filter's median, the consistency statistics, the policies' budget and
ranked choice, by radix selection: no sort) and calls the passes: by default
their PyTorch specification (``reference.py``), on CUDA the Triton kernels of
``select.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import common as K
from .reference import PolicyStats, finalize_reference, priority_reference, random_words, shuffled_order, spans

_U32 = 0xFFFFFFFF


@dataclass
class Selection:
    """Result of one epoch selection; every tensor lives on the state's device."""

    order: torch.Tensor  # the kept indices, shuffled: order[:n_keep] (a GPU's passes also write the rest after them)
    n_keep: torch.Tensor  # number of kept samples (0-d int64)
    keep: torch.Tensor  # bool[N]
    weights: torch.Tensor  # float32[N] unbiasing weights for the epoch
    noisy: torch.Tensor  # bool[N] flagged as likely mislabeled
    priority: torch.Tensor  # float32[N] (meaningful for seen samples)
    drop_prob: torch.Tensor  # 0-d float32: infobatch drop probability (0 for other policies)


_SELECT_CHUNK = {"cpu": 1 << 16}  # samples per pass of the radix selection: the CPU's elementwise work in cache
_SELECT_CHUNK_DEVICE = 1 << 26  # elsewhere: bounds the temporaries (a few bytes a sample)


def order_keys(values: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """int64 keys in [0, 2**32) whose ascending order is ``values``' order (descending with ``descending``):
    float32 bits made monotonic (-0.0 counts as 0.0, as in a sort), or uint32 words held in int64."""
    if values.is_floating_point():
        b = (values.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
        key = torch.where(b < 0, b ^ 0x7FFFFFFF, b) + (1 << 31)
    else:
        key = values.to(torch.int64)
    return (_U32 - key) if descending else key


def smallest(values, mask: torch.Tensor, k, descending: bool = False) -> torch.Tensor:
    """The ``k`` (int or 0-d tensor) first of ``values[mask]`` in ascending order (descending with
    ``descending``), ties broken by index: the same set as the first ``k`` of a stable sort, found without
    sorting.  Radix selection: four passes over N, each an 8-bit histogram of the keys still in question
    (exact integer counts, the same on every device), then a scan over the ties.  Returns a bool mask.

    ``values`` is a tensor like ``mask``, or a function ``(start, stop) -> values[start:stop]`` for values
    computed a pass at a time (never held whole)."""
    n, dev = mask.numel(), mask.device
    chunk = _SELECT_CHUNK.get(dev.type, _SELECT_CHUNK_DEVICE)
    if isinstance(values, torch.Tensor):
        values = (lambda lo, hi, v=values: v[lo:hi])
    chosen = torch.zeros(n, dtype=torch.bool, device=dev)
    cand = mask.clone()
    remaining = torch.as_tensor(k, dtype=torch.int64, device=dev).clamp(0).minimum(torch.count_nonzero(mask))
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(257, dtype=torch.int64, device=dev)
        for lo in range(0, n, chunk):
            digit = (order_keys(values(lo, min(n, lo + chunk)), descending) >> shift) & 255
            hist += torch.bincount(torch.where(cand[lo:lo + chunk], digit, 256), minlength=257)
        cum = hist[:256].cumsum(0)
        pick = (cum < remaining).sum()  # the bin that holds the k-th key
        remaining = remaining - torch.where(pick > 0, cum[(pick - 1).clamp_min(0)], 0)
        for lo in range(0, n, chunk):
            digit = (order_keys(values(lo, min(n, lo + chunk)), descending) >> shift) & 255
            c = cand[lo:lo + chunk]
            chosen[lo:lo + chunk] |= c & (digit < pick)
            c &= digit == pick
    taken = torch.zeros((), dtype=torch.int64, device=dev)  # ties (equal to the k-th key): lowest indices first
    for lo in range(0, n, chunk):
        c = cand[lo:lo + chunk]
        order = torch.cumsum(c, 0) + taken
        chosen[lo:lo + chunk] |= c & (order <= remaining)
        taken = order[-1] if order.numel() else taken
    return chosen


def masked_median(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Lower median of ``values[mask]`` as a 0-d tensor, without a host sync (NaN if empty)."""
    count = torch.count_nonzero(mask)
    below = smallest(values, mask, (count - 1) // 2 + 1)
    top = torch.where(below, values, torch.full_like(values, float("-inf"))).max()
    return torch.where(count > 0, top, torch.full_like(top, float("nan")))


def _and_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``a & b`` (bool N), written into ``out`` when given (which may be ``a``), a pass at a time."""
    if out is None:
        return a & b
    for lo, hi in _passes(a.numel(), a.device):
        torch.logical_and(a[lo:hi], b[lo:hi], out=out[lo:hi])
    return out


def fraction_of(count: torch.Tensor, ratio: float) -> torch.Tensor:
    """floor(ratio * count) as a 0-d int64 tensor: in float64, exact for any dataset size (float32, the
    default for int * float, is off above 2**24)."""
    return torch.floor(count.to(torch.float64) * ratio).to(torch.int64)


def _passes(n: int, device: torch.device):
    """(start, stop) of the statistics' passes: cache-sized on the CPU (a pass's temporaries stay in the
    core's cache: 10M samples, 6x faster than one pass), bounded elsewhere."""
    return spans(n, device, _SELECT_CHUNK, _SELECT_CHUNK_DEVICE)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``values[mask]`` (of ``(values - centre) ** 2`` with ``centre``) as a 0-d float64."""
    total = torch.zeros((), dtype=torch.float64, device=values.device)
    for lo, hi in _passes(values.numel(), values.device):
        v = values[lo:hi] if centre is None else (values[lo:hi] - centre) ** 2
        total += torch.where(mask[lo:hi], v, 0.0).sum(dtype=torch.float64)
    return total


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values[mask]`` (0 when empty) as a 0-d float32, summed in float64 with an int64 count
    (``count``: its number of samples, when the caller has it)."""
    n = torch.count_nonzero(mask) if count is None else count
    return (masked_sum(values, mask) / n.clamp_min(1)).to(torch.float32)


def noise_mask(scores, consistency, seen, noise_ratio: float) -> torch.Tensor:
    """The floor(noise_ratio * n_seen) least consistent samples among those with above-median loss."""
    med = masked_median(scores, seen)
    high = seen & (scores > med)
    return smallest(consistency, high, fraction_of(torch.count_nonzero(seen), noise_ratio))


def consistency_stats(consistency, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``consistency[mask]`` (0 and 1 when empty)."""
    n = torch.count_nonzero(mask)
    mu = masked_mean(consistency, mask, n)
    var = (masked_sum(consistency, mask, centre=mu) / n.clamp_min(1)).to(torch.float32)
    sd = torch.where(n > 1, var.sqrt(), torch.ones_like(var))
    return mu, sd


def policy_stats(cls, prio, keep_count: int, max_drop: float) -> PolicyStats:
    """Budget, mean priority and the drop probability that makes E[kept] = keep_count."""
    counts = torch.zeros(3, dtype=torch.int64, device=cls.device)  # per sample class: unseen, eligible, noisy
    for lo, hi in _passes(cls.numel(), cls.device):
        counts += torch.bincount(cls[lo:hi].to(torch.int64), minlength=3)[:3]
    n_unseen, n_elig = counts[K.CLS_UNSEEN], counts[K.CLS_ELIGIBLE]
    budget = (keep_count - n_unseen).clamp_min(0)
    elig = cls == K.CLS_ELIGIBLE
    mean_p = masked_mean(prio, elig, n_elig)
    n_low = torch.zeros((), dtype=torch.int64, device=cls.device)
    for lo, hi in _passes(cls.numel(), cls.device):
        n_low += torch.count_nonzero(elig[lo:hi] & (prio[lo:hi] < mean_p))
    want = (n_unseen + n_elig - keep_count).clamp_min(0)
    drop = (want.to(torch.float64) / n_low.clamp_min(1)).clamp(0.0, max_drop).to(torch.float32)
    return PolicyStats(budget=budget, mean_p=mean_p, drop_prob=drop, up_weight=1.0 / (1.0 - drop))


POLICY_CODES = {"full": K.POLICY_FULL, "infobatch": K.POLICY_INFOBATCH, "topk": K.POLICY_RANKED,
                "random": K.POLICY_RANKED}


def ranked_choice(policy: str, cls, prio, budget, seed: int, epoch: int):
    """The eligible samples the ranked policies keep (None for the others): the ``budget`` of highest
    priority (topk) or of smallest random word (random), ties by index."""
    elig = cls == K.CLS_ELIGIBLE
    if policy == "topk":
        return smallest(prio, elig, budget, descending=True)
    if policy == "random":
        r0, _ = random_words(seed, cls.numel(), epoch, K.STREAM_RANDOM, cls.device)
        return smallest(r0, elig, budget)
    return None


def select_reference(
    scores: torch.Tensor,
    visits: torch.Tensor,
    consistency: torch.Tensor,
    *,
    use_consistency: bool,
    policy: str,
    keep_ratio: float,
    noise_ratio: float,
    semantic_weight: float,
    max_drop: float,
    seed: int,
    epoch: int,
    exclude: torch.Tensor | None = None,
    population: int | None = None,
    noisy: torch.Tensor | None = None,
    out: dict[str, torch.Tensor] | None = None,
    finalize=finalize_reference,
    priority=priority_reference,
    shuffle=shuffled_order,
) -> Selection:
    """Next epoch's selection, as README.md's "How it works" describes it (per epoch: priority, policy,
    shuffle).  ``priority``/``finalize``/``shuffle`` are its passes: swap in the kernels to run them on a GPU.

    ``exclude`` (bool N) marks samples outside a static subset: never kept, not counted in the
    statistics, and ``keep_ratio`` applies to the ``population`` that remains (pass it from the host
    to avoid a sync; it is counted here otherwise).  ``noisy`` (bool N), when given, is the set the
    noise decisions leave out, instead of the ``noise_ratio`` quantile rule.

    ``out`` (optional) holds buffers the caller owns for the outputs ``"noisy"`` (bool N), ``"priority"`` and
    ``"weights"`` (float32 N): written there instead of allocated (on the CPU the selection then needs a few
    bytes a sample of temporaries besides the order).  ``noisy`` may be ``out["noisy"]`` itself.
    """
    out = out or {}
    n = scores.numel()
    seen = visits > 0
    if exclude is not None:
        seen = seen & ~exclude
        if population is None:
            population = n - int(torch.count_nonzero(exclude))
    population = n if population is None else population
    if noisy is not None:
        noisy = _and_into(noisy, seen, out.get("noisy"))
    elif use_consistency and noise_ratio > 0:
        noisy = noise_mask(scores, consistency, seen, noise_ratio)
    else:
        noisy = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if "noisy" in out and noisy is not out["noisy"]:
        noisy = out["noisy"].copy_(noisy)
    if use_consistency:
        clean = torch.empty_like(seen)
        for lo, hi in _passes(n, seen.device):
            torch.logical_and(seen[lo:hi], ~noisy[lo:hi], out=clean[lo:hi])
        mu, sd = consistency_stats(consistency, clean)
        del clean
    else:
        mu = sd = torch.ones((), device=scores.device)
    blocked = noisy if exclude is None else noisy | exclude
    cls, prio = priority(scores, visits, consistency, blocked, mu, sd, semantic_weight, use_consistency,
                         out=out.get("priority"))
    del blocked
    keep_count = int(round(keep_ratio * population))
    stats = policy_stats(cls, prio, keep_count, max_drop)
    chosen = ranked_choice(policy, cls, prio, stats.budget, seed, epoch)
    keep, w = finalize(cls, prio, chosen, stats, POLICY_CODES[policy], seed, epoch, out=out.get("weights"))
    del cls, chosen
    order = shuffle(keep, seed, epoch, dropped=False)
    drop_prob = stats.drop_prob if policy == "infobatch" else torch.zeros((), device=scores.device)
    return Selection(order=order, n_keep=torch.count_nonzero(keep), keep=keep, weights=w, noisy=noisy, priority=prio,
                     drop_prob=drop_prob)
