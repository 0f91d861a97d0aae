"""Histograms that say what the pruner did: each sample's score (or priority) coloured by what happened to it in
the last selection that pruned, with the policy's threshold; and the noise evidence coloured by the action
taken, with the decisions' thresholds (belief 0.5 suspected, 0.9 left out; margins below 0 point away)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .noise import ACTION_NAMES, EXCLUDE_ABOVE, SUSPECT_ABOVE
from .plotting import COLORS, pyplot, save_png
from .sample_table import (DOWN_WEIGHTED, EXCLUDED, KEPT, PRUNED, RELABELED, STATUS_NAMES, UNSEEN, SampleTable,
                           SelectionRecord)

SELECTION_PNG = "score_consistency_hist.png"
NOISE_PNG = "suspected_noisy.png"
BINS = 50
SCATTER_MAX = 20000  # unflagged points drawn in the margin scatter (all flagged ones are)

_STACK = (KEPT, PRUNED, DOWN_WEIGHTED, EXCLUDED, RELABELED)  # bottom to top
_STATUS_COLOR = {KEPT: COLORS["kept"], PRUNED: COLORS["pruned"], DOWN_WEIGHTED: COLORS["down-weight"],
                 EXCLUDED: COLORS["exclude"], RELABELED: COLORS["relabel"], UNSEEN: COLORS["not scored yet"]}
_ACTIONS = (0, 1, 2, 3)  # keep, down-weight, exclude, relabel


def _bins(values: np.ndarray, log: bool) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if log:
        return np.geomspace(lo, hi * 1.0001, BINS + 1)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, BINS + 1)


def _wants_log(values: np.ndarray) -> bool:
    """A log axis when the values are positive and span more than two decades (scores of learned samples
    crowd near zero on a linear one)."""
    return values.size > 1 and values.min() > 0 and values.max() / values.min() > 100


def _stacked(ax, values: np.ndarray, groups: np.ndarray, order, colors: dict, names: dict, log: bool | None = None,
             bins=None) -> bool:
    """A stacked histogram of the finite ``values``, one layer per group in ``order`` (legend: name and count);
    a note for non-finite values left out.  Returns whether the axis is logarithmic."""
    finite = np.isfinite(values)
    left = int((~finite).sum())
    values, groups = values[finite], groups[finite]
    if not values.size:
        ax.text(0.5, 0.5, "no samples scored", ha="center", va="center", transform=ax.transAxes)
        return False
    log = _wants_log(values) if log is None else log
    if log:
        values = np.maximum(values, values.max() * 1e-5)  # the bins start five decades below the largest
    edges = _bins(values, log) if bins is None else bins
    layers = [(values[groups == g], colors[g], f"{names[g]} ({int((groups == g).sum()):,})") for g in order
              if (groups == g).any()]
    ax.hist([v for v, _, _ in layers], bins=edges, stacked=True, color=[c for _, c, _ in layers],
            label=[n for _, _, n in layers], edgecolor="white", linewidth=0.3)
    if log:
        ax.set_xscale("log")
    if left:
        ax.text(0.99, 0.99, f"{left:,} non-finite values left out", transform=ax.transAxes, ha="right", va="top",
                fontsize=7)
    return log


def plot_selection(table: SampleTable, selection: SelectionRecord | None, path: Path) -> Path:
    """Left: the score (priority) of every scored sample in the recorded selection, stacked by what happened
    to it (kept, pruned, flagged), with the policy's threshold.  Right, where it says something: the
    consistency (with embeddings) or, when pruning made them differ, the visits, stacked the same way."""
    if selection is not None and not selection.seen.any():
        selection = None  # a one-epoch run recorded only its first selection, before any sample was scored
    if selection is not None:
        status, x = selection.status, selection.priority.astype(np.float64)
        quantity = "score (EMA cross-entropy)" if selection.priority_is_score else \
            "priority = score × consistency factor"
        title = f"epoch {selection.epoch}'s selection ({selection.policy}"
        title += ", the last that pruned)" if selection.policy != "full" else ", nothing pruned)"
    else:  # no selection recorded: the final scores and the noise actions only
        status = np.where(table.visits > 0, KEPT, UNSEEN).astype(np.int8)
        for action, s in ((1, DOWN_WEIGHTED), (2, EXCLUDED), (3, RELABELED)):
            status[table.action == action] = s
        x, quantity = table.score.astype(np.float64), "score (EMA cross-entropy)"
        title = "final scores (no pruned selection recorded)"
    seen = status != UNSEEN
    consistency = np.isfinite(table.clip_margin).any()
    visits_differ = np.unique(table.visits[seen]).size > 1
    plt = pyplot()
    panels = 2 if consistency or visits_differ else 1
    fig, ax = plt.subplots(1, panels, figsize=(6 * panels, 4.4), squeeze=False)
    ax = ax[0]
    log = _stacked(ax[0], x[seen], status[seen], _STACK, _STATUS_COLOR, STATUS_NAMES)
    if selection is not None and np.isfinite(selection.threshold):
        t = selection.threshold
        what = (f"infobatch threshold: mean priority {t:.3g}\n(below it, dropped with p = {selection.drop_prob:.2f})"
                if selection.policy == "infobatch" else f"topk threshold: lowest kept priority {t:.3g}")
        ax[0].axvline(t, color="black", linestyle="--", linewidth=1.2, label=what)
    ax[0].set(xlabel=quantity + (", log scale" if log else ""), ylabel="samples", title=title)
    ax[0].legend(fontsize=7.5, loc="upper left" if log else "upper right", framealpha=0.9)
    if consistency:
        _stacked(ax[1], table.consistency.astype(np.float64)[seen], status[seen], _STACK, _STATUS_COLOR,
                 STATUS_NAMES, log=False)
        ax[1].set(xlabel="consistency: cosine(image, label text)", title="consistency, coloured the same way")
    elif visits_differ:
        visits = table.visits.astype(np.float64)[seen]
        _stacked(ax[1], visits, status[seen], _STACK, _STATUS_COLOR, STATUS_NAMES, log=False,
                 bins=np.arange(0.5, int(visits.max()) + 1.5))
        ax[1].set(xlabel="times trained over the run (visits)", title="visits, coloured the same way (no embeddings)")
    if len(ax) > 1:
        ax[1].set_ylabel("samples")
        ax[1].legend(fontsize=7.5, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    return save_png(fig, path)


def plot_noise(table: SampleTable, path: Path) -> Path:
    """Left: the belief that a label is wrong, for samples where some evidence points away, stacked by action,
    with the 0.5 (suspected) and 0.9 (left out or relabeled) lines.  Right: the margins by action, with 0
    (below it, the evidence prefers another class): a scatter of the model's against CLIP's, or the model's
    histogram without embeddings.  Without noise decisions, the margins alone: where wrong labels would show."""
    names = {a: ("kept" if a == 0 else ACTION_NAMES[a]) for a in _ACTIONS}
    colors = {a: COLORS[ACTION_NAMES[a]] for a in _ACTIONS}
    plt = pyplot()
    panels = 2 if table.noise_decisions else 1
    fig, ax = plt.subplots(1, panels, figsize=(6 * panels, 4.4), squeeze=False)
    ax = ax[0]
    if table.noise_decisions:
        some = table.belief > 0
        _stacked(ax[0], table.belief[some].astype(np.float64), table.action[some], _ACTIONS, colors, names,
                 log=False, bins=np.linspace(0, 1, 41))
        ax[0].axvline(SUSPECT_ABOVE, color="black", linestyle="--", linewidth=1.2,
                      label=f"suspected above {SUSPECT_ABOVE:g} (kept above it: over the --noise-ratio cap)")
        ax[0].axvline(EXCLUDE_ABOVE, color="#8B0000", linestyle=":", linewidth=1.4,
                      label=f"left out (or relabeled) from {EXCLUDE_ABOVE:g}; down-weighted below")
        ax[0].set_yscale("log")  # a handful of unsure samples stays visible beside the sure ones
        ax[0].set(xlim=(0, 1), xlabel="belief that the label is wrong", ylabel="samples (log scale)",
                  title=f"noise decisions: {int(table.flagged.sum()):,} flagged; "
                        f"{int((~some & (table.visits > 0)).sum()):,} scored samples at belief 0 not shown")
        ax[0].legend(fontsize=7.5, loc="upper left", framealpha=0.9)
    evidence = ax[-1]
    if np.isfinite(table.clip_margin).any():
        _margin_scatter(evidence, table, colors, names)
    else:
        _stacked(evidence, table.model_margin.astype(np.float64), table.action, _ACTIONS, colors, names, log=False)
        evidence.axvline(0, color="black", linestyle="--", linewidth=1.2,
                         label="0: below, the model prefers another class")
        evidence.set(xlabel="the model's area under the margin (mean z_label − max other)", ylabel="samples",
                     title="the model's evidence, by action (no embeddings)")
        evidence.legend(fontsize=7.5, loc="upper left", framealpha=0.9)
    if not table.noise_decisions:
        below = int((table.model_margin < 0).sum())
        evidence.set_title(f"noise decisions off (--noise-ratio 0): nothing flagged\nthe evidence: {below:,} "
                           "samples with a mean margin below 0")
    fig.tight_layout()
    return save_png(fig, path)


def _margin_scatter(ax, table: SampleTable, colors: dict, names: dict) -> None:
    x, y = table.model_margin, table.clip_margin
    ok = np.isfinite(x) & np.isfinite(y)
    rng = np.random.default_rng(0)
    for a in _ACTIONS:
        idx = np.flatnonzero(ok & (table.action == a))
        shown = idx if a != 0 or idx.size <= SCATTER_MAX else rng.choice(idx, SCATTER_MAX, replace=False)
        if idx.size:
            sampled = f", {shown.size:,} drawn" if shown.size < idx.size else ""
            label = f"{names[a]} ({idx.size:,}{sampled})"
            ax.scatter(x[shown], y[shown], s=5 if a == 0 else 9, alpha=0.35 if a == 0 else 0.8, color=colors[a],
                       label=label, linewidths=0, rasterized=True)
    ax.axvline(0, color="black", linestyle="--", linewidth=1)
    ax.axhline(0, color="black", linestyle="--", linewidth=1)
    ax.text(0.01, 0.01, "both < 0: both prefer another class\n(the only samples the decisions may flag)",
            transform=ax.transAxes, fontsize=7, va="bottom", ha="left", color="#444444")
    ax.set(xlabel="the model's area under the margin (mean z_label − max other)",
           ylabel="CLIP margin: cos(label) − max cos(other)", title="the evidence, by action")
    ax.legend(fontsize=7.5, loc="upper left", framealpha=0.9, markerscale=2)
