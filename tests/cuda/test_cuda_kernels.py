"""CUDA checks of the compiled kernels (run by tests/test_cuda.py with TRITON_INTERPRET=0)."""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastprune as fp
from conftest import make_state
from test_select_kernel import assert_same_up_to_rounding

from fastprune.kernels import SampleState
from fastprune.kernels import common as K
from fastprune.kernels import reference as R
from fastprune.kernels import selection as S
from fastprune.kernels.step import launch_step

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and compiled kernels (TRITON_INTERPRET=0)")

DEV = "cuda"


def assert_evidence_equal(a: SampleState, b: SampleState):
    """The model's evidence columns: the margin sums within rounding, the rest exactly."""
    torch.testing.assert_close(a.margin_sum.cpu(), b.margin_sum.cpu(), rtol=1e-5, atol=1e-5)
    for name in ("margin_count", "pred", "label"):
        assert torch.equal(getattr(a, name).cpu(), getattr(b, name).cpu()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,C", [(1, 10), (257, 100), (1024, 1000), (300, 1003), (64, 32000), (4, 262144)])
@pytest.mark.parametrize("mode", [K.EMB_NONE, K.EMB_TABLE, K.EMB_BATCH])
def test_compiled_step_matches_reference(B, C, dtype, mode):
    torch.manual_seed(B + C)
    N, D = 2 * B + 3, 512
    logits = (torch.randn(B, C, device=DEV) * 3).to(dtype)
    labels = torch.randint(0, C, (B,), device=DEV)
    idx = torch.randperm(N, device=DEV)[:B]
    emb = torch.randn(N if mode == K.EMB_TABLE else B, D, device=DEV).half() if mode else None
    text = torch.randn(C, D, device=DEV).half() if mode else None
    s1 = make_state(N, device=DEV)
    s2 = s1.clone()
    g1 = torch.empty_like(logits)
    g2 = torch.empty(B, C, dtype=torch.float64, device=DEV)
    kw = dict(step_id=0, ema=0.9, scale=1 / B, label_smoothing=0.1, emb_mode=mode, emb=emb, text=text)
    o1 = launch_step(logits, labels, idx, grad=g1, state=s1, **kw)
    o2 = R.step_reference(logits, labels, idx, grad=g2, compute_dtype=torch.float64, state=s2, **kw)
    torch.testing.assert_close(o1.ce.double(), o2.ce, rtol=1e-5, atol=1e-5)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(g1.double(), g2, rtol=tol, atol=tol / B)
    torch.testing.assert_close(s1.scores, s2.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1.consistency, s2.consistency, rtol=1e-4, atol=1e-4)
    assert torch.equal(s1.visits, s2.visits)
    torch.testing.assert_close(o1.margin, o2.margin, rtol=1e-5, atol=1e-5)
    assert torch.equal(o1.pred, o2.pred)
    assert_evidence_equal(s1, s2)


@pytest.mark.parametrize("mode", [K.EMB_NONE, K.EMB_TABLE, K.EMB_BATCH])
def test_duplicates_settle_the_same_way_every_time(mode):
    """Thousands of programs race for 64 samples: the first row of each must win, bitwise the same on every
    launch (the GPU's scheduling decides who claims first), and the error example is the smallest index."""
    torch.manual_seed(7)
    B, C, N, D = 4096, 1000, 64, 128
    logits = (torch.randn(B, C, device=DEV) * 2).bfloat16()
    labels = torch.randint(0, C, (B,), device=DEV)
    idx = torch.randint(0, N, (B,), device=DEV)
    emb = torch.randn(N if mode == K.EMB_TABLE else B, D, device=DEV).half() if mode else None
    text = torch.randn(C, D, device=DEV).half() if mode else None
    base = make_state(N, device=DEV)
    base.visits[: N // 2] = 3  # half seen before (EMA), half first visits
    base.scores[: N // 2] = 1.5
    base.consistency[: N // 2] = 0.25
    base.margin_sum[: N // 2] = 2.0
    base.margin_count[: N // 2] = 3
    kw = dict(step_id=5, ema=0.9, scale=1 / B, emb_mode=mode, emb=emb, text=text)
    runs = []
    for _ in range(20):
        s = base.clone()
        launch_step(logits, labels, idx, state=s, **kw)
        assert s.dups.item() == 0
        runs.append(s)
    for s in runs[1:]:
        for key, col in s.columns().items():
            assert torch.equal(col, getattr(runs[0], key)), key
        assert torch.equal(s.errors, runs[0].errors)
    ref = base.to("cpu")
    R.step_reference(logits.cpu(), labels.cpu(), idx.cpu(), compute_dtype=torch.float64, state=ref,
                     **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
    got = runs[0]
    torch.testing.assert_close(got.scores.cpu(), ref.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.consistency.cpu(), ref.consistency, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.visits.cpu(), ref.visits) and torch.equal(got.stamp.cpu(), ref.stamp)
    assert torch.equal(got.errors.cpu(), ref.errors)  # counts, and the example: the smallest duplicate
    assert_evidence_equal(got, ref)


def test_int32_labels_and_indices_address_beyond_2_to_the_31():
    D, stride = 16, 1 << 12
    n = (1 << 31) // stride + 8
    table = torch.zeros(n * stride, dtype=torch.float16, device=DEV).as_strided((n, D), (stride, 1))
    far = torch.tensor([n - 2, 3], dtype=torch.int32, device=DEV)
    rows = torch.randn(2, D, device=DEV).half()
    table[far.long()] = rows
    text = torch.randn(7, D, device=DEV)
    labels = torch.tensor([5, 2], dtype=torch.int32, device=DEV)
    s = make_state(n, device=DEV)
    launch_step(torch.randn(2, 7, device=DEV), labels, far, state=s, step_id=0, ema=0.9, scale=0.5,
                emb_mode=K.EMB_TABLE, emb=table, text=text.half())
    expected = F.cosine_similarity(rows.float(), text.half()[labels.long()].float(), dim=1)
    torch.testing.assert_close(s.consistency[far.long()], expected, rtol=1e-3, atol=1e-3)


def test_step_never_synchronises():
    torch.manual_seed(0)
    n, c = 4096, 1000
    model = torch.nn.Linear(256, c).cuda()
    pruner = fp.DynamicPruner(n, c, epochs=3, image_emb=torch.randn(n, 512, device=DEV).half(),
                              text_emb=torch.randn(c, 512, device=DEV).half(), device=DEV)
    order = pruner.epoch_indices.to(DEV)
    x = torch.randn(256, 256, device=DEV)
    for warm in (True, False):
        if not warm:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(0, 1024, 256):
                idx = order[i:i + 256]
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(x)
                loss = pruner.step(logits, idx % c, idx)
                loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_async_errors_surface_within_a_few_steps():
    pruner = fp.DynamicPruner(100, 10, epochs=2, device=DEV)
    logits = torch.randn(8, 10, device=DEV, requires_grad=True)
    idx = torch.arange(8, device=DEV)
    bad = idx.clone()
    bad[3] = 10
    with pytest.raises(ValueError, match=r"labels: value 10 is outside \[0, 10\)"):
        for _ in range(50):
            pruner.step(logits, bad, idx)
            torch.cuda.synchronize()
    sync = fp.DynamicPruner(100, 10, epochs=2, device=DEV, validate="sync")
    with pytest.raises(IndexError, match=r"indices: value 100 is outside"):
        sync.step(logits, idx, torch.arange(93, 101, device=DEV))


@pytest.mark.parametrize("policy", ["full", "topk", "random", "infobatch"])
def test_cuda_selection_matches_cpu_reference(policy):
    g = torch.Generator().manual_seed(1)
    n = 100_003
    scores = torch.rand(n, generator=g) * 5
    visits = (torch.rand(n, generator=g) > 0.1).int()
    cons = torch.randn(n, generator=g) * 0.1
    kw = dict(use_consistency=True, policy=policy, keep_ratio=0.6, noise_ratio=0.05, semantic_weight=1.0,
              max_drop=0.9, seed=3, epoch=2)
    from fastprune.kernels import select_epoch

    a = select_epoch(scores.cuda(), visits.cuda(), cons.cuda(), **kw)
    b = S.select_reference(scores, visits, cons, **kw)
    a = S.Selection(**{k: v.cpu() for k, v in vars(a).items()})
    assert_same_up_to_rounding(b, a, visits, policy, seed=3, epoch=2)  # exact where kernels/select.py says so


def test_pruner_epoch_on_cuda():
    n, c = 50_000, 100
    # keep 0.6 of random losses needs a drop probability of about 0.8 among the below-mean half, under
    # max_drop = 0.9: the kept fraction is then keep_ratio (at 0.5 it would be capped by max_drop instead)
    pruner = fp.DynamicPruner(n, c, epochs=4, keep_ratio=0.6, device=DEV)
    order = pruner.epoch_indices.to(DEV)
    for i in range(0, n, 4096):
        idx = order[i:i + 4096]
        logits = torch.randn(idx.numel(), c, device=DEV, requires_grad=True)
        pruner.step(logits, idx % c, idx).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nxt = pruner.next_epoch()
    assert abs(nxt.numel() / n - 0.6) < 0.02
    assert pruner.weights.max() > 1
    ce = F.cross_entropy(torch.randn(3, c), torch.arange(3))
    assert torch.isfinite(ce)


def test_noise_mixtures_on_cuda_do_not_depend_on_sample_order():
    """Per-class histograms count exactly on the device: the fit is the same bits in any order, and close to
    the CPU's."""
    from fastprune import noise as fpn

    g = torch.Generator().manual_seed(0)
    n, c = 200_000, 1000
    cls = torch.randint(0, c, (n,), generator=g)
    wrong = torch.rand(n, generator=g) < 0.3
    x = torch.where(wrong, torch.randn(n, generator=g) - 3, 2 * torch.randn(n, generator=g) + 4)
    valid = torch.rand(n, generator=g) < 0.97
    perm = torch.randperm(n, generator=g)
    fit = fpn.fit_mixtures(x.to(DEV), cls.to(DEV), valid.to(DEV), c)
    again = fpn.fit_mixtures(x[perm].to(DEV), cls[perm].to(DEV), valid[perm].to(DEV), c)
    assert torch.equal(fit, again)
    torch.testing.assert_close(fit.cpu(), fpn.fit_mixtures(x, cls, valid, c), rtol=1e-6, atol=1e-9)


def test_compiled_shuffle_and_mixture_kernels_match_the_cpu():
    """The sort-free shuffle (bit for bit) and the one-launch EM (to float64 rounding) against the CPU."""
    import fastprune.noise as fpn
    from fastprune.kernels.mixture import em_triton
    from fastprune.kernels.select import shuffle_triton

    for n in (1, 1000, 1 << 20, 3_000_017):
        keep = torch.rand(n, device=DEV) < 0.7
        assert torch.equal(shuffle_triton(keep, 42, 7).cpu(), R.shuffled_order(keep.cpu(), 42, 7))
    g = torch.Generator().manual_seed(0)
    centres = torch.linspace(-3, 4, fpn.BINS, dtype=torch.float64)[None, :].repeat(1000, 1)
    w = torch.poisson(40 * torch.exp(-(centres - 2.5) ** 2) + 10 * torch.exp(-(centres + 2) ** 2), generator=g)
    n1 = w.sum(1).clamp_min(1.0)
    ref = fpn._em(centres, w, n1, fpn.EM_ITERATIONS)
    got = em_triton(centres.to(DEV), w.to(DEV), n1.to(DEV), fpn.EM_ITERATIONS)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
