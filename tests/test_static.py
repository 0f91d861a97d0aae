"""Static pruning: influence estimates against retraining, the pruning solver, baselines, errors."""

import numpy as np
import pytest
import torch

from fastprune.static import (el2n_scores, fit_head, forgetting_scores, influence_prune, influence_scores,
                              random_subset)
from fastprune.static.influence import _influence


def spearman(a, b):
    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data / 16.0), torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    return x[tr], y[tr], x[te], y[te]


def small_problem(n=14, f=3, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


def test_single_removals_match_brute_force_leave_one_out():
    x, y = small_problem(n=80)  # large enough that one removal is a small perturbation (first order holds)
    head = fit_head(x, y, l2=0.05)
    inf = _influence(x, y, head, 4096)
    est, act = [], []
    for i in range(0, len(y), 4):
        keep = torch.arange(len(y)) != i
        # retrain on N-1 samples with the same total regularisation scale as the estimate assumes
        other = fit_head(x[keep], y[keep], num_classes=3, l2=0.05 * len(y) / (len(y) - 1))
        act.append((other.weight - head.weight).numpy().ravel())
        est.append((inf.vectors[i] / len(y)).numpy())
    act, est = np.array(act), np.array(est)
    rel = np.linalg.norm(act - est, axis=1) / np.linalg.norm(act, axis=1)
    assert np.median(rel) < 0.1, rel
    assert spearman(np.linalg.norm(est, axis=1), np.linalg.norm(act, axis=1)) > 0.9


def test_scores_are_the_single_removal_norms():
    x, y = small_problem()
    head = fit_head(x, y, l2=0.05)
    s = influence_scores(x, y, head=head)
    assert s.shape == (len(y),) and (s > 0).all()
    torch.testing.assert_close(s, _influence(x, y, head, 4096).vectors.norm(dim=1) / len(y))


def test_digits_estimates_rank_like_retraining(digits):
    xtr, ytr, _, _ = digits
    head = fit_head(xtr, ytr, l2=1e-3)
    inf = _influence(xtr, ytr, head, 4096)
    g = torch.Generator().manual_seed(1)
    est, act = [], []
    for i in torch.randperm(len(ytr), generator=g)[:12].tolist():
        keep = torch.arange(len(ytr)) != i
        other = fit_head(xtr[keep], ytr[keep], num_classes=10, l2=1e-3)
        est.append(float(inf.vectors[i].norm()) / len(ytr))
        act.append(float((other.weight - head.weight).norm()))
    assert spearman(est, act) >= 0.9
    groups_est, groups_act = [], []
    for _ in range(6):  # random groups of 30
        grp = torch.randperm(len(ytr), generator=g)[:30]
        keep = torch.ones(len(ytr), dtype=torch.bool)
        keep[grp] = False
        other = fit_head(xtr[keep], ytr[keep], num_classes=10, l2=1e-3)
        groups_est.append(float(inf.vectors[grp].sum(0).norm()) / len(ytr))
        groups_act.append(float((other.weight - head.weight).norm()))
    assert spearman(groups_est, groups_act) >= 0.6


def test_digits_prune_40_percent_beats_random(digits):
    xtr, ytr, xte, yte = digits

    def acc(keep):
        h = fit_head(xtr[keep], ytr[keep], num_classes=10, l2=1e-3)
        return float((h.logits(xte).argmax(1) == yte).double().mean())

    full = acc(torch.arange(len(ytr)))
    keep = influence_prune(xtr, ytr, prune_ratio=0.4, l2=1e-3)
    assert len(keep) == 720
    pruned = acc(keep)
    rand = np.mean([acc(random_subset(len(ytr), 0.6, s)) for s in range(5)])
    assert pruned >= full - 0.015 and pruned > rand


def test_ratio_and_epsilon_edges(recwarn):
    x, y = small_problem(n=20)
    assert influence_prune(x, y, prune_ratio=0.0, l2=0.05).tolist() == list(range(20))
    assert influence_prune(x, y, prune_ratio=1.0, l2=0.05).numel() == 0
    with pytest.warns(RuntimeWarning, match="epsilon=1e-12 is smaller than every single sample"):
        assert influence_prune(x, y, epsilon=1e-12, l2=0.05).numel() == 20
    assert influence_prune(x, y, epsilon=1e6, l2=0.05).numel() == 0
    head = fit_head(x, y, l2=0.05)
    small = influence_scores(x, y, head=head).min().item()
    kept = influence_prune(x, y, epsilon=small * 3, l2=0.05, head=head)
    removed = sorted(set(range(20)) - set(kept.tolist()))
    delta = _influence(x, y, head, 4096).vectors[removed].sum(0).norm() / 20
    assert 0 < len(removed) < 20 and float(delta) <= small * 3 + 1e-12


def test_factored_hessian_for_large_heads():
    x, y = small_problem(n=60, f=8, c=4)
    exact = influence_scores(x, y, l2=0.05)
    kfac = influence_scores(x, y, l2=0.05, exact_limit=0)
    assert spearman(exact.numpy(), kfac.numpy()) > 0.5
    keep = influence_prune(x, y, prune_ratio=0.25, l2=0.05, exact_limit=0)
    assert keep.numel() == 45 and keep.unique().numel() == 45


def test_bad_input():
    x, y = small_problem()
    with pytest.raises(ValueError, match="features has 14 rows but labels has 13"):
        influence_prune(x, y[:-1], prune_ratio=0.2)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="features: row 3 has NaN or Inf values"):
        influence_prune(bad, y, prune_ratio=0.2)
    dup = torch.cat([x, x[:, :1]], dim=1)  # a repeated column: singular without regularisation
    with pytest.raises(ValueError, match="the Hessian is singular: use l2 > 0"):
        influence_prune(dup, y, prune_ratio=0.2, l2=0.0)
    with pytest.raises(ValueError, match="give exactly one of prune_ratio and epsilon"):
        influence_prune(x, y)
    with pytest.raises(ValueError, match=r"prune_ratio must be in \[0, 1\], got 1.5"):
        influence_prune(x, y, prune_ratio=1.5)
    with pytest.raises(ValueError, match="features must be a 2-D float tensor"):
        influence_prune(torch.arange(5), y, prune_ratio=0.2)
    with pytest.raises(ValueError, match=r"keep must be in \[0, 1\], got 2"):
        random_subset(10, 2)


def test_baselines_find_mislabeled_samples(digits):
    xtr, ytr, _, _ = digits
    x, y = xtr[:600].float(), ytr[:600].clone()
    g = torch.Generator().manual_seed(0)
    flipped = torch.randperm(600, generator=g)[:60]
    y[flipped] = (y[flipped] + 1 + torch.randint(0, 9, (60,), generator=g)) % 10
    clean = torch.ones(600, dtype=torch.bool)
    clean[flipped] = False
    el2n = el2n_scores(x, y, epochs=3, seeds=(0, 1))
    forget = forgetting_scores(x, y, epochs=6)
    assert el2n.shape == forget.shape == (600,)

    def precision_at_60(scores):  # share of the 60 highest scores that are flipped labels (chance: 10%)
        return len(set(scores.topk(60).indices.tolist()) & set(flipped.tolist())) / 60

    assert precision_at_60(el2n) > 0.7
    assert precision_at_60(forget) > 0.4
    assert forget[flipped].mean() > forget[clean].mean()
    a, b = random_subset(600, 0.5, seed=3), random_subset(600, 0.5, seed=3)
    assert torch.equal(a, b) and a.numel() == 300 and torch.equal(a, a.sort().values)


def test_pruner_initial_subset(reference_path):
    import fastprune as fp

    n, c = 300, 5
    subset = random_subset(n, 0.5, seed=1)
    pruner = fp.DynamicPruner(n, c, epochs=4, keep_ratio=0.6, policy="random", warmup=1, anneal=0.0,
                              initial_subset=subset, device="cpu")
    assert sorted(pruner.epoch_indices.tolist()) == subset.tolist()
    order = pruner.epoch_indices
    pruner.step(torch.randn(order.numel(), c), order % c, order)
    nxt = pruner.next_epoch()
    assert set(nxt.tolist()) <= set(subset.tolist()) and nxt.numel() == round(0.6 * 150)
    assert pruner.steps_per_epoch(1, epoch=3) == round(0.6 * 150)
    other = fp.DynamicPruner(n, c, epochs=4, initial_subset=random_subset(n, 0.5, seed=2), device="cpu")
    with pytest.raises(ValueError, match="different initial_subset"):
        other.load_state_dict(pruner.state_dict())
    with pytest.raises(IndexError, match=r"initial_subset: indices must be in \[0, num_samples=300\)"):
        fp.DynamicPruner(n, c, epochs=2, initial_subset=torch.tensor([0, 300]), device="cpu")
    with pytest.raises(ValueError, match="initial_subset must be a non-empty 1-D integer tensor"):
        fp.DynamicPruner(n, c, epochs=2, initial_subset=torch.tensor([]), device="cpu")


def test_subset_file_round_trip(tmp_path):
    from fastprune.static import load_subset, save_subset

    keep = torch.tensor([1, 4, 7])
    save_subset(tmp_path / "s.json", keep, 10, "random", {"keep": 0.3}, fingerprint="abc")
    got, meta = load_subset(tmp_path / "s.json")
    assert torch.equal(got, keep) and meta["method"] == "random" and meta["fingerprint"] == "abc"

    from imagegen import make_tree

    from fastprune.data import ImageFolderIndex

    make_tree(str(tmp_path / "data"), per_class=(4, 3, 3))
    index = ImageFolderIndex(tmp_path / "data", cache_dir=False)
    with pytest.raises(ValueError, match="was made for another dataset .*: the file names, classes, labels or file"):
        load_subset(tmp_path / "s.json", index=index)
    n = len(index)
    save_subset(tmp_path / "old.json", keep, n, "random", fingerprint=index.names_fingerprint)
    with pytest.warns(RuntimeWarning, match="recorded by an older fastprune"):  # before sizes were part of it
        assert torch.equal(load_subset(tmp_path / "old.json", index=index)[0], keep)
    save_subset(tmp_path / "n.json", keep, n + 1, "random", fingerprint=index.fingerprint)
    with pytest.raises(ValueError, match=f"{n + 1} samples there, {n} here"):
        load_subset(tmp_path / "n.json", index=index)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_subset(tmp_path / "missing.json")


def test_prune_static_cli_then_train_on_the_subset(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from imagegen import make_tree

    from fastprune import cli
    from fastprune.data import ImageFolderIndex

    make_tree(str(tmp_path / "data"), per_class=(12, 12, 12))
    index = ImageFolderIndex(tmp_path / "data", cache_dir=False)
    feats = torch.randn(len(index), 6) + torch.nn.functional.one_hot(index.labels, 6).float() * 2
    np.save(tmp_path / "feats.npy", feats.numpy())
    assert cli.main(["prune-static", str(tmp_path / "data"), "--out", str(tmp_path / "sub.json"), "--method",
                     "influence", "--prune-ratio", "0.25", "--features", str(tmp_path / "feats.npy")]) == 0
    sub = json.loads((tmp_path / "sub.json").read_text())
    kept = len(index) - round(0.25 * len(index))
    assert sub["kept"] == kept and sub["fingerprint"] == index.fingerprint
    assert cli.main(["prune-static", str(tmp_path / "data"), "--out", str(tmp_path / "r.json"), "--method",
                     "el2n"]) == 2  # needs --features: a one-line error
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastprune", "train", str(tmp_path / "data"), "--out",
                           str(tmp_path / "run"), "--arch", "smallcnn", "--epochs", "1", "--batch-size", "8",
                           "--image-size", "32", "--workers", "0", "--loader", "torch", "--no-progress",
                           "--subset", str(tmp_path / "sub.json")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["samples_trained"] == kept


def sequential_greedy(inf, target, epsilon, window):
    """The one-step-at-a-time solver (a host read of each step's pick), kept as the reference."""
    order = torch.argsort(inf.norms()).tolist()
    v = inf.zero()
    removed, pool, nxt = [], [], 0
    while len(removed) < target:
        while len(pool) < window and nxt < len(order):
            pool.append(order[nxt])
            nxt += 1
        if not pool:
            break
        cand = inf.window(torch.tensor(pool, device=v.device))
        norms = (v[None, :] + cand).norm(dim=1) / inf.n
        j = int(torch.argmin(norms))
        if epsilon is not None and float(norms[j]) > epsilon:
            break
        v += cand[j]
        removed.append(pool.pop(j))
    return removed


@pytest.mark.parametrize("exact_limit", [4096, 0])
def test_device_greedy_equals_the_sequential_solver(exact_limit):
    from fastprune.static.influence import _greedy

    x, y = small_problem(n=90, f=5, c=4, seed=3)
    x = torch.cat([x, x[:12]])  # duplicates: exact ties, broken the same way (first in the order)
    y = torch.cat([y, y[:12]])
    head = fit_head(x, y, l2=0.05)
    inf = _influence(x, y, head, exact_limit)
    n = len(y)
    smallest = float(inf.norms().min()) / n
    for window in (1, 3, 32, 500):
        for target in (0, 1, 40, n - 1, n):
            got = _greedy(inf, target, None, window)
            assert got == sequential_greedy(inf, target, None, window), (window, target)
            assert len(got) == target and len(set(got)) == target
        for eps in (smallest * 0.5, smallest * 3, smallest * 40, 1e6):
            for sync_every in (1, 7, 256):  # the stop falls inside a block, on its edge, or in the last
                got = _greedy(inf, n, eps, window, sync_every=sync_every)
                assert got == sequential_greedy(inf, n, eps, window), (window, eps, sync_every)
    # the objective ||delta(S)|| of the selection is the reference's (same set, same order)
    removed = _greedy(inf, 40, None, 32)
    ref = sequential_greedy(inf, 40, None, 32)
    vec = inf.vectors if exact_limit else torch.stack([inf.window(torch.tensor([i]))[0] for i in range(n)])
    torch.testing.assert_close(vec[removed].sum(0).norm(), vec[ref].sum(0).norm())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_greedy_steps_never_synchronise():
    from fastprune.static.influence import _greedy, _GreedyState

    x, y = small_problem(n=300, f=16, c=8)
    head = fit_head(x.cuda(), y.cuda(), l2=0.05)
    for limit in (4096, 0):
        inf = _influence(x.cuda(), y.cuda(), head, limit)
        st = _GreedyState(inf, 300, 32)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(300):  # to the end of the order: empty slots too
                st.step(t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert st.order[st.picked].tolist() == _greedy(inf, 300, None, 32) == sequential_greedy(inf, 300, None, 32)
