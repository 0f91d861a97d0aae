"""CUDA checks of the compiled kernels (run by tests/test_cuda.py with TRITON_INTERPRET=0)."""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastprune as fp
from fastprune.kernels import common as K
from fastprune.kernels import reference as R
from fastprune.kernels.step import launch_step

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and compiled kernels (TRITON_INTERPRET=0)")

DEV = "cuda"


def state(n):
    return dict(scores=torch.zeros(n, device=DEV), visits=torch.zeros(n, dtype=torch.int32, device=DEV),
                consistency=torch.zeros(n, device=DEV), weights=torch.rand(n, device=DEV) + 0.5,
                stamp=torch.full((n,), -1, dtype=torch.int32, device=DEV),
                errors=torch.zeros(K.ERR_SLOTS, dtype=torch.int64, device=DEV))


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
    s1, s2 = state(N), None
    s2 = {k: v.clone() for k, v in s1.items()}
    g1 = torch.empty_like(logits)
    g2 = torch.empty(B, C, dtype=torch.float64, device=DEV)
    kw = dict(step_id=0, ema=0.9, scale=1 / B, label_smoothing=0.1, emb_mode=mode, emb=emb, text=text)
    o1 = launch_step(logits, labels, idx, grad=g1, **s1, **kw)
    o2 = R.step_reference(logits, labels, idx, grad=g2, compute_dtype=torch.float64, **s2, **kw)
    torch.testing.assert_close(o1.ce.double(), o2.ce, rtol=1e-5, atol=1e-5)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(g1.double(), g2, rtol=tol, atol=tol / B)
    torch.testing.assert_close(s1["scores"], s2["scores"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1["consistency"], s2["consistency"], rtol=1e-4, atol=1e-4)
    assert torch.equal(s1["visits"], s2["visits"])


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
    kw = dict(use_consistency=False, policy=policy, keep_ratio=0.6, noise_ratio=0.0, semantic_weight=1.0,
              max_drop=0.9, seed=3, epoch=2)
    from fastprune.kernels import select_epoch

    a = select_epoch(scores.cuda(), visits.cuda(), cons.cuda(), **kw)
    b = R.select_reference(scores, visits, cons, **kw)
    if policy == "infobatch":  # the mean threshold may differ in its last bit across devices
        assert abs(int(a.n_keep) - int(b.n_keep)) <= 2
    else:
        assert torch.equal(a.order.cpu(), b.order)
        assert torch.equal(a.weights.cpu(), b.weights)


def test_pruner_epoch_on_cuda():
    n, c = 50_000, 100
    pruner = fp.DynamicPruner(n, c, epochs=4, keep_ratio=0.5, device=DEV)
    order = pruner.epoch_indices.to(DEV)
    for i in range(0, n, 4096):
        idx = order[i:i + 4096]
        logits = torch.randn(idx.numel(), c, device=DEV, requires_grad=True)
        pruner.step(logits, idx % c, idx).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nxt = pruner.next_epoch()
    assert abs(nxt.numel() / n - 0.5) < 0.02
    assert pruner.weights.max() > 1
    ce = F.cross_entropy(torch.randn(3, c), torch.arange(3))
    assert torch.isfinite(ce)
