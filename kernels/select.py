"""Epoch selection on the device: priority, policy decisions, weights and the shuffle.

The per-sample work is two fused elementwise passes over the N scores
(``priority_kernel``, ``finalize_kernel``).  The order statistics between
them come from ``selection.py``: the ranked policies' choice and the median by radix selection (no sort).
The shuffle sorts nothing either: ``shuffle_kernel`` sends each sample to its image under a keyed bijection
of [0, N) (a Feistel network, cycle-walked into range), and ``compact_kernel`` moves the kept ones to the
front in that order (a stable partition after one scan).

What is the same on every device, from the same state:
- exactly: every random draw (the counter-based Philox of ``reference.py``, bit
  for bit), the noise filter (a median, ranks and an integer budget), the
  ``full`` and ``random`` policies, and the shuffle of a given kept set;
- within a few float32 ulps: the consistency mean and standard deviation and
  the infobatch mean priority (sums, added in another order on a GPU) and
  the priorities (``tl.exp`` here, ``torch.sigmoid`` in the reference).  So
  ``topk`` and ``infobatch`` may decide differently for a sample whose
  priority lies within that distance of the k-th priority or of the mean
  (and, for infobatch, whose draw lies within the resulting change of the
  drop probability, a ratio of those counts); every other sample's decision,
  and the order of the samples kept on both, is the same.
  ``tests/test_select_kernel.py`` checks both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common as K
from .common_tl import (CLS_ELIGIBLE, CLS_NOISY, CLS_UNSEEN, PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_ROUND_A,
                        PHILOX_ROUND_B, PHILOX_ROUNDS, POLICY_FULL, POLICY_INFOBATCH, SHUFFLE_MIX_A, SHUFFLE_MIX_B,
                        STREAM_DROP)
from .reference import PolicyStats, shuffle_keys

BLOCK = 1024


@triton.jit
def _mulhilo(a, b: tl.constexpr):
    prod = a.to(tl.uint64) * b
    return (prod >> 32).to(tl.uint32), prod.to(tl.uint32)


@triton.jit
def philox_words(k0, k1, i, epoch, stream: tl.constexpr):
    """Philox-4x32-10 with counter (i_lo, i_hi, epoch, stream); returns the first two words."""
    c0 = (i & 0xFFFFFFFF).to(tl.uint32)
    c1 = (i >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + epoch.to(tl.uint32)
    c3 = tl.zeros_like(c0) + stream
    key0 = k0.to(tl.uint32)
    key1 = k1.to(tl.uint32)
    for _ in tl.static_range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ key0, lo_b, hi_a ^ c3 ^ key1, lo_a
        key0 = key0 + PHILOX_KEY_A
        key1 = key1 + PHILOX_KEY_B
    return c0, c1


@triton.jit(do_not_specialize=["N"])
def priority_kernel(scores_ptr, visits_ptr, cons_ptr, noisy_ptr, mu_ptr, sd_ptr, cls_ptr, prio_ptr,
                    N, semantic_weight, USE_CONS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    s = tl.load(scores_ptr + offs, mask=m, other=0.0)
    seen = tl.load(visits_ptr + offs, mask=m, other=0) > 0
    noisy = tl.load(noisy_ptr + offs, mask=m, other=0) != 0
    cls = tl.where(noisy, CLS_NOISY, tl.where(seen, CLS_ELIGIBLE, CLS_UNSEEN)).to(tl.int8)
    if USE_CONS:
        c = tl.load(cons_ptr + offs, mask=m, other=0.0)
        mu = tl.load(mu_ptr)
        sd = tl.maximum(tl.load(sd_ptr), 1e-6)
        zc = semantic_weight * ((c - mu) / sd)
        p = s * (1.0 / (1.0 + tl.exp(-zc)))
    else:
        p = s
    tl.store(cls_ptr + offs, cls, mask=m)
    tl.store(prio_ptr + offs, p, mask=m)


@triton.jit(do_not_specialize=["N", "k0", "k1", "epoch"])
def finalize_kernel(cls_ptr, prio_ptr, chosen_ptr, mean_ptr, drop_ptr, upw_ptr,
                    keep_ptr, w_ptr, N, k0, k1, epoch,
                    POLICY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    cls = tl.load(cls_ptr + offs, mask=m, other=CLS_NOISY)
    active = cls != CLS_NOISY
    w = tl.full([BLOCK], 1.0, tl.float32)
    if POLICY == POLICY_FULL:
        keep = active
    elif POLICY == POLICY_INFOBATCH:
        p = tl.load(prio_ptr + offs, mask=m, other=0.0)
        low = (cls == CLS_ELIGIBLE) & (p < tl.load(mean_ptr))
        r0, _ = philox_words(k0, k1, offs, epoch, STREAM_DROP)
        u = (r0 >> 8).to(tl.float32) * (1.0 / 16777216.0)  # reference.uniform_from_word
        keep = active & ~(low & (u < tl.load(drop_ptr)))
        w = tl.where(low & keep, tl.load(upw_ptr), w)
    else:  # POLICY_RANKED: topk and random
        chosen = tl.load(chosen_ptr + offs, mask=m, other=0) != 0
        keep = (cls == CLS_UNSEEN) | ((cls == CLS_ELIGIBLE) & chosen)
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=m)
    tl.store(w_ptr + offs, w, mask=m)


@triton.jit
def _feistel_round(x, hb, lb, k):
    """(high, low) -> (low, high xor mix(low xor k)), high of ``hb`` bits, low of ``lb``; see reference.feistel."""
    lo = x & ((1 << lb) - 1).to(tl.uint32)
    h = lo ^ k.to(tl.uint32)
    h ^= h >> 16
    h = h * SHUFFLE_MIX_A
    h ^= h >> 15
    h = h * SHUFFLE_MIX_B
    h ^= h >> 16
    h = h & ((1 << hb) - 1).to(tl.uint32)
    return (lo << hb.to(tl.uint32)) | ((x >> lb.to(tl.uint32)) ^ h)


@triton.jit
def _feistel(x, hb, lb, keys_ptr, flip, ROUNDS: tl.constexpr):
    """The keyed bijection of [0, 2**(hb + lb)): ``reference.feistel``."""
    for r in tl.static_range(ROUNDS):
        if r % 2 == 0:
            x = _feistel_round(x, hb, lb, tl.load(keys_ptr + r))
        else:
            x = _feistel_round(x, lb, hb, tl.load(keys_ptr + r))
    return tl.where((x < 2) & (flip != 0), x ^ 1, x)


@triton.jit(do_not_specialize=["N", "BITS", "flip"])
def shuffle_kernel(keep_ptr, keys_ptr, slot_ptr, N, BITS, flip, ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    """``slot[pi(i)] = i`` for kept samples, ``~i`` for the others: pi the keyed bijection of [0, N)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    hb = BITS - BITS // 2
    lb = BITS // 2
    x = _feistel(offs.to(tl.uint32), hb, lb, keys_ptr, flip, ROUNDS)
    walk = m & (x.to(tl.int64) >= N)
    while tl.max(walk.to(tl.int32), axis=0) > 0:  # cycle walking: fewer than 2 passes on average
        x = tl.where(walk, _feistel(x, hb, lb, keys_ptr, flip, ROUNDS), x)
        walk = walk & (x.to(tl.int64) >= N)
    keep = tl.load(keep_ptr + offs, mask=m, other=0) != 0
    tl.store(slot_ptr + x.to(tl.int64), tl.where(keep, offs, -1 - offs), mask=m)


@triton.jit(do_not_specialize=["N"])
def compact_kernel(slot_ptr, csum_ptr, order_ptr, N, BLOCK: tl.constexpr):
    """Kept samples to the front in slot order, the others after them in the same order (a stable partition
    by the sign of the slot; ``csum``: the inclusive count of kept slots)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    v = tl.load(slot_ptr + offs, mask=m, other=0)
    c = tl.load(csum_ptr + offs, mask=m, other=0).to(tl.int64)
    kept = tl.load(csum_ptr + N - 1).to(tl.int64)
    at = tl.where(v >= 0, c - 1, kept + offs - c)
    tl.store(order_ptr + at, tl.where(v >= 0, v, -1 - v), mask=m)


def priority_triton(scores, visits, consistency, noisy, mu, sd, semantic_weight: float, use_consistency: bool,
                    out=None):
    """Drop-in for ``reference.priority_reference``."""
    n = scores.numel()
    cls = torch.empty(n, dtype=torch.int8, device=scores.device)
    prio = torch.empty(n, dtype=torch.float32, device=scores.device) if out is None else out
    mu = torch.as_tensor(mu, dtype=torch.float32, device=scores.device).reshape(())
    sd = torch.as_tensor(sd, dtype=torch.float32, device=scores.device).reshape(())
    priority_kernel[(triton.cdiv(n, BLOCK),)](
        scores, visits, consistency, noisy.view(torch.int8), mu, sd, cls, prio, n, float(semantic_weight),
        USE_CONS=bool(use_consistency), BLOCK=BLOCK, num_warps=4)
    return cls, prio


def _as_i32(k: int) -> int:
    """A uint32 key as the int32 with the same bits (keeps the kernel's argument type fixed)."""
    return k - (1 << 32) if k >= (1 << 31) else k


def finalize_triton(cls, prio, chosen, stats: PolicyStats, policy: int, seed: int, epoch: int, out=None):
    """Drop-in for ``reference.finalize_reference``."""
    n = cls.numel()
    dev = cls.device
    keep = torch.empty(n, dtype=torch.int8, device=dev)
    w = torch.empty(n, dtype=torch.float32, device=dev) if out is None else out
    k0, k1 = (_as_i32(k) for k in K.seed_keys(seed))
    chosen = cls if chosen is None else chosen.view(torch.int8)  # cls: a placeholder, read only when ranked
    scal = [torch.as_tensor(v, device=dev).reshape(()) for v in (stats.mean_p, stats.drop_prob, stats.up_weight)]
    finalize_kernel[(triton.cdiv(n, BLOCK),)](
        cls, prio, chosen, *scal, keep, w, n, k0, k1, _as_i32(epoch & 0xFFFFFFFF),
        POLICY=policy, BLOCK=BLOCK, num_warps=4)
    return keep.view(torch.bool), w


def shuffle_triton(keep, seed: int, epoch: int, dropped: bool = True):
    """Drop-in for ``reference.shuffled_order``: three passes over N on the device, no sort, no sync.  It
    writes every index whatever ``dropped`` (knowing how many are kept would take a sync)."""
    n = keep.numel()
    if n > K.SHUFFLE_MAX_N:
        raise ValueError(f"the shuffle handles up to {K.SHUFFLE_MAX_N} samples, got {n}")
    slot = torch.empty(n, dtype=torch.int64, device=keep.device)
    *keys, last = shuffle_keys(seed, epoch)
    keys = torch.tensor([_as_i32(k) for k in keys], dtype=torch.int32).to(keep.device, non_blocking=True)
    bits = (n - 1).bit_length()
    grid = (triton.cdiv(n, BLOCK),)
    shuffle_kernel[grid](keep.view(torch.int8), keys, slot, n, bits, int(bits > 0 and last & 1),
                         ROUNDS=K.SHUFFLE_ROUNDS, BLOCK=BLOCK, num_warps=4)
    csum = torch.cumsum(slot >= 0, 0, dtype=torch.int32 if n < 2**31 else torch.int64)
    order = torch.empty(n, dtype=torch.int64, device=keep.device)
    compact_kernel[grid](slot, csum, order, n, BLOCK=BLOCK, num_warps=4)
    return order
