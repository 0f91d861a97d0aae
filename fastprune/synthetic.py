"""A synthetic noisy-label classification task: the pruner end to end in seconds on a CPU.

Samples are points of a Gaussian mixture (one component per class); a fraction
of the training labels are flipped.  Stand-ins for CLIP embeddings are built
the way CLIP behaves: each sample's "image embedding" points toward its *true*
class's "text embedding", so a flipped label shows up as low consistency.
Used by ``fastprune demo`` until the real-data demo lands, and by tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .pruner import DynamicPruner


@dataclass
class NoisyTask:
    x: torch.Tensor  # N x F training inputs
    y: torch.Tensor  # N given (possibly flipped) labels
    y_true: torch.Tensor  # N true labels
    flipped: torch.Tensor  # indices whose label was flipped
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_emb: torch.Tensor  # N x D, unit norm
    text_emb: torch.Tensor  # C x D, unit norm


def make_task(num_samples=20_000, num_classes=20, features=32, emb_dim=64, noise=0.1, seed=0) -> NoisyTask:
    """Build the task deterministically from ``seed`` (a private generator; global RNGs untouched)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, features, generator=g) * 1.2
    spread = torch.rand(num_classes, generator=g) * 1.5 + 0.7  # some classes are harder

    def draw(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = centers[y] + torch.randn(n, features, generator=g) * spread[y, None]
        return x, y

    x, y_true = draw(num_samples)
    x_test, y_test = draw(num_samples // 4)
    flipped = torch.randperm(num_samples, generator=g)[: int(noise * num_samples)]
    y = y_true.clone()
    y[flipped] = (y_true[flipped] + torch.randint(1, num_classes, (flipped.numel(),), generator=g)) % num_classes
    text = F.normalize(torch.randn(num_classes, emb_dim, generator=g), dim=1)
    image = F.normalize(text[y_true] + 0.08 * torch.randn(num_samples, emb_dim, generator=g), dim=1)
    return NoisyTask(x, y, y_true, flipped, x_test, y_test, image, text)


def _model(features, num_classes, seed):
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(features, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                   torch.nn.ReLU(), torch.nn.Linear(128, num_classes))


def train(task: NoisyTask, *, policy="infobatch", keep_ratio=0.7, noise_ratio=0.1, epochs=12, batch_size=256,
          lr=0.05, seed=0, device="cpu", log=print) -> dict:
    """Train a small MLP with the pruner; returns accuracy, visits saved and noise-filter recall."""
    n, c = task.y.numel(), int(task.text_emb.shape[0])
    use_emb = noise_ratio > 0
    pruner = DynamicPruner(n, c, epochs=epochs, keep_ratio=keep_ratio, policy=policy, noise_ratio=noise_ratio,
                           image_emb=task.image_emb.to(device) if use_emb else None,
                           text_emb=task.text_emb.to(device) if use_emb else None, seed=seed, device=device)
    model = _model(task.x.shape[1], c, seed).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=pruner.total_steps(batch_size) + 1)
    x, y = task.x.to(device), task.y.to(device)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = pruner.epoch_indices.to(device)
        model.train()
        for i in range(0, order.numel(), batch_size):
            idx = order[i:i + batch_size]
            loss = pruner.step(model(x[idx]), y[idx], idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, task, device)
        h = pruner.history[-1]
        log(f"  epoch {epoch:2d}  {h['policy']:9s}  trained {h['kept']:6d}/{n}  left out as noisy {h['noisy']:5d}"
            f"  test acc {acc:6.2%}")
        pruner.next_epoch()
    flagged = set(pruner.suspected_noisy().tolist())
    planted = set(task.flipped.tolist())
    return {"policy": policy, "accuracy": accuracy(model, task, device), "visits_saved": pruner.visits_saved,
            "noise_precision": len(flagged & planted) / max(len(flagged), 1),
            "noise_recall": len(flagged & planted) / max(len(planted), 1), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def accuracy(model, task: NoisyTask, device) -> float:
    model.eval()
    pred = model(task.x_test.to(device)).argmax(1).cpu()
    return (pred == task.y_test).float().mean().item()


def demo(epochs=12, num_samples=20_000, device=None, log=print) -> list[dict]:
    """Full training vs. fastprune (infobatch + noise filter) on the synthetic task; prints a summary."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task = make_task(num_samples=num_samples)
    log(f"synthetic task: {num_samples} samples, {task.text_emb.shape[0]} classes, "
        f"{task.flipped.numel()} labels flipped; device {device}")
    runs = []
    for name, kw in (("full data (baseline)", dict(policy="full", noise_ratio=0.0)),
                     ("fastprune infobatch 0.7 + noise filter", dict(policy="infobatch", keep_ratio=0.7,
                                                                     noise_ratio=0.1))):
        log(f"\n{name}")
        runs.append(dict(train(task, epochs=epochs, device=device, log=log, **kw), name=name))
    log("\n| run | test accuracy | sample visits saved | noisy labels caught (recall / precision) | time |")
    log("|---|---|---|---|---|")
    for r in runs:
        noise = "-" if r["policy"] == "full" else f"{r['noise_recall']:.0%} / {r['noise_precision']:.0%}"
        log(f"| {r['name']} | {r['accuracy']:.2%} | {r['visits_saved']:.1%} | {noise} | {r['seconds']:.1f} s |")
    return runs
