"""End-of-run outputs: PNG plots and the suspected-noisy CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def plot_run(history: list[dict], pruner, out: Path) -> list[Path]:
    """Kept fraction and accuracy per epoch, score and consistency histograms, suspected-noisy count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    epochs = [h["epoch"] for h in history]

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(epochs, [h["kept_fraction"] for h in history], marker="o")
    ax[0].set(xlabel="epoch", ylabel="fraction of the dataset trained", ylim=(0, 1.05), title="kept fraction")
    if any(h.get("val_top1") is not None for h in history):
        ax[1].plot(epochs, [h.get("val_top1") for h in history], marker="o", label="top-1")
        if any(h.get("val_top5") is not None for h in history):
            ax[1].plot(epochs, [h.get("val_top5") for h in history], marker="s", label="top-5")
        ax[1].legend()
    ax[1].set(xlabel="epoch", ylabel="validation accuracy", title="accuracy")
    fig.tight_layout()
    paths.append(_save(fig, out / "kept_and_accuracy.png"))

    seen = pruner.visits.cpu() > 0
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    _hist(ax[0], pruner.scores.cpu()[seen], "tab:blue")
    ax[0].set(xlabel="EMA cross-entropy", ylabel="samples", title="score")
    if pruner.text_emb is not None:
        _hist(ax[1], pruner.consistency.cpu()[seen], "tab:green")
        ax[1].set(xlabel="cosine(image, label text)", title="consistency")
    else:
        ax[1].text(0.5, 0.5, "no embeddings", ha="center", va="center")
        ax[1].set_axis_off()
    fig.tight_layout()
    paths.append(_save(fig, out / "score_consistency_hist.png"))

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.bar(epochs, [h["suspected_noisy"] for h in history])
    ax.set(xlabel="epoch", ylabel="samples", title="suspected mislabeled (acted on)")
    fig.tight_layout()
    paths.append(_save(fig, out / "suspected_noisy.png"))
    return paths


def _hist(ax, values: torch.Tensor, color: str) -> None:
    """A histogram of the finite values; a plot never stops a finished run from writing its outputs."""
    finite = values[torch.isfinite(values)]
    if finite.numel():
        ax.hist(finite.numpy(), bins=50, color=color)
    left = values.numel() - finite.numel()
    if left or not finite.numel():
        ax.text(0.98, 0.95, f"{left} non-finite values left out" if left else "no samples seen",
                transform=ax.transAxes, ha="right", va="top", fontsize=8)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_suspected_noisy(pruner, index, path: Path) -> int:
    """One CSV row per sample the noise decisions act on, most suspected first: where it is, its given
    label, the action taken and the suggested label, the classes the model and CLIP prefer with their
    margins (the model's: area under the margin), the belief that the label is wrong, consistency, score."""
    from .noise import ACTION_NAMES

    noisy = pruner.suspected_noisy()
    dev = pruner.device
    cols = {"action": pruner.noise_actions, "suggested_label": pruner.relabeled, "model_label": pruner.model_pred,
            "model_margin": pruner.model_margin, "clip_label": pruner.clip_pred, "clip_margin": pruner.clip_margin,
            "belief": pruner.noise_belief, "consistency": pruner.consistency, "score": pruner.scores}
    picked = {k: v[noisy.to(dev)].cpu() for k, v in cols.items()}
    order = torch.argsort(picked["belief"], descending=True, stable=True).tolist()
    labels = index.labels

    def cls(k):
        return index.classes[k] if k >= 0 else ""

    def num(x):
        return "" if x != x else f"{x:.4f}"  # NaN: unknown

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "given_label", *cols])
        for k in order:
            i = int(noisy[k])
            row = [ACTION_NAMES[int(picked["action"][k])], cls(int(picked["suggested_label"][k])),
                   cls(int(picked["model_label"][k])), num(float(picked["model_margin"][k])),
                   cls(int(picked["clip_label"][k])), num(float(picked["clip_margin"][k]))]
            row += [num(float(picked[name][k])) for name in ("belief", "consistency", "score")]
            w.writerow([i, index.files[i], index.classes[int(labels[i])], *row])
    return int(noisy.numel())


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of rows whose label is among the top-k logits, for each k (device tensors: no sync)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, :min(k, kmax)].any(1).sum() for k in ks]
