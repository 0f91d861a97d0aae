"""Score baselines for static pruning: EL2N, forgetting events, random subsets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pruner import DynamicPruner
from .influence import _check


def _head(features, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
        lin.bias.zero_()
    return lin, g


def el2n_scores(features: torch.Tensor, labels: torch.Tensor, epochs: int = 5, seeds=(0, 1, 2, 3, 4),
                lr: float = 0.1, batch_size: int = 128, num_classes: int | None = None) -> torch.Tensor:
    """EL2N (Paul et al., 2021): ||softmax(f(x)) - onehot(y)||_2 early in training, averaged over seeds.

    ``f`` is a linear head on ``features`` trained for ``epochs`` epochs of minibatch SGD per seed.
    High scores are hard or mislabeled samples; pruning keeps the highest.
    """
    c = _check(features, labels, num_classes)
    x, y = features.float(), labels.to(torch.int64)
    total = torch.zeros(x.shape[0])
    for seed in seeds:
        lin, g = _head(x, c, seed)
        opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9)
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0], generator=g).split(batch_size):
                loss = F.cross_entropy(lin(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            total += (torch.softmax(lin(x), dim=1) - F.one_hot(y, c).float()).norm(dim=1)
    return total / len(seeds)


def forgetting_scores(features: torch.Tensor, labels: torch.Tensor, epochs: int = 20, lr: float = 0.1,
                      batch_size: int = 128, seed: int = 0, num_classes: int | None = None) -> torch.Tensor:
    """Forgetting events (Toneva et al., 2019): how often a sample goes from correct to wrong in training.

    Correctness comes from the fused step's per-sample output (``pruner.last_step.correct``), measured
    when the sample is presented.  Samples never learned score ``epochs + 1`` (more than any count).
    """
    c = _check(features, labels, num_classes)
    x, y = features.float(), labels.to(torch.int64)
    n = x.shape[0]
    lin, g = _head(x, c, seed)
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9)
    pruner = DynamicPruner(n, c, epochs=epochs, policy="full", seed=seed, device="cpu")
    prev = torch.zeros(n, dtype=torch.bool)
    learned = torch.zeros(n, dtype=torch.bool)
    forgets = torch.zeros(n)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch_size):
            loss = pruner.step(lin(x[idx]), y[idx], idx)
            correct = pruner.last_step.correct
            forgets[idx] += (prev[idx] & ~correct).float()
            prev[idx] = correct
            learned[idx] |= correct
            opt.zero_grad()
            loss.backward()
            opt.step()
        pruner.next_epoch()
    return torch.where(learned, forgets, torch.full_like(forgets, float(epochs + 1)))


def random_subset(n: int, keep: float, seed: int = 0) -> torch.Tensor:
    """A uniform random subset of ``round(keep * n)`` indices (sorted), the classic strong baseline."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if not (isinstance(keep, (int, float)) and 0.0 <= keep <= 1.0):
        raise ValueError(f"keep must be in [0, 1], got {keep!r}")
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=g)[: round(keep * n)]).values
