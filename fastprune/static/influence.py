"""Influence-function dataset pruning on a linear softmax head (after Yang et al., ICLR 2023).

The head ``theta`` (C x (F+1), bias as a constant feature) minimises the mean cross-entropy plus
``l2/2 * ||theta||^2``.  Removing a set S of training samples changes the optimum by approximately

    delta(S) = (1/N) * H^-1 * sum_{i in S} g_i,      g_i = (softmax_i - onehot_i) (x) [x_i, 1]

with H the Hessian of the regularised mean loss.  H is exact when the head is small (P = C*(F+1) <=
``exact_limit``); beyond, it is Kronecker-factored (K-FAC: H ~ (G + sqrt(l2) I) (x) (A + sqrt(l2) I) with
A = E[x x^T], G = E[diag(p) - p p^T]), so that no N x P matrix is ever formed.

Solver (ours; the paper states an optimisation problem, not a required solver): greedy with a look-ahead
window.  Candidates come in increasing order of their own influence norm; at each step, among the next
``window`` candidates, the one that keeps ||delta(S)|| smallest joins S (samples whose influences cancel are
removed together).  With ``prune_ratio`` it removes exactly that many samples; with ``epsilon`` it removes
samples for as long as ||delta(S)||_2 <= epsilon.  The steps run on the influences' device and never read a
value back per step (on CUDA: no per-step synchronisation); the host reads the removed indices at the end,
or with ``epsilon`` every 256 steps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearHead:
    """A fitted softmax head: ``weight`` is C x (F + 1), its last column the bias."""

    weight: torch.Tensor
    l2: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return _with_bias(features.to(self.weight.dtype)) @ self.weight.T


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def _check(features, labels, num_classes=None):
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a 2-D float tensor (N x F), got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError("labels must be a 1-D integer tensor")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"features has {features.shape[0]} rows but labels has {labels.shape[0]}")
    if features.shape[0] == 0:
        raise ValueError("features is empty (0 samples)")
    if not torch.isfinite(features).all():
        bad = int(torch.nonzero(~torch.isfinite(features).all(dim=1))[0, 0])
        raise ValueError(f"features: row {bad} has NaN or Inf values")
    c = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must be in [0, {c}); got values {int(labels.min())}..{int(labels.max())}")
    return c


def fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, l2: float = 1e-3,
             max_iter: int = 500, dtype: torch.dtype = torch.float64) -> LinearHead:
    """Minimise mean CE + l2/2 ||theta||^2 with full-batch L-BFGS (to the precision influences need)."""
    c = _check(features, labels, num_classes)
    if not (isinstance(l2, (int, float)) and l2 >= 0 and math.isfinite(l2)):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    x = _with_bias(features.to(dtype))
    y = labels.to(x.device, torch.int64)
    w = torch.zeros(c, x.shape[1], dtype=dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearHead(w.detach(), float(l2))


class _Exact:
    """Influence vectors I_i = H^-1 g_i as an N x P matrix (small heads)."""

    def __init__(self, x, r, s, l2):
        n, f1 = x.shape
        c = r.shape[1]
        h = torch.empty(c, f1, c, f1, dtype=x.dtype, device=x.device)
        for a in range(c):
            for b in range(a, c):
                block = (x * s[:, a, b, None]).T @ x / n
                h[a, :, b, :] = block
                h[b, :, a, :] = block.T
        h = h.reshape(c * f1, c * f1) + l2 * torch.eye(c * f1, dtype=x.dtype, device=x.device)
        try:
            chol = torch.linalg.cholesky(h)
        except RuntimeError as e:
            raise ValueError("the Hessian is singular: use l2 > 0 (regularisation makes it positive definite)") from e
        g = (r[:, :, None] * x[:, None, :]).reshape(n, c * f1)  # g_i = r_i (x) x_i
        self.vectors = torch.cholesky_solve(g.T, chol).T  # N x P
        self.n = n

    def norms(self):
        return self.vectors.norm(dim=1)

    def window(self, idx):
        return self.vectors[idx]

    def zero(self):
        return torch.zeros(self.vectors.shape[1], dtype=self.vectors.dtype, device=self.vectors.device)


class _KFAC:
    """Factored influences I_i = (G^-1 r_i) (x) (A^-1 x_i), never materialised as N x P."""

    def __init__(self, x, r, s, l2):
        n = x.shape[0]
        damp = math.sqrt(l2) if l2 > 0 else 0.0
        a = x.T @ x / n + damp * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        gmat = s.mean(dim=0) + damp * torch.eye(r.shape[1], dtype=x.dtype, device=x.device)
        try:
            self.u = torch.linalg.solve(a, x.T).T  # N x F1
            self.v = torch.linalg.solve(gmat, r.T).T  # N x C
        except RuntimeError as e:
            raise ValueError("the Hessian is singular: use l2 > 0 (regularisation makes it positive definite)") from e
        self.n = n

    def norms(self):
        return self.v.norm(dim=1) * self.u.norm(dim=1)

    def window(self, idx):
        return (self.v[idx, :, None] * self.u[idx, None, :]).flatten(1)

    def zero(self):
        return torch.zeros(self.v.shape[1] * self.u.shape[1], dtype=self.u.dtype, device=self.u.device)


def _influence(features, labels, head: LinearHead, exact_limit: int):
    x = _with_bias(features.to(head.weight.device, head.weight.dtype))
    p = torch.softmax(x @ head.weight.T, dim=1)
    r = p - F.one_hot(labels.to(x.device, torch.int64), p.shape[1]).to(p.dtype)
    s = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if head.weight.numel() <= exact_limit:
        return _Exact(x, r, s, head.l2)
    if head.l2 <= 0:
        raise ValueError("the factored Hessian needs l2 > 0")
    return _KFAC(x, r, s, head.l2)


def influence_scores(features: torch.Tensor, labels: torch.Tensor, head: LinearHead | None = None,
                     l2: float = 1e-3, exact_limit: int = 4096) -> torch.Tensor:
    """||delta({i})||_2: the estimated parameter change of removing each sample alone (N,)."""
    _check(features, labels)
    head = head or fit_head(features, labels, l2=l2)
    inf = _influence(features, labels, head, exact_limit)
    return inf.norms() / inf.n


def influence_prune(features: torch.Tensor, labels: torch.Tensor, prune_ratio: float | None = None,
                    epsilon: float | None = None, l2: float = 1e-3, head: LinearHead | None = None,
                    window: int = 32, exact_limit: int = 4096) -> torch.Tensor:
    """Indices to keep (sorted LongTensor) after removing a set whose estimated parameter change is small.

    Exactly one of ``prune_ratio`` (fraction removed, in [0, 1]) and ``epsilon`` (bound on
    ||delta(S)||_2) must be given.
    """
    if (prune_ratio is None) == (epsilon is None):
        raise ValueError("give exactly one of prune_ratio and epsilon")
    if prune_ratio is not None and not (isinstance(prune_ratio, (int, float)) and 0.0 <= prune_ratio <= 1.0):
        raise ValueError(f"prune_ratio must be in [0, 1], got {prune_ratio!r}")
    if epsilon is not None and not (isinstance(epsilon, (int, float)) and epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    n = features.shape[0] if isinstance(features, torch.Tensor) else 0
    _check(features, labels)
    head = head or fit_head(features, labels, l2=l2)
    inf = _influence(features, labels, head, exact_limit)
    target = round(prune_ratio * n) if prune_ratio is not None else n
    removed = _greedy(inf, target, epsilon, max(1, window))
    if epsilon is not None and not removed:
        warnings.warn(f"epsilon={epsilon} is smaller than every single sample's estimated parameter change "
                      f"(smallest {float(inf.norms().min()) / n:.3g}); nothing removed", RuntimeWarning,
                      stacklevel=2)
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.tensor(removed, dtype=torch.int64)] = False
    return torch.nonzero(keep)[:, 0]


class _GreedyState:
    """Device state of the greedy removal (see ``_greedy``); ``step(t)`` never reads a value back."""

    def __init__(self, inf, target: int, window: int):
        n = inf.n
        self.inf, self.n = inf, n
        self.v = inf.zero()
        dev = self.v.device
        self.order = torch.argsort(inf.norms())  # on the device: no read
        self.w = w = min(window, n)
        self.rank = torch.arange(w, device=dev)  # slot -> position in the order (big: empty slot)
        self.cand = inf.window(self.order[:w])  # w x P
        self.pen = torch.zeros(w, dtype=self.v.dtype, device=dev)  # +inf marks an empty slot
        self.picked = torch.empty(target, dtype=torch.int64, device=dev)  # ranks of the removed candidates
        self.chosen = torch.empty(target, dtype=self.v.dtype, device=dev)  # ||delta(S)|| after each removal
        self.big = n + w  # larger than any rank: for the tie-break

    def step(self, t: int) -> None:
        norms = (self.v[None, :] + self.cand).norm(dim=1) * (1.0 / self.n) + self.pen
        m = norms.min()
        j = torch.where(norms == m, self.rank, self.big).argmin().view(1)  # first minimum in rank order
        self.chosen[t] = m
        self.picked[t:t + 1] = self.rank.index_select(0, j)
        self.v += self.cand.index_select(0, j)[0]
        nxt = self.w + t  # the t-th refill is the (w + t)-th candidate, whichever slot was picked
        if nxt < self.n:
            self.rank.index_fill_(0, j, nxt)
            self.cand.index_copy_(0, j, self.inf.window(self.order[nxt:nxt + 1]))
        else:
            self.rank.index_fill_(0, j, self.big)
            self.pen.index_fill_(0, j, math.inf)


def _greedy(inf, target: int, epsilon: float | None, window: int, sync_every: int = 256) -> list[int]:
    """Greedy removal with a look-ahead window, run on the influences' device without per-step host reads.

    The pool is ``window`` slots of candidates; a slot's rank is its candidate's position in the order of
    increasing own influence (the pool of the one-step-at-a-time formulation is these candidates sorted by
    rank).  Each step picks the slot with the smallest ||delta(S + i)||, ties to the lowest rank (what
    argmin over the rank-sorted pool picks), and refills that slot with the next candidate in the order:
    the t-th step's refill is the (window + t)-th candidate whatever was picked, so the host never needs the
    pick.  Picks and norms stay on the device; the host reads them once at the end (with ``epsilon``, once
    every ``sync_every`` steps, and stops at the first step whose norm exceeds it).  The selection is the
    same as that of the loop that reads each step's pick.
    """
    target = min(int(target), inf.n)
    if target <= 0:
        return []
    st = _GreedyState(inf, target, max(1, int(window)))
    block = max(1, int(sync_every)) if epsilon is not None else target
    done = 0
    for t in range(target):
        st.step(t)
        if (t + 1) % block == 0 or t + 1 == target:  # host read: once per block (epsilon) or at the end
            if epsilon is not None:
                over = torch.nonzero(st.chosen[done:t + 1] > epsilon)
                if over.numel():
                    done += int(over[0, 0])
                    break
            done = t + 1
    return st.order[st.picked[:done]].tolist()
