"""PyTorch's own per-step LR schedulers over a pruned run: fastprune.schedule.ProgressScheduler."""

from __future__ import annotations

import math

import pytest
import torch

from fastprune import DynamicPruner
from fastprune.schedule import ProgressScheduler

N, C, EPOCHS, BATCH, MAX_LR = 200, 5, 6, 8, 0.5

pytestmark = pytest.mark.usefixtures("reference_path_module")  # the training loop around the pruner is under test


def one_cycle(opt, length):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=length)


def cosine(opt, length):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=length, eta_min=0.01)


SCHEDULERS = {"OneCycleLR": one_cycle, "CosineAnnealingLR": cosine}


def final_lr(make, length) -> float:
    """The schedule's value at its last step (``length - 1`` steps after the first), computed on its own."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=MAX_LR)
    sched = make(opt, length)
    for _ in range(length - 1):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def pruned_run(policy, seed, make=None, wrap=True, steps_per_call=1, resume_at=None):
    """Train EPOCHS epochs of fixed per-sample logits with the pruner, stepping the scheduler after every batch.

    Returns (the first estimate of the run's steps, the lr each batch trained with, the scheduler).
    ``resume_at=(epoch, batch)``: there, rebuild pruner and scheduler from their saved states.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    logits = torch.randn(N, C, generator=g) * 3

    def build(state=None):
        pruner = DynamicPruner(N, C, epochs=EPOCHS, keep_ratio=0.5, policy=policy, seed=seed, device="cpu",
                               warmup=1, anneal=0.0)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=MAX_LR)
        estimate = pruner.total_steps(BATCH)
        sched = None if make is None else make(opt, estimate)
        if state is not None:
            pruner.load_state_dict(state["pruner"])
        if wrap and sched is not None:
            sched = ProgressScheduler(sched, pruner, BATCH)
            if state is not None:
                sched.load_state_dict(state["sched"])
        return pruner, opt, sched, estimate

    pruner, opt, sched, estimate = build()
    lrs = []
    for epoch in range(EPOCHS):
        for b, batch in enumerate(pruner.epoch_indices.split(BATCH)):
            if (epoch, b) == resume_at:
                saved = {"pruner": pruner.state_dict(), "sched": sched.state_dict()}
                pruner, opt, sched, _ = build(saved)
            lrs.append(opt.param_groups[0]["lr"])
            with torch.no_grad():
                pruner.step(logits[batch], labels[batch], batch)
            opt.step()
            for _ in range(steps_per_call if sched is not None else 0):
                sched.step()
        pruner.next_epoch()
    return estimate, lrs, sched


def _seed_where(policy, more: bool) -> int:
    """A seed whose run takes more (or fewer) steps than first estimated: infobatch drops at random."""
    for seed in range(20):
        estimate, lrs, _ = pruned_run(policy, seed)
        if (len(lrs) > estimate) if more else (len(lrs) < estimate):
            return seed
    raise AssertionError(f"no seed in 0..19 takes {'more' if more else 'fewer'} steps than estimated")


@pytest.fixture(scope="module")
def seeds():
    return {"more": _seed_where("infobatch", True), "fewer": _seed_where("infobatch", False)}


def test_plain_schedulers_break_when_the_run_takes_more_steps(seeds):
    """What the wrapper is for: built for the first estimate, OneCycleLR raises and a cosine rises again."""
    with pytest.raises(ValueError, match="Tried to step"):
        pruned_run("infobatch", seeds["more"], one_cycle, wrap=False)
    estimate, lrs, _ = pruned_run("infobatch", seeds["more"], cosine, wrap=False)
    assert lrs[-1] > lrs[estimate - 1], "past T_max the cosine comes back up"


@pytest.mark.parametrize("case", ["more", "fewer", "random"])
@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_scheduler_spans_the_whole_pruned_run(kind, case, seeds):
    make = SCHEDULERS[kind]
    policy, seed = ("random", 0) if case == "random" else ("infobatch", seeds[case])
    estimate, lrs, sched = pruned_run(policy, seed, make)
    taken = len(lrs)
    assert {"more": taken > estimate, "fewer": taken < estimate, "random": taken == estimate}[case]
    assert sched.length == estimate and sched.scheduler.last_epoch == estimate - 1, "ends at its last step"
    assert lrs[-1] == final_lr(make, estimate), "the last batch trains with the schedule's last learning rate"
    if kind == "OneCycleLR":
        assert max(lrs) == pytest.approx(MAX_LR, rel=1e-2), "it reached its peak"
        peak = lrs.index(max(lrs))
        assert 0.25 * taken < peak < 0.35 * taken, "the peak at 30% of the run (OneCycleLR's pct_start)"
    else:
        assert all(a >= b for a, b in zip(lrs, lrs[1:])), "the cosine only comes down"
        assert lrs[taken // 2] == pytest.approx(0.01 + (MAX_LR - 0.01) / 2, rel=0.05), "half way at half the run"


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_exact_estimate_changes_nothing(kind):
    """The random policy keeps exactly keep_ratio * N: the wrapped scheduler gives the plain one's values."""
    _, wrapped, _ = pruned_run("random", 0, SCHEDULERS[kind])
    _, plain, _ = pruned_run("random", 0, SCHEDULERS[kind], wrap=False)
    assert wrapped == plain


def test_resume_and_extra_step_calls_change_nothing(seeds):
    _, lrs, _ = pruned_run("infobatch", seeds["more"], one_cycle)
    _, resumed, _ = pruned_run("infobatch", seeds["more"], one_cycle, resume_at=(2, 3))
    assert resumed == lrs, "rebuilt from the pruner's and its own state, it goes on the same way"
    _, twice, _ = pruned_run("infobatch", seeds["more"], one_cycle, steps_per_call=2)
    assert twice == lrs, "progress comes from the pruner: a second step() per batch is harmless"


def test_steps_past_the_plan_stay_at_the_end():
    """Batches beyond the pruner's epochs (Trainer(max_epochs) above the pruner's epochs, say): the scheduler
    stays at its last step instead of raising (OneCycleLR) or coming back up (cosine)."""
    pruner = DynamicPruner(N, C, epochs=2, keep_ratio=0.5, device="cpu")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=MAX_LR)
    planned = pruner.total_steps(BATCH)
    sched = ProgressScheduler(one_cycle(opt, planned), pruner, BATCH)
    logits, labels = torch.randn(N, C), torch.arange(N) % C
    for _ in range(planned + 20):
        batch = torch.randperm(N)[:BATCH]
        pruner.step(logits[batch], labels[batch], batch)
        opt.step()
        sched.step()
    assert sched.scheduler.last_epoch == planned - 1
    assert opt.param_groups[0]["lr"] == final_lr(one_cycle, planned) < 1e-4 * MAX_LR


def test_rebuilt_without_its_state_starts_where_the_pruner_is():
    pruner = DynamicPruner(N, C, epochs=EPOCHS, keep_ratio=0.5, device="cpu")
    for batch in pruner.epoch_indices[:20 * BATCH].split(BATCH):  # 20 batches trained before the scheduler exists
        pruner.step(torch.randn(BATCH, C), batch % C, batch)
    assert pruner.step_count == 20
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=MAX_LR)
    total = pruner.total_steps(BATCH)
    sched = ProgressScheduler(cosine(opt, 100), pruner, BATCH)
    assert sched.scheduler.last_epoch == 99 * 20 // (total - 1) > 0
    expected = 0.01 + (MAX_LR - 0.01) * (1 + math.cos(math.pi * (99 * 20 // (total - 1)) / 100)) / 2
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_bad_arguments():
    pruner = DynamicPruner(N, C, epochs=EPOCHS, device="cpu")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="scheduler must be a torch.optim.lr_scheduler.LRScheduler"):
        ProgressScheduler(opt, pruner, BATCH)
    with pytest.raises(ValueError, match="length: give the number of steps LambdaLR was built for"):
        ProgressScheduler(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), pruner, BATCH)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        ProgressScheduler(cosine(opt, 10), pruner, 0)
