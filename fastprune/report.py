"""A run's report: its plots, the mislabeled-sample gallery and the suspected-noisy CSV, made at the end of a run
or again from its folder (``fastprune report RUN``)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def plot_run(history: list[dict], pruner, out: Path, index=None) -> list[Path]:
    """The run's plots from a live pruner (its current selection and state): see ``plot_figures``."""
    from .sample_table import SampleTable, SelectionRecord

    selection = SelectionRecord.from_pruner(pruner) if pruner.history else None
    return plot_figures(history, SampleTable.from_pruner(pruner, index), selection, out)


def plot_figures(history: list[dict], table, selection, out: Path) -> list[Path]:
    """``kept_and_accuracy.png`` (kept and flagged fractions, validation accuracy per epoch),
    ``score_consistency_hist.png`` (scores by what happened to each sample, with the policy's threshold) and
    ``suspected_noisy.png`` (the noise evidence by action, with the decisions' thresholds)."""
    from .histograms import NOISE_PNG, SELECTION_PNG, plot_noise, plot_selection

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [_plot_epochs(history, len(table), out / "kept_and_accuracy.png"),
            plot_selection(table, selection, out / SELECTION_PNG), plot_noise(table, out / NOISE_PNG)]


def write_report(history: list[dict], table, selection, out: Path, count: int | None = None,
                 data_root: str | None = None, log=print) -> list[Path]:
    """Every figure of a run's report into ``out``: the plots, and the mislabeled-sample gallery when the
    noise decisions flagged samples (otherwise a one-line note says why there is none)."""
    from .gallery import DEFAULT_COUNT, make_gallery

    paths = plot_figures(history, table, selection, out)
    return paths + make_gallery(table, Path(out), DEFAULT_COUNT if count is None else count, data_root, log)


def make_report(run, out=None, count: int | None = None, data_root: str | None = None, log=print) -> list[Path]:
    """Re-make the report of the run in folder ``run`` from that folder alone (``fastprune report``): its
    ``log.jsonl``, ``samples.npz`` and ``selection.npz``; the gallery reads the images where the run found
    them, or under ``data_root``.  Writes into ``out`` (default: the run folder)."""
    from .rundir import prepare_dir
    from .runlog import read_run
    from .sample_table import SAMPLES_FILE, SELECTION_FILE, SampleTable, SelectionRecord

    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"--count must be an integer >= 1, got {count!r}")
    run_log = read_run(run)
    run = Path(run)
    samples = run / SAMPLES_FILE
    if not samples.is_file():
        raise FileNotFoundError(f"run {str(run)!r} has no {SAMPLES_FILE}: the run has not finished, or an older "
                                "fastprune made it (its report is the one it wrote at its end)")
    table = SampleTable.load(samples)
    selection = SelectionRecord.load(run / SELECTION_FILE) if (run / SELECTION_FILE).is_file() else None
    if selection is not None and selection.priority.shape[0] != len(table):
        raise ValueError(f"{str(run / SELECTION_FILE)!r} has {selection.priority.shape[0]} samples but "
                         f"{SAMPLES_FILE} has {len(table)}: they are not from the same run")
    if data_root is not None and not Path(data_root).is_dir():
        raise FileNotFoundError(f"--data {str(data_root)!r} is not a folder")
    out = prepare_dir(run if out is None else out, "--out")
    return write_report(run_log.epochs, table, selection, out, count, data_root, log)


def _plot_epochs(history: list[dict], num_samples: int, path: Path) -> Path:
    """Kept and flagged fractions per epoch; validation accuracy per epoch."""
    from .plotting import COLORS, pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [h["epoch"] for h in history]
    ax[0].plot(epochs, [h["kept_fraction"] for h in history], marker="o", color=COLORS["kept"],
               label="trained (kept)")
    if any(h.get("suspected_noisy") for h in history):
        ax[0].plot(epochs, [h.get("suspected_noisy", 0) / max(num_samples, 1) for h in history], marker="^",
                   color=COLORS["exclude"], label="flagged by the noise decisions")
    ax[0].set(xlabel="epoch", ylabel="fraction of the dataset", ylim=(0, 1.05), title="kept fraction")
    ax[0].legend(fontsize=8, loc="best")
    if any(h.get("val_top1") is not None for h in history):
        ax[1].plot(epochs, [h.get("val_top1") for h in history], marker="o", label="top-1")
        if any(h.get("val_top5") is not None for h in history):
            ax[1].plot(epochs, [h.get("val_top5") for h in history], marker="s", label="top-5")
        ax[1].legend()
    else:
        ax[1].text(0.5, 0.5, "no validation set (--val)", ha="center", va="center", transform=ax[1].transAxes)
    ax[1].set(xlabel="epoch", ylabel="validation accuracy", title="accuracy")
    fig.tight_layout()
    return save_png(fig, path)


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
