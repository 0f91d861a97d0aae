"""DynamicPruner behaviour: selection invariants, weights, schedule, determinism, resume, noise filter."""

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastprune as fp
from fastprune import noise as fpn
from fastprune.kernels import reference as R


def run_epoch(pruner, num_classes, loss_of, batch_size=64, emb=None):
    """Feed every sample of the current epoch once; ``loss_of(idx)`` gives per-sample 'difficulty'."""
    order = pruner.epoch_indices
    for i in range(0, order.numel(), batch_size):
        idx = order[i:i + batch_size]
        labels = idx % num_classes
        logits = torch.zeros(idx.numel(), num_classes)
        # the label's logit sets the sample's CE: easy samples get a large margin
        logits[torch.arange(idx.numel()), labels] = loss_of(idx)
        logits.requires_grad_()
        kw = {} if emb is None else {"image_emb": emb[idx]}
        pruner.step(logits, labels, idx, **kw).backward()
    return pruner.next_epoch()


def margins(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, generator=g) * 8 - 2
    return lambda idx: m[idx]


@pytest.mark.parametrize("policy", ["infobatch", "topk", "random"])
def test_kept_fraction_matches_keep_ratio(policy, both_paths):
    n, c = 2000, 10
    pruner = fp.DynamicPruner(n, c, epochs=10, keep_ratio=0.6, policy=policy, warmup=1, anneal=0.0, device="cpu")
    loss_of = margins(n)
    kept = []
    for _ in range(4):
        kept.append(run_epoch(pruner, c, loss_of, batch_size=500).numel())
    assert kept[0] < n  # warm-up over: epoch 1 is pruned
    for k in kept:
        if policy == "infobatch":
            assert abs(k / n - 0.6) < 0.04, kept
        else:
            assert k == round(0.6 * n)
    assert pruner.visits_saved > 0.2


def test_infobatch_weights_are_unbiased(reference_path):
    """E[keep * weight] == 1 for every sample: each sample's expected gradient is unchanged."""
    n, c = 3000, 10
    pruner = fp.DynamicPruner(n, c, epochs=1000, keep_ratio=0.7, policy="infobatch", warmup=0, anneal=0.0,
                              device="cpu")
    loss_of = margins(n, seed=3)
    run_epoch(pruner, c, loss_of, batch_size=1000)  # scores every sample once
    total = torch.zeros(n)
    trials = 40
    for _ in range(trials):
        order = pruner.next_epoch()
        keep = torch.zeros(n)
        keep[order] = 1
        total += keep * pruner.weights
    mean = total / trials
    low = pruner.weights > 1  # the below-mean samples in the last epoch
    assert low.any() and pruner.history[-1]["drop_prob"] > 0
    assert abs(mean.mean().item() - 1.0) < 0.01
    assert (mean - 1).abs().max() < 0.8  # each sample's own expectation (40 draws) stays near 1
    drop = pruner.history[-1]["drop_prob"]
    assert pruner.weights.max().item() == pytest.approx(1 / (1 - drop), rel=1e-6)


def test_infobatch_drop_capped_by_max_drop(reference_path):
    n, c = 1000, 10
    pruner = fp.DynamicPruner(n, c, epochs=10, keep_ratio=0.1, policy="infobatch", warmup=0, anneal=0.0,
                              max_drop=0.5, device="cpu")
    run_epoch(pruner, c, margins(n), batch_size=500)
    assert pruner.history[-1]["drop_prob"] == pytest.approx(0.5)
    assert pruner.history[-1]["kept"] > 0.4 * n  # cannot reach keep_ratio: documented


def test_warmup_and_anneal_train_on_everything(reference_path):
    n, c = 300, 5
    pruner = fp.DynamicPruner(n, c, epochs=8, keep_ratio=0.5, policy="topk", warmup=2, anneal=0.25, device="cpu")
    loss_of = margins(n)
    for _ in range(8):
        run_epoch(pruner, c, loss_of, batch_size=100)
    policies = [h["policy"] for h in pruner.history]
    assert policies[:9] == ["full", "full", "topk", "topk", "topk", "topk", "full", "full", "full"]
    assert [h["kept"] for h in pruner.history[:2]] == [n, n]
    assert pruner.history[3]["kept"] == n // 2


def test_unseen_samples_are_always_kept(reference_path):
    n, c = 400, 4
    pruner = fp.DynamicPruner(n, c, epochs=10, keep_ratio=0.3, policy="topk", warmup=0, anneal=0.0, device="cpu")
    seen = torch.arange(0, 200)
    logits = torch.randn(200, c, requires_grad=True)
    pruner.step(logits, seen % c, seen).backward()
    order = pruner.next_epoch()
    assert set(range(200, 400)) <= set(order.tolist())
    assert order.numel() == max(120, 200)


def test_topk_keeps_highest_priority(reference_path):
    n, c = 500, 5
    pruner = fp.DynamicPruner(n, c, epochs=10, keep_ratio=0.4, policy="topk", warmup=0, anneal=0.0, device="cpu")
    loss_of = margins(n, 1)
    order = run_epoch(pruner, c, loss_of, batch_size=250)
    kept_scores = pruner.scores[order]
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[order] = False
    assert kept_scores.min() >= pruner.scores[dropped].max()


def test_determinism_by_seed(both_paths):
    def orders(seed):
        torch.manual_seed(0)
        pr = fp.DynamicPruner(600, 6, epochs=5, keep_ratio=0.5, seed=seed, device="cpu")
        return [pr.epoch_indices.clone()] + [run_epoch(pr, 6, margins(600), 300) for _ in range(3)]

    a, b, c = orders(1), orders(1), orders(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])


def test_kernel_and_reference_paths_agree(monkeypatch):
    """CPU reference and Triton kernels make the same selections from the same training."""
    results = []
    for interp in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        pr = fp.DynamicPruner(500, 7, epochs=6, keep_ratio=0.6, seed=11, device="cpu")
        results.append([run_epoch(pr, 7, margins(500, 4), 250) for _ in range(3)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_resume_gives_identical_selections(kernel_path, tmp_path):
    """Save mid-epoch, 'kill', load into a fresh pruner: the same next selections, bitwise."""
    n, c = 700, 7
    loss_of = margins(n, 9)
    kw = dict(epochs=6, keep_ratio=0.5, policy="infobatch", seed=5, device="cpu")

    def feed(pr, order, lo, hi):
        idx = order[lo:hi]
        logits = torch.zeros(idx.numel(), c)
        logits[torch.arange(idx.numel()), idx % c] = loss_of(idx)
        pr.step(logits.requires_grad_(), idx % c, idx).backward()

    ref = fp.DynamicPruner(n, c, **kw)
    run_epoch(ref, c, loss_of, 350)
    order = ref.epoch_indices
    feed(ref, order, 0, 200)
    torch.save(ref.state_dict(), tmp_path / "pruner.pt")
    feed(ref, order, 200, order.numel())
    expected = [ref.next_epoch()] + [run_epoch(ref, c, loss_of, 350) for _ in range(2)]

    resumed = fp.DynamicPruner(n, c, **kw)
    resumed.load_state_dict(torch.load(tmp_path / "pruner.pt"))
    assert torch.equal(resumed.epoch_indices, order)
    feed(resumed, order, 200, order.numel())
    got = [resumed.next_epoch()] + [run_epoch(resumed, c, loss_of, 350) for _ in range(2)]
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert torch.equal(ref.scores, resumed.scores) and ref.history == resumed.history


def planted_noise(n=2000, c=10, d=32, seed=0):
    """Labels with 10% flips; images (CLIP) follow the truth; a model whose logits favour the truth."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(c, d, generator=g), dim=1)
    true = torch.arange(n) % c
    noisy = torch.randperm(n, generator=g)[: n // 10]
    given = true.clone()
    given[noisy] = (true[noisy] + 1 + torch.randint(0, c - 1, (noisy.numel(),), generator=g)) % c
    image = F.normalize(text[true] + 0.15 * torch.randn(n, d, generator=g), dim=1)
    strength = 1 + torch.rand(n, generator=g) * 3
    return g, text, true, noisy, given, image, strength


def train_planted(pruner, true, given, strength, epochs, c, batch=500):
    """Epochs whose logits put ``strength`` on the true class (the model learned it)."""
    for _ in range(epochs):
        order = pruner.epoch_indices
        for i in range(0, order.numel(), batch):
            idx = order[i:i + batch]
            logits = torch.zeros(idx.numel(), c)
            logits[torch.arange(idx.numel()), true[idx]] = strength[idx]
            pruner.step(logits, given[idx], idx)
        pruner.next_epoch()


def test_noise_decisions_relabel_where_the_model_and_clip_agree(reference_path):
    n, c = 2000, 10
    g, text, true, noisy, given, image, strength = planted_noise(n, c)
    pruner = fp.DynamicPruner(n, c, epochs=10, keep_ratio=0.7, noise_ratio=0.3, noise_start=2, image_emb=image,
                              text_emb=text, warmup=1, noise_relabel=True, device="cpu")
    train_planted(pruner, true, given, strength, 1, c)
    assert pruner.suspected_noisy().numel() == 0, "no decision before noise_start"
    train_planted(pruner, true, given, strength, 1, c)
    flagged = set(pruner.suspected_noisy().tolist())
    planted = set(noisy.tolist())
    assert len(flagged & planted) / len(planted) > 0.95 and len(flagged & planted) / len(flagged) > 0.95
    relabel = pruner.noise_actions == fpn.RELABEL
    assert set(torch.nonzero(relabel)[:, 0].tolist()) == flagged
    assert torch.equal(pruner.relabeled[relabel].long(), true[relabel])  # the agreed class is the truth
    assert pruner.history[-1]["relabeled"] == len(flagged) and pruner.history[-1]["excluded"] == 0
    before = pruner._evidence.before  # their evidence against the old label, for the old class's mixture
    assert torch.equal(before.label[relabel].long(), given[relabel]) and (before.label[~relabel] == -1).all()
    assert (before.model_margin[relabel] < 0).all() and (before.clip_margin[relabel] < 0).all()
    assert before.model_margin[~relabel].isnan().all()
    other = fp.DynamicPruner(n, c, epochs=10, keep_ratio=0.7, noise_ratio=0.3, noise_start=2, image_emb=image,
                             text_emb=text, warmup=1, noise_relabel=True, device="cpu")
    other.load_state_dict(pruner.state_dict())
    for f in ("label", "model_margin", "clip_margin"):  # saved and restored with the state
        assert torch.allclose(getattr(other._evidence.before, f).double(), getattr(before, f).double(), rtol=0,
                              atol=0, equal_nan=True), f
    # relabeled samples train with their new class: the next epoch's margins are positive again
    train_planted(pruner, true, given, strength, 1, c)
    seen = relabel & (pruner.model_margin == pruner.model_margin)
    assert seen.any() and (pruner.model_margin[seen] > 0).all()
    assert torch.equal(pruner.given_labels[seen].long(), true[seen])
    torch.testing.assert_close(pruner.consistency, (image * text[given]).sum(1))  # consistency: given labels


def test_relabeled_samples_stay_out_of_their_new_class_mixture():
    """A relabeled sample's evidence restarts: a few late, confident visits beside margins averaged since the
    first epoch.  Mixed into its new class, those become the upper component and the class's remaining wrong
    labels fall into one lower component with the clean ones (nothing suspected); settled, they stay out."""
    g = torch.Generator().manual_seed(0)
    clean, wrong, relabeled = 160, 20, 60
    margin = torch.cat([1.0 + 0.3 * torch.randn(clean, generator=g), -1.0 + 0.2 * torch.randn(wrong, generator=g),
                        6.0 + 0.5 * torch.randn(relabeled, generator=g)])
    n = margin.numel()
    label = torch.zeros(n, dtype=torch.int32)
    pred = torch.where(margin < 0, 1, 0).to(torch.int32)
    settled = torch.arange(n) >= clean + wrong
    mixed = fpn.decide(label, margin, pred, None, None, 2)
    assert (mixed.action == fpn.KEEP).all()
    d = fpn.decide(label, margin, pred, None, None, 2, settled=settled)
    suspected = torch.nonzero(d.action != fpn.KEEP)[:, 0]
    assert suspected.tolist() == list(range(clean, clean + wrong))
    assert (d.belief[settled] == 0).all()


def test_relabeled_samples_old_evidence_keeps_their_old_class_mode():
    """Once most of a class's wrong labels are relabeled, the two left no longer make a mode of their own; with
    the relabeled samples' evidence from before their relabel in the fit (``before``), they still do."""
    from fastprune.evidence import Before

    g = torch.Generator().manual_seed(0)
    clean, left, moved = 160, 2, 60
    margin = torch.cat([1.0 + 0.3 * torch.randn(clean, generator=g), -0.6 + 0.2 * torch.randn(left, generator=g),
                        3.0 + 0.5 * torch.randn(moved, generator=g)])  # the moved ones: their new class's margins
    n = margin.numel()
    label = torch.cat([torch.zeros(clean + left), torch.ones(moved)]).to(torch.int32)
    settled = torch.arange(n) >= clean + left
    old = torch.where(settled, -0.6 + 0.2 * torch.randn(n, generator=g), float("nan"))
    before = Before(torch.where(settled, 0, -1).to(torch.int32), old, old.clone())
    wrong = slice(clean, clean + left)
    without = fpn.beliefs(label, margin, None, 2, settled)
    assert (without[wrong] <= 0.5).all()
    with_before = fpn.beliefs(label, margin, None, 2, settled, before=before)
    assert (with_before[wrong] > 0.5).all() and (with_before[:clean] <= 0.5).all()
    assert (with_before[settled] == 0).all()  # the relabeled ones are not judged again
    both = fpn.beliefs(label, margin, margin, 2, settled, before=before)  # each source with its own old margins
    assert torch.equal(both, with_before)


def test_mixtures_are_fitted_from_class_histograms():
    """The fit recovers each class's components (within a bin of the class's range), ignores invalid samples,
    and depends on the samples only through exact per-class counts: any order gives the same bits."""
    g = torch.Generator().manual_seed(3)
    parts, labels = [], []
    for k, (lo, hi) in enumerate(((-4.0, 3.0), (-2.0, 6.0), (-6.0, 1.0))):
        parts += [lo + 0.5 * torch.randn(300, generator=g), hi + 0.7 * torch.randn(1200, generator=g)]
        labels += [torch.full((1500,), k)]
    x = torch.cat(parts).float()
    cls = torch.cat(labels)
    valid = torch.rand(x.numel(), generator=g) < 0.95
    x = torch.where(valid, x, torch.tensor(float("nan")))  # invalid samples hold anything
    fit = fpn.fit_mixtures(x, cls, valid, 4)
    assert fit.shape == (fpn.MIXTURE_ROWS, 4) and fit.dtype == torch.float64
    mu_lo, mu_hi, var_lo, var_hi, pi_lo, usable = fit
    for k, (lo, hi) in enumerate(((-4.0, 3.0), (-2.0, 6.0), (-6.0, 1.0))):
        bin_width = float(x[valid & (cls == k)].max() - x[valid & (cls == k)].min()) / fpn.BINS
        assert abs(mu_lo[k] - lo) < 0.1 + bin_width and abs(mu_hi[k] - hi) < 0.1 + bin_width
        assert abs(var_lo[k].sqrt() - 0.5) < 0.1 and abs(var_hi[k].sqrt() - 0.7) < 0.1
        assert abs(pi_lo[k] - 0.2) < 0.03 and usable[k] == 1
    assert usable[3] == 0  # no samples
    perm = torch.randperm(x.numel(), generator=g)
    again = fpn.fit_mixtures(x[perm], cls[perm], valid[perm], 4)
    assert torch.equal(again, fit)
    for rows in (1, 3):  # the EM in blocks of classes (the CPU's cache-sized blocks): the same bits
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(fpn._EM_ROWS, "cpu", rows)
            assert torch.equal(fpn.fit_mixtures(x, cls, valid, 4), fit)
    belief = fpn.mixture_posterior(x, cls, valid, fit)
    with pytest.MonkeyPatch.context() as mp:  # the per-sample passes in chunks (the CPU's): the same bits
        mp.setitem(R._PASS_CHUNK, "cpu", 997)  # a tail shorter than a chunk
        assert torch.equal(fpn.fit_mixtures(x, cls, valid, 4), fit)
        assert torch.equal(fpn.mixture_posterior(x, cls, valid, fit), belief)
    assert torch.equal(fpn.mixture_posterior(x[perm], cls[perm], valid[perm], again), belief[perm])
    assert (belief[~valid] == 0).all() and (belief[valid & (x >= 0)] == 0).all()
    low = valid & (x < -3.0) & (cls == 0)
    assert (belief[low] > 0.9).all()


def test_noise_decisions_from_the_model_alone_never_relabel(reference_path):
    n, c = 2000, 10
    g, text, true, noisy, given, image, strength = planted_noise(n, c, seed=1)
    pruner = fp.DynamicPruner(n, c, epochs=10, keep_ratio=0.7, noise_ratio=0.3, noise_start=2, warmup=1,
                              device="cpu")
    train_planted(pruner, true, given, strength, 2, c)
    flagged = pruner.suspected_noisy()
    planted = set(noisy.tolist())
    hits = len(set(flagged.tolist()) & planted)
    assert hits / len(planted) > 0.95 and hits / flagged.numel() > 0.95
    actions = pruner.noise_actions[flagged]
    assert ((actions == fpn.EXCLUDE) | (actions == fpn.DOWNWEIGHT)).all()
    excluded = set(torch.nonzero(pruner.noise_actions == fpn.EXCLUDE)[:, 0].tolist())
    assert excluded and not (excluded & set(pruner.epoch_indices.tolist()))  # left out of the epoch
    assert (pruner.relabeled == -1).all()


def test_each_action_reaches_the_selection_and_the_step(reference_path, monkeypatch):
    """Left out: not in the epoch; down-weighted: weight 1 - belief; relabeled: trains with its new class."""
    n, c = 12, 3
    decision = fpn.NoiseDecision(
        belief=torch.tensor([0.0, 0.7, 0.95, 0.8] + [0.0] * 8),
        action=torch.tensor([fpn.KEEP, fpn.DOWNWEIGHT, fpn.EXCLUDE, fpn.RELABEL] + [fpn.KEEP] * 8, dtype=torch.int8),
        new_label=torch.tensor([-1, -1, -1, 2] + [-1] * 8, dtype=torch.int32))
    monkeypatch.setattr(fpn, "act", lambda *a, **k: decision)
    pruner = fp.DynamicPruner(n, c, epochs=4, policy="full", noise_ratio=0.5, noise_start=1, device="cpu")
    labels = torch.zeros(n, dtype=torch.int64)
    pruner.step(torch.zeros(n, c), labels, torch.arange(n))
    pruner.next_epoch()
    assert 2 not in pruner.epoch_indices.tolist() and len(pruner.epoch_indices) == n - 1
    assert pruner.weights[1].item() == pytest.approx(0.3) and pruner.weights[0].item() == 1.0
    assert pruner.relabeled.tolist()[:4] == [-1, -1, -1, 2]
    assert pruner.suspected_noisy().tolist() == [1, 2, 3]
    assert pruner.history[-1]["relabeled"] == 1 and pruner.history[-1]["excluded"] == 1
    assert pruner.history[-1]["down_weighted"] == 1
    logits = torch.zeros(2, c)
    pruner.step(logits, torch.tensor([0, 0]), torch.tensor([3, 4]))
    assert pruner.last_step.margin.tolist() == [0.0, 0.0] and pruner.given_labels[[3, 4]].tolist() == [2, 0]
    logits[0, 2] = 5.0  # the new class of sample 3: a positive margin only if it trains with class 2
    pruner.step(logits, torch.tensor([0, 0]), torch.tensor([3, 4]))
    assert pruner.last_step.margin[0].item() == 5.0
    sd = pruner.state_dict()
    again = fp.DynamicPruner(n, c, epochs=4, policy="full", noise_ratio=0.5, noise_start=1, device="cpu")
    again.load_state_dict(sd)
    assert torch.equal(again.relabeled, pruner.relabeled) and torch.equal(again.noise_actions, pruner.noise_actions)
    again.step(logits, torch.tensor([0, 0]), torch.tensor([3, 4]))
    assert again.last_step.margin[0].item() == 5.0


def test_noise_decisions_leave_atypical_clean_samples_alone(reference_path):
    """Clean samples that are hard (small positive margins) and atypical (low cosine to every class)
    are not flagged: the evidence is the margin's sign and its mixture, not the loss or the cosine."""
    n, c, d = 1000, 10, 32
    g = torch.Generator().manual_seed(2)
    text = F.normalize(torch.randn(c, d, generator=g), dim=1)
    labels = torch.arange(n) % c
    atypical = torch.zeros(n, dtype=torch.bool)
    atypical[torch.randperm(n, generator=g)[:200]] = True
    image = text[labels] + torch.where(atypical[:, None], 3.0, 0.15) * torch.randn(n, d, generator=g)
    image[atypical] += 0.6 * text[labels[atypical]]  # far from every class, still closest to its own
    strength = torch.where(atypical, 0.05 + 0.1 * torch.rand(n, generator=g), 1 + 3 * torch.rand(n, generator=g))
    pruner = fp.DynamicPruner(n, c, epochs=10, noise_ratio=0.3, noise_start=2, image_emb=F.normalize(image, dim=1),
                              text_emb=text, warmup=1, device="cpu")
    train_planted(pruner, labels, labels, strength, 2, c, batch=250)
    clip_ok = pruner.clip_margin > 0
    assert not set(pruner.suspected_noisy().tolist()) & set(torch.nonzero(clip_ok)[:, 0].tolist())


def test_noise_ratio_caps_the_decisions(reference_path, monkeypatch):
    n, c = 2000, 10
    g, text, true, noisy, given, image, strength = planted_noise(n, c, seed=3)
    pruner = fp.DynamicPruner(n, c, epochs=10, noise_ratio=0.02, noise_start=2, image_emb=image, text_emb=text,
                              warmup=1, device="cpu")
    decisions = []
    act = fpn.act

    def keep_raw(*a, **k):  # the decisions' own beliefs, also of the samples the cap leaves alone
        k_uncapped = dict(k, max_fraction=1.0, out=None)  # its own actions: the capped ones go to the pruner
        decisions.append((act(*a, **k), act(*a, **k_uncapped)))
        return decisions[-1][0]

    monkeypatch.setattr(fpn, "act", keep_raw)
    train_planted(pruner, true, given, strength, 2, c)
    flagged = pruner.suspected_noisy()
    assert flagged.numel() == int(0.02 * n)
    capped, uncapped = decisions[-1]
    left = (capped.action == fpn.KEEP) & (uncapped.action != fpn.KEEP)
    assert left.sum() > 100, "the cap left most suspects alone"
    assert capped.belief[flagged].min() >= uncapped.belief[left].max()


def test_a_step_error_is_raised_before_next_epoch_changes_anything(reference_path):
    """The selection writes into buffers the pruner holds (weights, priorities, beliefs, actions): the step's
    errors are reported before any of them is touched, and a later epoch reuses them."""
    from fastprune.kernels import common as K

    n, c = 600, 10
    g, text, true, noisy, given, image, strength = planted_noise(n, c, seed=5)
    pruner = fp.DynamicPruner(n, c, epochs=10, noise_ratio=0.3, noise_start=2, image_emb=image, text_emb=text,
                              warmup=1, device="cpu")
    train_planted(pruner, true, given, strength, 3, c)
    assert pruner.suspected_noisy().numel() > 0
    held = {"weights": pruner.weights, "priority": pruner.selection_priority, "belief": pruner.decision_belief,
            "actions": pruner.noise_actions, "noise_belief": pruner.noise_belief}
    before = {k: v.clone() for k, v in held.items()}
    order, epoch = pruner.epoch_indices.clone(), pruner.epoch
    counters = pruner._errors.counters  # a bad label, as the step's kernel counts it
    counters[K.ERR_LABEL_COUNT] += 1
    counters[K.ERR_LABEL_COUNT + 1] = K.merge_example(int(counters[K.ERR_LABEL_COUNT + 1]), 99)
    with pytest.raises(ValueError, match="value 99"):
        pruner.next_epoch()
    assert pruner.epoch == epoch and torch.equal(pruner.epoch_indices, order)
    for k, v in held.items():
        assert torch.equal(v, before[k]), k
    train_planted(pruner, true, given, strength, 1, c)
    assert pruner.epoch == epoch + 1 and not torch.equal(pruner.epoch_indices, order)
    now = {"weights": pruner.weights, "priority": pruner.selection_priority, "belief": pruner.decision_belief,
           "actions": pruner.noise_actions, "noise_belief": pruner.noise_belief}
    for k, v in now.items():
        assert v.data_ptr() == held[k].data_ptr(), f"{k}: a new buffer each epoch"


def test_the_cap_breaks_equal_beliefs_by_the_margins_then_the_index():
    n = 12
    belief = torch.tensor([0.99, 1.0, 1.0, 1.0, 0.2, 1.0, 0.7, 1.0, 1.0, 0.95, 1.0, 0.6])
    margin = torch.tensor([-1.0, -0.5, -2.0, -0.5, 0.0, -3.0, -1.0, float("nan"), -0.1, -1.0, -2.0, -1.0])
    label = torch.zeros(n, dtype=torch.int32)
    cases = {0: [], 2: [5, 2], 3: [5, 2, 10], 5: [5, 2, 10, 1, 3], 8: [5, 2, 10, 1, 3, 8, 7, 0],
             12: [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]}  # 11 suspects (belief > 0.5): a cap of 12 takes them all
    for cap, expected in cases.items():
        d = fpn.act(belief, label, margin, None, None, None, max_fraction=cap / n)
        acted = torch.nonzero(d.action != fpn.KEEP)[:, 0].tolist()
        assert sorted(acted) == sorted(expected), (cap, acted)


def test_per_batch_embeddings_mode(kernel_path):
    n, c, d = 200, 5, 16
    text = torch.randn(c, d)
    emb = torch.randn(n, d)
    pruner = fp.DynamicPruner(n, c, epochs=4, text_emb=text, noise_ratio=0.05, device="cpu")
    run_epoch(pruner, c, margins(n), 100, emb=emb)
    expected = F.cosine_similarity(emb, text[torch.arange(n) % c], dim=1)
    torch.testing.assert_close(pruner.consistency, expected, atol=1e-5, rtol=1e-5)
    assert len(pruner.suspected_noisy()) == 0  # noise_start is 2: nothing decided yet


@pytest.mark.parametrize("inplace", [False, True])
def test_training_gradients_match_cross_entropy(inplace, both_paths):
    """In a real model, pruner.step gives the same gradients as F.cross_entropy (weights 1)."""
    torch.manual_seed(0)
    n, c = 64, 13
    model = torch.nn.Sequential(torch.nn.Linear(9, 32), torch.nn.ReLU(), torch.nn.Linear(32, c))
    ref = torch.nn.Sequential(torch.nn.Linear(9, 32), torch.nn.ReLU(), torch.nn.Linear(32, c))
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 9), torch.randint(0, c, (16,))
    pruner = fp.DynamicPruner(n, c, epochs=3, inplace_grad=inplace, label_smoothing=0.1, device="cpu")
    loss = pruner.step(model(x), y, torch.arange(16))
    loss.backward()
    ref_loss = F.cross_entropy(ref(x), y, label_smoothing=0.1)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    assert pruner.last_step.ce.shape == (16,)


@pytest.mark.parametrize("inplace", [False, True])
def test_backward_hands_the_kernel_gradient_to_autograd_without_a_copy(kernel_path, inplace):
    """The gradient the step wrote becomes ``.grad`` itself: any other reference to it (``last_step`` kept one)
    makes autograd copy it, a B x C copy per step.  With ``inplace_grad`` it is the logits' own storage."""
    pruner = fp.DynamicPruner(10, 5, epochs=2, inplace_grad=inplace, device="cpu")
    x = torch.randn(4, 5, requires_grad=True)
    pruner.step(x, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])).backward()
    assert pruner.last_step.grad is None
    if inplace:
        assert x.grad.data_ptr() == x.data_ptr()


def test_grad_output_scaling_and_single_backward(kernel_path):
    pruner = fp.DynamicPruner(10, 4, epochs=2, device="cpu")
    logits = torch.randn(3, 4, requires_grad=True)
    y, idx = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    loss = pruner.step(logits, y, idx)
    (loss * 3.0).backward(retain_graph=True)
    x = logits.detach().clone().requires_grad_()
    (F.cross_entropy(x, y) * 3.0).backward()
    torch.testing.assert_close(logits.grad, x.grad)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def test_inplace_grad_guards_other_uses_of_logits(kernel_path):
    pruner = fp.DynamicPruner(10, 4, epochs=2, inplace_grad=True, device="cpu")
    w = torch.randn(4, 4, requires_grad=True)
    logits = torch.randn(3, 4) @ w
    extra = (logits ** 2).sum()  # saves logits for its backward
    loss = pruner.step(logits, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + extra).backward()


def test_no_grad_step_scores_without_gradient(kernel_path):
    pruner = fp.DynamicPruner(10, 4, epochs=2, device="cpu")
    with torch.no_grad():
        loss = pruner.step(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6]))
    assert not loss.requires_grad and pruner.visits[[4, 5, 6]].tolist() == [1, 1, 1]


def test_sampler_and_steps_follow_the_epoch(reference_path):
    n, c = 1000, 10
    pruner = fp.DynamicPruner(n, c, epochs=4, keep_ratio=0.5, policy="random", warmup=1, anneal=0.25,
                              device="cpu")
    sampler = pruner.sampler()
    assert len(sampler) == n and sorted(sampler) == list(range(n))
    assert pruner.steps_per_epoch(64) == math.ceil(n / 64)
    assert pruner.steps_per_epoch(64, drop_last=True) == n // 64
    assert pruner.steps_per_epoch(64, epoch=1) == math.ceil(500 / 64)
    assert pruner.total_steps(100) == 10 + 5 + 5 + 10
    run_epoch(pruner, c, margins(n), 250)
    assert len(sampler) == 500 and list(sampler) == pruner.epoch_indices.tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(n)), batch_size=100,
                                         sampler=sampler)
    assert sorted(torch.cat([b[0] for b in loader]).tolist()) == sorted(pruner.epoch_indices.tolist())
    assert pruner.visits_saved == pytest.approx(0.25)


def test_state_dict_roundtrip_in_memory():
    pruner = fp.DynamicPruner(50, 3, epochs=2, device="cpu")
    buf = io.BytesIO()
    torch.save(pruner.state_dict(), buf)
    buf.seek(0)
    other = fp.DynamicPruner(50, 3, epochs=2, device="cpu")
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.epoch_indices, pruner.epoch_indices)


def _break(sd, path, value):
    """A copy of ``sd`` with the entry at ``path`` (keys joined by '.') replaced, or deleted for ``...``."""
    import copy

    sd = copy.deepcopy(sd)
    *parents, last = path.split(".")
    d = sd
    for k in parents:
        d = d[k]
    if value is ...:
        del d[last]
    else:
        d[last] = value(d[last]) if callable(value) else value
    return sd


@pytest.mark.parametrize("path,value,message", [
    ("scores", ..., "lacks 'scores'"),
    ("history", ..., "lacks 'history'"),
    ("scores", torch.zeros(1), r"state_dict\['scores'\] must be a tensor of shape \(60,\)"),
    ("scores", lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "'scores'.*non-finite"),
    ("weights", lambda t: t.index_fill(0, torch.tensor([5]), -1.0), "'weights'.*below 0"),
    ("visits", lambda t: t.float(), "'visits'.*integer"),
    ("label", lambda t: t.index_fill(0, torch.tensor([0]), 9), "'label'.*above 2"),
    ("epoch", -5, "'epoch'.*integer >= 0"),
    ("global_indices", lambda t: torch.cat([t[:-1], torch.tensor([-3])]), "distinct sample indices in"),
    ("global_indices", lambda t: torch.cat([t, t[:1]]), "at most 60|distinct"),
    ("noise.belief", lambda t: t + 2.0, "'noise.belief'.*above 1"),
    ("noise.action", lambda t: t.index_fill(0, torch.tensor([1]), 7), "'noise.action'.*above 3"),
    ("noisy", torch.zeros(60, dtype=torch.int64), "'noisy'.*bool"),
    ("clip", {"clip_margin": torch.zeros(60)}, r"\['clip'\] must hold"),
    ("relabeled_from", {"label": torch.zeros(60)}, r"\['relabeled_from'\] must hold"),
    ("relabeled_from", {"label": torch.full((60,), 9), "model_margin": torch.zeros(60), "clip_margin": torch.zeros(60)},
     "'relabeled_from.label'.*above 2"),
])
def test_a_bad_state_is_refused_and_changes_nothing(kernel_path, path, value, message):
    pruner = fp.DynamicPruner(60, 3, epochs=4, keep_ratio=0.5, device="cpu", noise_ratio=0.2)
    run_epoch(pruner, 3, margins(60), 16)
    pruner.next_epoch()
    good = pruner.state_dict()
    other = fp.DynamicPruner(60, 3, epochs=4, keep_ratio=0.5, device="cpu", noise_ratio=0.2)
    before = other.state_dict()
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(_break(good, path, value))
    after = other.state_dict()
    for key, v in before.items():
        assert (torch.equal(v, after[key]) if isinstance(v, torch.Tensor) else
                (v == after[key] if not isinstance(v, dict) else v.keys() == after[key].keys())), key
    other.load_state_dict(good)  # the good state still loads
    assert torch.equal(other.scores, pruner.scores)


def test_no_global_rng_is_touched(kernel_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    pruner = fp.DynamicPruner(300, 3, epochs=3, device="cpu")
    run_epoch(pruner, 3, margins(300), 100)
    assert torch.equal(torch.get_rng_state(), before)


def test_visits_saved_ignores_the_selection_after_the_last_epoch(reference_path):
    n, c = 400, 4
    pruner = fp.DynamicPruner(n, c, epochs=2, keep_ratio=0.5, policy="random", warmup=1, anneal=0.0, device="cpu")
    kept = []
    for _ in range(2):
        kept.append(pruner.epoch_indices.numel())
        run_epoch(pruner, c, margins(n), 200)
    assert pruner.epoch == 2 and len(pruner.history) == 3  # the usual next_epoch() after the last epoch
    assert pruner.visits_saved == pytest.approx(1 - sum(kept) / (2 * n))


def test_a_step_id_that_wrapped_around_never_meets_a_stale_stamp(kernel_path):
    """Step ids wrap at MAX_STEP_ID; stamps are cleared every epoch, so a sample stamped long ago is not taken
    for a duplicate of the step whose id happens to equal its old stamp."""
    from fastprune.kernels import common as K

    pruner = fp.DynamicPruner(4, 3, epochs=3, device="cpu")
    pruner.step(torch.randn(1, 3), torch.tensor([0]), torch.tensor([1]))  # step id 0 stamps sample 1
    pruner.next_epoch()
    pruner._step_count = K.MAX_STEP_ID + 1  # the next step's id is 0 again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.step(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1, 2]))
    assert not [w for w in caught if "duplicate" in str(w.message)]
    assert pruner.state_dict()["visits"].tolist() == [0, 2, 1, 0]


def test_beliefs_are_the_lower_components_posterior():
    """The per-class log-odds coefficients give Bayes' posterior of the two Gaussians (computed plainly here)
    wherever a sample may be suspected, 0 elsewhere; ``at_most`` keeps the smaller of two beliefs."""
    g = torch.Generator().manual_seed(8)
    fit = torch.tensor([[-3.0, -1.0, -2.0], [2.0, 4.0, 1.0], [0.5, 1.0, 0.2], [1.0, 0.3, 2.0], [0.2, 0.4, 0.1],
                        [1.0, 1.0, 0.0]], dtype=torch.float64)  # mu_lo, mu_hi, var_lo, var_hi, pi_lo, usable
    mu_lo, mu_hi, var_lo, var_hi, pi_lo, usable = fit
    x = (torch.randn(3000, generator=g) * 3).float()
    cls = torch.randint(0, 3, (3000,), generator=g)
    valid = torch.rand(3000, generator=g) < 0.9
    belief = fpn.mixture_posterior(x, cls, valid, fit)

    def density(v, mu, var):
        return torch.exp(-0.5 * (v - mu) ** 2 / var) / torch.sqrt(2 * torch.pi * var)

    v, k = x.double(), cls
    lower = pi_lo[k] * density(v, mu_lo[k], var_lo[k])
    plain = lower / (lower + (1 - pi_lo[k]) * density(v, mu_hi[k], var_hi[k]))
    may = valid & (usable[k] > 0) & (x < 0) & (v < mu_hi[k] - fpn.OUTLIER_SD * var_hi[k].sqrt())
    torch.testing.assert_close(belief[may].double(), plain[may], rtol=1e-5, atol=1e-6)
    assert (belief[~may] == 0).all() and may.sum() > 500
    other = torch.rand(3000, generator=g)
    both = other.clone()
    fpn.mixture_posterior(x, cls, valid, fit, at_most=both)
    assert torch.equal(both, torch.minimum(other, belief))


def test_the_mixture_kernel_matches_the_reference_em():
    """kernels/mixture.py (a GPU's one-launch EM, here under the interpreter) against noise._em."""
    from fastprune.kernels.mixture import em_triton

    g = torch.Generator().manual_seed(5)
    rows = 7
    centres = (torch.linspace(-3, 4, fpn.BINS, dtype=torch.float64)[None, :] * (1 + torch.rand(rows, 1, generator=g,
               dtype=torch.float64)))
    w = torch.poisson(50 * torch.exp(-(centres - 2.5) ** 2) + 15 * torch.exp(-(centres + 2) ** 2 * 2), generator=g)
    w[5] = 0  # an empty class
    n1 = w.sum(1).clamp_min(1.0)
    ref = fpn._em(centres, w, n1, fpn.EM_ITERATIONS)
    got = em_triton(centres, w, n1, fpn.EM_ITERATIONS)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    full = torch.arange(rows) != 5
    assert (ref[0][full] < -1.5).all() and (ref[1][full] > 2).all()  # the two bumps are found
