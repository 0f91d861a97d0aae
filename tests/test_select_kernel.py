"""Epoch-selection kernels (interpreter) against the reference, and the shared Philox generator."""

import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from fastprune.kernels import common as K
from fastprune.kernels import reference as R
from fastprune.kernels import selection as S
from fastprune.kernels.select import finalize_triton, philox_words, priority_triton, shuffle_triton



def random_state(n, seed=0, unseen=0.2):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=g) * 4 + 0.01
    visits = (torch.rand(n, generator=g) > unseen).to(torch.int32) * torch.randint(1, 5, (n,), generator=g,
                                                                                   dtype=torch.int32)
    cons = torch.randn(n, generator=g) * 0.05 + 0.25
    return scores, visits, cons


def select_both(scores, visits, cons, **kw):
    kernel = S.select_reference(scores, visits, cons, priority=priority_triton, finalize=finalize_triton,
                                shuffle=shuffle_triton, **kw)
    ref = S.select_reference(scores, visits, cons, **kw)
    return kernel, ref


@pytest.mark.parametrize("policy", ["full", "infobatch", "topk", "random"])
@pytest.mark.parametrize("use_consistency,noise", [(False, 0.0), (True, 0.0), (True, 0.1)])
@pytest.mark.parametrize("n", [1, 7, 1025, 3001])
def test_select_matches_reference(n, policy, use_consistency, noise):
    scores, visits, cons = random_state(n, seed=n)
    kw = dict(use_consistency=use_consistency, policy=policy, keep_ratio=0.6, noise_ratio=noise,
              semantic_weight=1.5, max_drop=0.9, seed=2**40 + 17, epoch=5)
    a, b = select_both(scores, visits, cons, **kw)
    k = int(b.n_keep)
    assert b.order.numel() == k  # the CPU's order is the kept samples only; the GPU's passes write every index
    assert torch.equal(a.order[:k], b.order)
    assert torch.equal(a.keep, b.keep)
    assert torch.equal(a.weights, b.weights)
    assert torch.equal(a.noisy, b.noisy)
    torch.testing.assert_close(a.priority, b.priority)
    assert a.n_keep == b.n_keep == a.keep.sum()
    kept = a.order[: int(a.n_keep)]
    assert a.keep[kept].all() and kept.unique().numel() == kept.numel()


def test_philox_known_answers():
    """Philox-4x32-10 test vectors published with Random123."""
    cases = [
        ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for (k0, k1), ctr, expected in cases:
        out = R.philox(k0, k1, *(torch.tensor(c) for c in ctr))
        assert tuple(int(x) for x in out) == expected


@triton.jit
def _philox_both(out_ptr, seed, k0, k1, epoch, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK).to(tl.int64)
    a0, a1, _, _ = tl.randint4x(seed, i.to(tl.int32))
    b0, b1 = philox_words(k0, k1, i, epoch, 0)
    tl.store(out_ptr + i, a0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + BLOCK + i, a1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 2 * BLOCK + i, b0.to(tl.int64))
    tl.store(out_ptr + 3 * BLOCK + i, b1.to(tl.int64))


def test_kernel_philox_matches_tritons_own_randint():
    """Our in-kernel Philox equals tl.randint4x for counter (i, 0, 0, 0)."""
    seed = 0x12345678_9ABCDEF
    k0, k1 = K.seed_keys(seed)
    out = torch.zeros(4 * 64, dtype=torch.int64)
    _philox_both[(1,)](out, seed, k0 - (1 << 32) if k0 >= 1 << 31 else k0, k1, 0, BLOCK=64)
    a0, a1, b0, b1 = out.view(4, 64)
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    r0, r1 = R.random_words(seed, 64, 0, 0, "cpu")
    assert torch.equal(r0, b0) and torch.equal(r1, b1)


def test_random_streams_are_independent_and_uniform():
    r0, _ = R.random_words(7, 200_000, 3, K.STREAM_DROP, "cpu")
    s0, _ = R.random_words(7, 200_000, 3, K.STREAM_SHUFFLE, "cpu")
    t0, _ = R.random_words(7, 200_000, 4, K.STREAM_DROP, "cpu")
    u = R.uniform_from_word(r0)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    for other in (s0, t0):
        assert (r0 == other).float().mean() < 1e-3
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 600), keep=st.floats(0.05, 1.0), policy=st.sampled_from(["infobatch", "topk", "random"]),
       noise=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**63 - 1), epoch=st.integers(0, 2**31))
def test_select_hypothesis(n, keep, policy, noise, seed, epoch):
    scores, visits, cons = random_state(n, seed=seed % 1000)
    kw = dict(use_consistency=True, policy=policy, keep_ratio=keep, noise_ratio=noise, semantic_weight=1.0,
              max_drop=0.9, seed=seed, epoch=epoch)
    a, b = select_both(scores, visits, cons, **kw)
    assert torch.equal(a.order[:int(b.n_keep)], b.order) and torch.equal(a.weights, b.weights)
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_the_cpus_numpy_philox_is_the_reference_philox():
    """The CPU draws its words with uint64 NumPy products; the torch version (other devices, and the kernels'
    reference) with 16-bit halves: the same words, counters and keys up to 2**32 - 1."""
    g = torch.Generator().manual_seed(5)
    ctr = [torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64) for _ in range(4)]
    for c in ctr:
        c[:3] = torch.tensor([0, 1, 2**32 - 1])
    for k0, k1 in ((0, 0), (2**32 - 1, 2**32 - 1), K.seed_keys(2**63 + 11)):
        want = R.philox(k0, k1, *ctr)
        got = R.philox_numpy(k0, k1, *(c.numpy().astype(np.uint64) for c in ctr))
        assert all(torch.equal(w, torch.from_numpy(x.astype(np.int64))) for w, x in zip(want, got))
    start, stop = 2**32 - 5, 2**32 + 5  # counters whose high word is set
    w0, w1 = R.words_span(9, start, stop, 2**31 + 1, K.STREAM_DROP, "cpu")
    i = torch.arange(start, stop)
    want = R.philox(*K.seed_keys(9), i & R._U32, i >> 32, 2**31 + 1, K.STREAM_DROP)
    assert torch.equal(w0, want[0]) and torch.equal(w1, want[1])


def test_random_words_do_not_depend_on_the_chunking(monkeypatch):
    whole = R.random_words(12345, 50, 3, K.STREAM_SHUFFLE, "cpu")
    monkeypatch.setattr(R, "_WORDS_CHUNK", {"cpu": 7})  # 50 = 7 * 7 + 1: a masked tail
    chunked = R.random_words(12345, 50, 3, K.STREAM_SHUFFLE, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    assert whole[0].unique().numel() > 45  # words, not a constant


def test_counts_that_become_sizes_are_exact_beyond_2_to_the_24():
    """floor(noise_ratio * n_seen) for 100M samples: float32 (the default for int * float) gave 30,000,004."""
    n = torch.tensor(100_000_007)
    assert int(S.fraction_of(n, 0.3)) == 30_000_002
    assert int(torch.floor(n * 0.3)) != 30_000_002  # the float32 product this replaces
    mask = torch.zeros(1 << 25, dtype=torch.bool)
    mask[:3] = True
    values = torch.full((1 << 25,), 1e30)
    values[:3] = torch.tensor([1.0, 2.0, 4.0])
    assert float(S.masked_mean(values, mask)) == pytest.approx(7 / 3, rel=1e-7)


def assert_same_up_to_rounding(a, b, visits, policy: str, seed: int, epoch: int, ulps: int = 8) -> int:
    """Two selections from the same state on two devices obey kernels/select.py's contract: the noise filter,
    ``full`` and ``random`` are identical; ``topk`` and ``infobatch`` differ only for samples within ``ulps``
    float32 ulps of their threshold (infobatch: or whose draw lies between the two drop probabilities), and
    samples kept by both come in the same order.  Returns how many decisions differ."""
    assert torch.equal(a.noisy, b.noisy)
    if policy in ("full", "random"):
        assert torch.equal(a.order, b.order) and torch.equal(a.weights, b.weights)
        return 0
    n = visits.numel()
    changed = a.keep ^ b.keep
    elig = (visits > 0) & ~a.noisy
    tol = ulps * 2.0 ** -23 * a.priority[elig].abs().max()
    if policy == "topk":
        kth = a.priority[elig].sort(descending=True).values[int(a.n_keep) - int((visits == 0).sum()) - 1]
        allowed = (a.priority - kth).abs() <= tol
    else:
        mean = a.priority[elig].double().mean().float()
        u = R.uniform_from_word(R.random_words(seed, n, epoch, K.STREAM_DROP, "cpu")[0])
        lo, hi = sorted((float(a.drop_prob), float(b.drop_prob)))
        allowed = ((a.priority - mean).abs() <= tol) | ((u >= lo - 1e-7) & (u <= hi + 1e-7))
    assert not (changed & ~allowed).any(), f"{int((changed & ~allowed).sum())} decisions changed away from a threshold"
    same = a.keep & b.keep  # samples kept on both devices come in the same order
    assert torch.equal(a.order[same[a.order]], b.order[same[b.order]])
    up = abs(1 / (1 - float(a.drop_prob)) - 1 / (1 - float(b.drop_prob)))  # infobatch's unbiasing weight
    assert (a.weights[~changed] - b.weights[~changed]).abs().max() <= up + 1e-6
    return int(changed.sum())


@pytest.mark.parametrize("policy", ["full", "random", "topk", "infobatch"])
def test_what_another_device_may_change(policy):
    """The contract of kernels/select.py, with another device modelled by priorities a few ulps off (exp and
    summation order differ there) and samples placed exactly on the thresholds."""
    n = 21_000
    _, visits, _ = random_state(n, seed=4)
    scores = (torch.arange(n) % 3 + 1).float()  # ties: many samples sit exactly on the k-th priority
    cons = torch.full((n,), 0.25)
    noise = 0.1
    if policy == "infobatch":  # every sample eligible; 30 sit exactly on the mean priority
        visits, noise = torch.ones(n, dtype=torch.int32), 0.0
        scores = torch.where(torch.arange(n) < 30, 2.0, torch.where(torch.arange(n) % 2 == 0, 1.0, 3.0))
    kw = dict(use_consistency=True, policy=policy, keep_ratio=0.6, noise_ratio=noise, semantic_weight=1.5,
              max_drop=0.9, seed=9, epoch=3)
    wobble = torch.randint(-4, 5, (n,), generator=torch.Generator().manual_seed(1)).float() * 2.0 ** -23

    def other_device(*args, **kwargs):
        cls, prio = R.priority_reference(*args, **kwargs)
        return cls, prio * (1 + wobble)

    a = S.select_reference(scores, visits, cons, **kw)
    b = S.select_reference(scores, visits, cons, priority=other_device, **kw)
    changed = assert_same_up_to_rounding(a, b, visits, policy, seed=9, epoch=3)
    if policy in ("topk", "infobatch"):
        assert 0 < changed < n // 4  # the samples on the thresholds do move (the test bites); the rest stays
    if noise:
        assert a.noisy.any()


def _first_k_by_sort(values, mask, k, descending):
    """The set the radix selection must find: the first k of a stable sort of the masked values."""
    fill = float("-inf") if descending else float("inf")
    if not values.is_floating_point():
        fill = torch.iinfo(torch.int64).min if descending else torch.iinfo(torch.int64).max
    order = torch.sort(torch.where(mask, values, torch.full_like(values, fill)), descending=descending,
                       stable=True).indices
    out = torch.zeros(values.numel(), dtype=torch.bool)
    out[order[:max(0, min(int(k), int(mask.sum())))]] = True
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(-2, 320), levels=st.sampled_from([1, 3, 50, 0]),
       descending=st.booleans(), words=st.booleans(), seed=st.integers(0, 2**31),
       chunk=st.sampled_from([7, 64, 1 << 16]))
def test_radix_selection_finds_the_first_k_of_a_stable_sort(n, k, levels, descending, words, seed, chunk):
    """Ties by index, all-equal values, N = 1, k <= 0, k beyond the masked count, -0.0 beside 0.0, negative
    values, uint32 words, chunk tails: the same set as a sort."""
    g = torch.Generator().manual_seed(seed)
    if words:
        values = torch.randint(0, 2**32 if not levels else levels, (n,), generator=g, dtype=torch.int64)
    else:
        values = torch.randn(n, generator=g) * 3
        if levels:
            values = (values * levels).round() / levels  # ties
        values[torch.rand(n, generator=g) < 0.1] = -0.0
    mask = torch.rand(n, generator=g) < 0.8
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "_SELECT_CHUNK", {"cpu": chunk})
        got = S.smallest(values, mask, torch.tensor(k), descending=descending)
    assert torch.equal(got, _first_k_by_sort(values, mask, k, descending))


def test_masked_median_is_the_lower_median():
    g = torch.Generator().manual_seed(4)
    for n in (1, 2, 7, 1000):
        values = (torch.randn(n, generator=g) * 4).round()  # ties
        mask = torch.rand(n, generator=g) < 0.7
        got = S.masked_median(values, mask)
        if mask.any():
            assert got == values[mask].median()
        else:
            assert torch.isnan(got)


# --------------------------------------------------------------------------- the shuffle


def _order(n, seed, epoch, keep=None, shuffle=R.shuffled_order):
    keep = torch.ones(n, dtype=torch.bool) if keep is None else keep
    return shuffle(keep, seed, epoch)


@pytest.mark.parametrize("bits", range(0, 21))
def test_feistel_is_a_bijection_of_every_power_of_two(bits):
    keys = R.shuffle_keys(bits * 7919, 3)
    x = R.feistel(np.arange(1 << bits, dtype=np.uint32), bits, keys)
    assert np.array_equal(np.sort(x), np.arange(1 << bits, dtype=np.uint32))


@pytest.mark.parametrize("bits", range(0, 21))
def test_the_inverse_feistel_undoes_it(bits):
    keys = R.shuffle_keys(bits * 104729, 5)
    x = np.arange(1 << bits, dtype=np.uint32)
    assert np.array_equal(R.feistel_inverse(R.feistel(x.copy(), bits, keys), bits, keys), x)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 3001])
def test_the_order_is_the_kept_samples_by_their_position(n):
    """The CPU walks positions through the inverse bijection; by definition the order is each group of samples
    by its image under the forward one (what the GPU's kernels scatter)."""
    keep = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.6
    keys = R.shuffle_keys(77, 2)
    position = torch.from_numpy(R.shuffle_positions(0, n, n, keys).astype(np.int64))
    by_position = torch.argsort(position)
    expected = torch.cat([by_position[keep[by_position]], by_position[~keep[by_position]]])
    assert torch.equal(R.shuffled_order(keep, 77, 2), expected)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 1000, 1023, 1024, 1025, 3001])
def test_shuffle_kernel_matches_the_reference(n):
    g = torch.Generator().manual_seed(n)
    for keep in (torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), torch.rand(n, generator=g) < 0.3):
        for seed, epoch in ((0, 0), (2**63 + 5, 2**31 + 3)):
            ref = _order(n, seed, epoch, keep)
            assert torch.equal(_order(n, seed, epoch, keep, shuffle=shuffle_triton), ref)
            k = int(keep.sum())
            assert torch.equal(ref.sort().values, torch.arange(n))  # a permutation of every sample
            assert keep[ref[:k]].all() and not keep[ref[k:]].any()  # the kept ones first


def test_shuffle_does_not_depend_on_the_chunking(monkeypatch):
    keep = torch.rand(5000, generator=torch.Generator().manual_seed(1)) < 0.5
    whole = R.shuffled_order(keep, 11, 4)
    monkeypatch.setattr(R, "_SHUFFLE_CHUNK", 999)
    assert torch.equal(R.shuffled_order(keep, 11, 4), whole)
    monkeypatch.setattr(R, "_SPLIT_CHUNK", 250)
    assert torch.equal(R.shuffled_order(keep, 11, 4), whole)


def test_kept_samples_keep_their_order_when_others_come_and_go():
    """What lets two devices that differ on a threshold sample still agree on everyone else's order."""
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(777, generator=g) < 0.6
    fewer = keep & (torch.rand(777, generator=g) < 0.9)
    a, b = R.shuffled_order(keep, 5, 9), R.shuffled_order(fewer, 5, 9)
    assert torch.equal(a[fewer[a]], b[: int(fewer.sum())])
    assert not torch.equal(R.shuffled_order(keep, 5, 10), a)  # another epoch, another order


def _worst_z(counts: torch.Tensor, p: float, draws: int) -> float:
    """The largest |z| of cell counts that are each Binomial(draws, p) under a uniform shuffle."""
    return float(((counts - draws * p).abs() / (draws * p * (1 - p)) ** 0.5).max())


def _draws(n, draws, ours: bool) -> torch.Tensor:
    if ours:
        return torch.stack([_order(n, 1234, e) for e in range(draws)])
    g = torch.Generator().manual_seed(1234)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(draws)])


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 64])
def test_shuffle_looks_as_uniform_as_randperm(n):
    """Positions of every sample, neighbours, ascending runs and parity, over 3,000 epochs, judged by the same
    bounds as torch.randperm's (5 standard deviations of each statistic)."""
    draws = 3000
    for ours in (True, False):
        perms = _draws(n, draws, ours)
        who = "ours" if ours else "randperm"
        pos = torch.zeros(n, n)  # sample a at position b: probability 1/n per draw
        pos.index_put_((perms.flatten(), torch.arange(n).repeat(draws)), torch.ones(n * draws), accumulate=True)
        assert _worst_z(pos, 1 / n, draws) < 5, (who, "positions")
        pairs = torch.zeros(n, n)  # sample a directly followed by sample b: probability 1/n per draw
        pairs.index_put_((perms[:, :-1].flatten(), perms[:, 1:].flatten()), torch.ones(draws * (n - 1)),
                         accumulate=True)
        assert _worst_z(pairs[~torch.eye(n, dtype=torch.bool)], 1 / n, draws) < 5, (who, "pairs")
        runs = 1 + (perms[:, 1:] < perms[:, :-1]).sum(1).double()  # ascending runs: mean (n+1)/2, var (n+1)/12
        assert abs(runs.mean() - (n + 1) / 2) < 5 * ((n + 1) / 12 / draws) ** 0.5, (who, "runs")
        inversions = (perms[:, :, None] > perms[:, None, :]).triu(1).sum((1, 2))
        odd = (inversions % 2).double().mean()
        assert abs(odd - 0.5) < 5 * (0.25 / draws) ** 0.5, (who, "parity")
