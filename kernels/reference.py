"""Plain-PyTorch specification of the step's and epoch selection's kernels.

Each Triton kernel in ``step.py`` and ``select.py`` must match its function here
(tests compare them under ``TRITON_INTERPRET=1``), and these functions are what
CPU tensors run.  Written for clarity first, but vectorised so the CPU path
stays usable on real datasets.  The selection pipeline that calls the
selection passes lives in ``selection.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import common as K
from .state import SampleState

_U32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------
# Counter-based random numbers (Philox-4x32-10), identical on every device
# ---------------------------------------------------------------------------


def _mul_u32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for uint32 values held in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t_hi, t_lo = a_hi * b, a_lo * b  # each < 2**48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _U32
    return hi, lo


def philox(k0: int, k1: int, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 on int64 tensors holding uint32 values; returns 4 words.

    Counters may be tensors or Python ints; the words live on the first tensor counter's device.
    """
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)
    c0, c1, c2, c3 = torch.broadcast_tensors(
        *(torch.as_tensor(c, dtype=torch.int64, device=device) & _U32 for c in (c0, c1, c2, c3)))
    for _ in range(K.PHILOX_ROUNDS):
        hi_b, lo_b = _mul_u32(c2, K.PHILOX_ROUND_B)
        hi_a, lo_a = _mul_u32(c0, K.PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + K.PHILOX_KEY_A) & _U32
        k1 = (k1 + K.PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


# Samples per Philox pass: bounds its temporaries (~30 live words each).  On the CPU a pass that fits in the
# core's cache is ~5x faster than one that streams through memory (10M words with NumPy: 0.37 s); the finalize
# pass draws for about half of a chunk's samples (the low-priority ones), so it takes larger chunks.
_WORDS_CHUNK = {"cpu": 1 << 14}
_FINALIZE_CHUNK = {"cpu": 1 << 16}
_WORDS_CHUNK_DEVICE = 1 << 22


def philox_numpy(k0: int, k1: int, c0: np.ndarray, c1, c2, c3) -> tuple[np.ndarray, ...]:
    """``philox`` on NumPy uint64 arrays holding uint32 values (the CPU's path): a 32 x 32-bit product fits
    uint64 exactly, so each multiply is one operation instead of ``_mul_u32``'s eight."""
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=np.uint64) & np.uint64(_U32)
                                           for c in (c0, c1, c2, c3)))
    ma, mb, m32, s32 = np.uint64(K.PHILOX_ROUND_A), np.uint64(K.PHILOX_ROUND_B), np.uint64(_U32), np.uint64(32)
    for _ in range(K.PHILOX_ROUNDS):
        pb = c2 * mb
        pa = c0 * ma
        c0, c1, c2, c3 = (pb >> s32) ^ c1 ^ np.uint64(k0), pb & m32, (pa >> s32) ^ c3 ^ np.uint64(k1), pa & m32
        k0 = (k0 + K.PHILOX_KEY_A) & _U32
        k1 = (k1 + K.PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def words_span(seed: int, start: int, stop: int, epoch: int, stream: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``random_words`` of samples ``start..stop-1`` only: for passes that need a chunk's words at a time."""
    k0, k1 = K.seed_keys(seed)
    device = torch.device(device)
    if device.type == "cpu":
        i = np.arange(start, stop, dtype=np.uint64)
        w0, w1, _, _ = philox_numpy(k0, k1, i, i >> np.uint64(32), epoch & _U32, stream)
        return torch.from_numpy(w0.view(np.int64)), torch.from_numpy(w1.view(np.int64))
    i = torch.arange(start, stop, dtype=torch.int64, device=device)
    w0, w1, _, _ = philox(k0, k1, i & _U32, i >> 32, epoch & _U32, stream)
    return w0, w1


def words_at(seed: int, indices: torch.Tensor, epoch: int, stream: int) -> torch.Tensor:
    """The first of ``random_words`` at the given sample indices only (int64 CPU tensor): the same words, for
    CPU passes that need them at a few samples of a chunk."""
    k0, k1 = K.seed_keys(seed)
    i = indices.numpy().astype(np.uint64)
    w0, _, _, _ = philox_numpy(k0, k1, i, i >> np.uint64(32), epoch & _U32, stream)
    return torch.from_numpy(w0.view(np.int64))


def spans(n: int, device, chunks: dict, default: int):
    """(start, stop) of the passes over ``n`` samples, ``chunks[device type]`` (else ``default``) at a time."""
    step = chunks.get(torch.device(device).type, default)
    return ((lo, min(n, lo + step)) for lo in range(0, n, step))


def random_words(seed: int, n: int, epoch: int, stream: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random uint32 words (as int64) for samples 0..n-1 of (seed, epoch, stream)."""
    r0 = torch.empty(n, dtype=torch.int64, device=device)
    r1 = torch.empty(n, dtype=torch.int64, device=device)
    for lo, hi in spans(n, device, _WORDS_CHUNK, _WORDS_CHUNK_DEVICE):
        r0[lo:hi], r1[lo:hi] = words_span(seed, lo, hi, epoch, stream, device)
    return r0, r1


def uniform_from_word(r0: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) from a uint32 word: top 24 bits, exact on every device."""
    return (r0 >> 8).to(torch.float32) * (1.0 / 16777216.0)


# ---------------------------------------------------------------------------
# The per-batch step
# ---------------------------------------------------------------------------


@dataclass
class StepOutput:
    """Per-sample results of one step (length B)."""

    ce: torch.Tensor  # training loss per sample (label-smoothed CE), 0 for ignored rows
    contrib: torch.Tensor  # weight * ce * scale: the batch loss is contrib.sum()
    correct: torch.Tensor  # argmax(logits) == label (bool)
    margin: torch.Tensor  # z_y - max_{c != y} z_c, the model's own margin (float32; 0 where nothing updates)
    pred: torch.Tensor  # argmax(logits), the first maximal class (int32; -1 where nothing updates)
    grad: torch.Tensor | None  # d(batch loss)/d(logits), or None when not asked for


def _record(errors: torch.Tensor, count_slot: int, value_slot: int, bad: torch.Tensor, values: torch.Tensor):
    """Count the bad rows and keep the smallest offending value (see ``common.example_key``)."""
    n = int(bad.sum())
    if n:
        errors[value_slot] = K.merge_example(int(errors[value_slot]), int(values[bad].min()))
        errors[count_slot] += n


def step_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    *,
    state: SampleState,
    step_id: int,
    ema: float,
    scale: float,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    emb_mode: int = K.EMB_NONE,
    emb: torch.Tensor | None = None,
    text: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> StepOutput:
    """Fused step semantics, one row after another.

    Updates ``state`` in place (its error counters and every column but
    ``weights``, which it only reads) and, when ``grad`` is given (it may alias
    ``logits``), writes the gradient of ``sum_i weights[idx_i] * ce_i * scale``
    into it.  Rows with a
    label outside [0, C) (other than ``ignore_index``) or an index outside
    [0, N) are recorded in ``errors`` and contribute nothing.  Rows with
    non-finite loss are recorded and leave the state untouched.  When an index
    repeats within the batch, only its first finite row updates the state (on
    every device: the kernel settles duplicates after all rows have run).
    """
    K.check_step_id(step_id)
    B, C = logits.shape
    N = state.num_samples
    scores, visits, consistency, weights, stamp, errors = (state.scores, state.visits, state.consistency,
                                                           state.weights, state.stamp, state.errors)
    dev = logits.device
    z = logits.to(compute_dtype)
    labels = labels.to(torch.int64)
    indices = indices.to(torch.int64)

    ignored = labels == ignore_index
    bad_label = ~ignored & ((labels < 0) | (labels >= C))
    bad_index = (indices < 0) | (indices >= N)
    _record(errors, K.ERR_LABEL_COUNT, K.ERR_LABEL_VALUE, bad_label, labels)
    _record(errors, K.ERR_INDEX_COUNT, K.ERR_INDEX_VALUE, bad_index, indices)
    ok = ~(ignored | bad_label | bad_index)

    y = torch.where(ok, labels, torch.zeros_like(labels))
    n = torch.where(ok, indices, torch.zeros_like(indices))
    # Everything read from the logits first: with an in-place gradient, z is overwritten below.
    mx, arg = z.max(dim=1)  # the first maximal index, as argmax
    z_y = z.gather(1, y[:, None])[:, 0]
    if C > 1:  # the runner-up to the label: the row maximum, or the second largest where the label holds it
        top2 = z.topk(2, dim=1).values
        z_other = torch.where(arg == y, top2[:, 1], top2[:, 0])
    else:
        z_other = torch.full_like(z_y, float("-inf"))
    eps = float(label_smoothing)
    z_mean = z.mean(dim=1) if eps else None
    direct = grad is not None and grad.dtype == z.dtype
    e = grad if direct else torch.empty_like(z)  # exp(z - max): the softmax numerator, one pass
    torch.sub(z, mx[:, None], out=e).exp_()
    denom = e.sum(dim=1)
    lse = mx + denom.log()
    nll = lse - z_y
    ce = lse - (1.0 - eps) * z_y - eps * z_mean if eps else nll
    finite = torch.isfinite(ce)
    nonfinite = ok & ~finite
    _record(errors, K.ERR_NONFINITE_COUNT, K.ERR_NONFINITE_ROW, nonfinite, torch.arange(B, device=dev))

    w = torch.where(ok, weights.to(compute_dtype)[n], torch.zeros((), dtype=compute_dtype, device=dev))
    zero = torch.zeros((), dtype=compute_dtype, device=dev)
    ce_out = torch.where(ok, ce, zero)
    contrib = torch.where(ok, w * ce * scale, zero)
    correct = ok & (arg == y) & finite
    margin = torch.where(ok & finite, z_y - z_other, zero).to(torch.float32)
    pred = torch.where(ok & finite, arg, -1).to(torch.int32)

    if grad is not None:  # (softmax - (1 - eps) onehot - eps / C) * w * scale, in place on e
        g = e.div_(denom[:, None])
        if eps:
            g.sub_(eps / C)
        g.scatter_add_(1, y[:, None], torch.full((B, 1), -(1.0 - eps), dtype=compute_dtype, device=dev))
        g.mul_((w * scale)[:, None])
        if not bool(ok.all()):
            g[~ok] = 0.0  # also clears NaN from bad rows (0 * NaN is NaN)
        if not direct:
            grad.copy_(g)

    # --- state update: valid finite rows, first occurrence of each index wins ---
    upd = ok & finite
    rows = torch.nonzero(upd)[:, 0]
    if rows.numel():
        idx_rows = n[rows]
        sorted_idx, perm = torch.sort(idx_rows, stable=True)
        repeat = torch.zeros_like(sorted_idx, dtype=torch.bool)
        repeat[1:] = sorted_idx[1:] == sorted_idx[:-1]
        dup_rows = rows[perm[repeat]]
        _record(errors, K.ERR_DUP_COUNT, K.ERR_DUP_VALUE, torch.isin(torch.arange(B, device=dev), dup_rows),
                n)
        rows = rows[perm[~repeat]]
    if rows.numel():
        idx = n[rows]
        stamp[idx] = step_id
        first = visits[idx] == 0
        s_new = nll[rows].to(torch.float32)
        s_old = scores[idx]
        scores[idx] = torch.where(first, s_new, ema * s_old + (1.0 - ema) * s_new).to(scores.dtype)
        if emb_mode == K.EMB_TABLE:  # computed once per sample, on its first visit
            fresh, frows = idx[first], rows[first]
            if fresh.numel():
                cos = cosine(emb[fresh].to(compute_dtype), text[y[frows]].to(compute_dtype))
                consistency[fresh] = cos.to(torch.float32)
        elif emb_mode == K.EMB_BATCH:
            cos = cosine(emb[rows].to(compute_dtype), text[y[rows]].to(compute_dtype)).to(torch.float32)
            consistency[idx] = torch.where(first, cos, ema * consistency[idx] + (1.0 - ema) * cos)
        visits[idx] += 1
        state.margin_sum[idx] += margin[rows]
        state.margin_count[idx] += 1
        state.pred[idx] = pred[rows]
        state.label[idx] = y[rows].to(torch.int32)

    return StepOutput(ce=ce_out, contrib=contrib, correct=correct, margin=margin, pred=pred, grad=grad)


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise cosine; each norm is clamped at ``eps`` (zero rows give 0)."""
    na = a.norm(dim=-1).clamp_min(eps)
    nb = b.norm(dim=-1).clamp_min(eps)
    return (a * b).sum(dim=-1) / (na * nb)


def scale_grad_reference(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Backward of the scalar loss: grad * grad_output (in place)."""
    return grad.mul_(grad_output.to(grad.dtype))


# ---------------------------------------------------------------------------
# Epoch selection's passes (``selection.select_reference`` runs them)
# ---------------------------------------------------------------------------


# Samples per elementwise pass on the CPU: a pass's float64 temporaries stay in the core's cache and bounded (a few
# bytes a sample in all); elsewhere one pass over every sample.  (Many small passes are fast on cores of their own;
# with more torch threads than free cores, as with any torch work, they can be many times slower: keep
# torch.set_num_threads at the cores the process really has.)
_PASS_CHUNK = {"cpu": 1 << 16}


def passes(n: int, device):
    """(start, stop) of an elementwise pass over ``n`` samples: cache-sized on the CPU (temporaries bounded),
    one pass elsewhere."""
    return spans(n, device, _PASS_CHUNK, max(n, 1))


def priority_reference(scores, visits, consistency, noisy, mu, sd, semantic_weight: float, use_consistency: bool,
                       out=None):
    """Sample class (unseen / eligible / noisy) and priority p = s * sigmoid(gamma * (c - mu) / sd); the
    priorities written into ``out`` (float32 N) when given."""
    n, dev = scores.numel(), scores.device
    cls = torch.empty(n, dtype=torch.int8, device=dev)
    p = torch.empty(n, dtype=torch.float32, device=dev) if out is None else out
    for lo, hi in passes(n, dev):
        c = torch.where(visits[lo:hi] > 0, K.CLS_ELIGIBLE, K.CLS_UNSEEN)
        cls[lo:hi] = torch.where(noisy[lo:hi], K.CLS_NOISY, c)
        if use_consistency:
            z = (consistency[lo:hi] - mu) / sd.clamp_min(1e-6)
            p[lo:hi] = scores[lo:hi] * torch.sigmoid(semantic_weight * z)
        else:
            p[lo:hi] = scores[lo:hi]
    return cls, p


@dataclass
class PolicyStats:
    """Device scalars the finalize pass needs."""

    budget: torch.Tensor  # int64: eligible samples the ranked policies may keep
    mean_p: torch.Tensor  # float32: infobatch threshold
    drop_prob: torch.Tensor  # float32: infobatch drop probability among below-mean samples
    up_weight: torch.Tensor  # float32: 1 / (1 - drop_prob)


def shuffle_keys(seed: int, epoch: int) -> list[int]:
    """The shuffle's keys for (seed, epoch), uint32 Python ints: ``SHUFFLE_ROUNDS`` round keys, then one whose
    lowest bit says whether the final transposition is applied."""
    k0, k1 = K.seed_keys(seed)
    w0, _, _, _ = philox(k0, k1, torch.arange(K.SHUFFLE_ROUNDS + 1), 0, epoch & _U32, K.STREAM_SHUFFLE)
    return [int(w) for w in w0]


def _mix(lo: np.ndarray, key: int, bits: int) -> np.ndarray:
    """The Feistel round function on uint32 values: a keyed integer hash of ``lo``, cut to ``bits`` bits."""
    h = lo ^ np.uint32(key)
    h ^= h >> np.uint32(16)
    h *= np.uint32(K.SHUFFLE_MIX_A)
    h ^= h >> np.uint32(15)
    h *= np.uint32(K.SHUFFLE_MIX_B)
    h ^= h >> np.uint32(16)
    h &= np.uint32((1 << bits) - 1)
    return h


def _round_widths(bits: int) -> list[tuple[int, int]]:
    """Each round's (high, low) widths: the parts swap roles every round."""
    hb, lb = bits - bits // 2, bits // 2
    return [(hb, lb) if r % 2 == 0 else (lb, hb) for r in range(K.SHUFFLE_ROUNDS)]


def feistel(x: np.ndarray, bits: int, keys: list[int]) -> np.ndarray:
    """The keyed bijection of [0, 2**bits) on uint32 values, in place: ``SHUFFLE_ROUNDS`` unbalanced Feistel
    rounds, each replacing the high part by (high xor mix(low xor key)) and rotating the parts, then the swap
    of 0 and 1 when the last key says so.  (Without that swap every key would give a permutation of the same
    parity on 8 or more values, half of the orders never drawn.)"""
    for k, (hb, lb) in zip(keys[:K.SHUFFLE_ROUNDS], _round_widths(bits)):
        lo = x & np.uint32((1 << lb) - 1)
        h = _mix(lo, k, hb)
        x >>= np.uint32(lb)
        x ^= h
        lo <<= np.uint32(hb)
        x |= lo
    if bits and keys[K.SHUFFLE_ROUNDS] & 1:
        x ^= (x < 2).astype(np.uint32)
    return x


def feistel_inverse(x: np.ndarray, bits: int, keys: list[int]) -> np.ndarray:
    """The inverse of ``feistel`` (same bits and keys), in place: the swap, then the rounds backwards."""
    if bits and keys[K.SHUFFLE_ROUNDS] & 1:
        x ^= (x < 2).astype(np.uint32)
    for k, (hb, lb) in zip(reversed(keys[:K.SHUFFLE_ROUNDS]), reversed(_round_widths(bits))):
        lo = x >> np.uint32(hb)  # the round put its low part on top and (high xor mix) below it
        h = _mix(lo, k, hb)
        x &= np.uint32((1 << hb) - 1)
        x ^= h
        x <<= np.uint32(lb)
        x |= lo
    return x


def _cycle_walk(f, start: int, stop: int, n: int, keys: list[int]) -> np.ndarray:
    """Images of ``start..stop-1`` under ``f`` (``feistel`` or its inverse) on the bits of n - 1, applied again
    while a value lies outside [0, n) (cycle walking; fewer than 2 passes on average): a bijection of [0, n)."""
    bits = (n - 1).bit_length()
    x = f(np.arange(start, stop, dtype=np.uint32), bits, keys)
    out = np.flatnonzero(x >= n)
    while out.size:
        y = f(x[out], bits, keys)
        x[out] = y
        out = out[y >= n]
    return x


def shuffle_positions(start: int, stop: int, n: int, keys: list[int]) -> np.ndarray:
    """Positions of samples ``start..stop-1`` under the keyed bijection of [0, n)."""
    return _cycle_walk(feistel, start, stop, n, keys)


def shuffle_preimages(start: int, stop: int, n: int, keys: list[int]) -> np.ndarray:
    """The samples at positions ``start..stop-1`` under the keyed bijection of [0, n) (its inverse)."""
    return _cycle_walk(feistel_inverse, start, stop, n, keys)


# Positions per pass of the shuffle on the CPU: its temporaries (~20 bytes a position) stay in the core's
# cache for the most part (larger passes are faster: each costs ~100 NumPy calls), and bounded (~5 MB).
_SHUFFLE_CHUNK = 1 << 18
_SPLIT_CHUNK = 1 << 16  # positions per split into kept and dropped (in cache)


def shuffled_order(keep: torch.Tensor, seed: int, epoch: int, dropped: bool = True) -> torch.Tensor:
    """Every sample index: the kept ones first, in the order of their images under the keyed bijection of
    (seed, epoch), then the others in the same order (``dropped=False``: the kept ones only).  No sort, and
    the order of two kept samples does not depend on which other samples are kept.  The positions are walked
    in order and each one's sample found by the inverse bijection: no N-sized temporaries besides the result."""
    n = keep.numel()
    if n > K.SHUFFLE_MAX_N:
        raise ValueError(f"the shuffle handles up to {K.SHUFFLE_MAX_N} samples, got {n}")
    keys = shuffle_keys(seed, epoch)
    kept = keep.cpu().numpy()
    n_keep = int(np.count_nonzero(kept))
    order = np.empty(n if dropped else n_keep, dtype=np.int64)
    at_kept, at_dropped = 0, n_keep
    for lo in range(0, n, _SHUFFLE_CHUNK):
        samples = shuffle_preimages(lo, min(n, lo + _SHUFFLE_CHUNK), n, keys)
        for part in range(0, samples.size, _SPLIT_CHUNK):  # np.compress: far faster than a boolean index
            sample = samples[part:part + _SPLIT_CHUNK]
            flag = kept[sample]
            a = np.compress(flag, sample)
            order[at_kept:at_kept + a.size] = a
            at_kept += a.size
            if dropped:
                b = np.compress(~flag, sample)
                order[at_dropped:at_dropped + b.size] = b
                at_dropped += b.size
    return torch.from_numpy(order).to(keep.device)


def finalize_reference(cls, prio, chosen, stats: PolicyStats, policy: int, seed: int, epoch: int, out=None):
    """Keep mask and weights for every sample (``chosen``: the ranked policies' choice); the weights written
    into ``out`` (float32 N) when given."""
    n = cls.numel()
    dev = cls.device
    if policy not in (K.POLICY_FULL, K.POLICY_INFOBATCH, K.POLICY_RANKED):
        raise ValueError(f"unknown policy code {policy}")
    keep = torch.empty(n, dtype=torch.bool, device=dev)
    w = torch.ones(n, dtype=torch.float32, device=dev) if out is None else out.fill_(1.0)
    for lo, hi in spans(n, dev, _FINALIZE_CHUNK, _WORDS_CHUNK_DEVICE):  # a chunk at a time: temporaries bounded
        c = cls[lo:hi]
        if policy == K.POLICY_FULL:
            keep[lo:hi] = c != K.CLS_NOISY
        elif policy == K.POLICY_RANKED:
            keep[lo:hi] = (c == K.CLS_UNSEEN) | ((c == K.CLS_ELIGIBLE) & chosen[lo:hi])
        else:
            low = (c == K.CLS_ELIGIBLE) & (prio[lo:hi] < stats.mean_p)
            drop = torch.zeros(hi - lo, dtype=torch.bool, device=dev)
            if dev.type == "cpu":  # the words of the low samples only (a CPU pass may count them)
                at = torch.nonzero(low)[:, 0]
                drop[at] = uniform_from_word(words_at(seed, at + lo, epoch, K.STREAM_DROP)) < stats.drop_prob
            else:
                r0 = words_span(seed, lo, hi, epoch, K.STREAM_DROP, dev)[0]
                drop = low & (uniform_from_word(r0) < stats.drop_prob)
            k = (c != K.CLS_NOISY) & ~drop
            keep[lo:hi] = k
            w[lo:hi] = torch.where(low & k, stats.up_weight, 1.0)
    return keep, w
