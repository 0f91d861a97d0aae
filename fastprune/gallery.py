"""The mislabeled-sample gallery: the samples whose labels the noise decisions trust least, each with its given
label, the class the evidence points to, the action taken and the margins; beside them, the samples of the same
classes the evidence trusts most, so that a wrong label shows against what its class looks like."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .noise import ACTION_NAMES, KEEP
from .plotting import COLORS, display_names, pyplot, save_png, shorten
from .sample_table import SampleTable

SUSPECTED_PNG = "gallery_suspected.png"
CONTRAST_PNG = "gallery_contrast.png"
DEFAULT_COUNT = 24
COLUMNS = 6
THUMBNAIL = 256  # pixels: larger images are shrunk before drawing


def _finite_or(values: np.ndarray, fill: float) -> np.ndarray:
    return np.where(np.isfinite(values), values, fill)


def most_suspected(table: SampleTable, count: int = DEFAULT_COUNT) -> np.ndarray:
    """Indices of the flagged samples (relabeled, excluded or down-weighted) with the highest beliefs, most
    suspected first; equal beliefs by how far the margins point away from the label, then by index."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    flagged = np.flatnonzero(table.flagged)
    away = -(_finite_or(table.model_margin, 0.0) + _finite_or(table.clip_margin, 0.0))[flagged]
    order = np.lexsort((flagged, -away, -table.belief[flagged].astype(np.float64)))
    return flagged[order[:count]]


def least_suspected(table: SampleTable, chosen: np.ndarray) -> np.ndarray:
    """For each index in ``chosen``, a sample of the same given label that the evidence trusts most: not
    flagged, scored, the lowest belief, then the highest margins (the model's, then CLIP's), then the lowest
    index; each used once.  -1 where the class has no such sample left."""
    pool = np.flatnonzero((table.action == KEEP) & (table.visits > 0))
    label = table.label[pool]
    keys = (pool, -_finite_or(table.clip_margin[pool], -np.inf), -_finite_or(table.model_margin[pool], -np.inf),
            table.belief[pool].astype(np.float64), label)
    order = np.lexsort(keys)
    pool, label = pool[order], label[order]
    starts = np.searchsorted(label, table.label[chosen], side="left")
    ends = np.searchsorted(label, table.label[chosen], side="right")
    used: dict[int, int] = {}
    picked = np.full(len(chosen), -1, dtype=np.int64)
    for k, (c, lo, hi) in enumerate(zip(table.label[chosen].tolist(), starts.tolist(), ends.tolist())):
        at = lo + used.get(c, 0)
        if at < hi:
            picked[k] = pool[at]
            used[c] = used.get(c, 0) + 1
    return picked


def suggestion(table: SampleTable, i: int) -> tuple[int, str]:
    """The class sample ``i``'s evidence points to instead of its label, and whose word it is: the class it
    was relabeled to, else the model's and CLIP's preferred class (both when they agree); (-1, "") if none."""
    if table.suggested[i] >= 0:
        return int(table.suggested[i]), "relabeled"
    y, model, clip = int(table.label[i]), int(table.model_pred[i]), int(table.clip_pred[i])
    model = model if model >= 0 and model != y else -1
    clip = clip if clip >= 0 and clip != y else -1
    if model >= 0 and model == clip:
        return model, "model+CLIP"
    if model >= 0:
        return model, "model"
    if clip >= 0:
        return clip, "CLIP"
    return -1, ""


def make_gallery(table: SampleTable, out: Path, count: int = DEFAULT_COUNT, root: str | None = None,
                 log=print) -> list[Path]:
    """Write the two gallery PNGs into ``out``; a run without noise decisions, flags or recorded files gets a
    one-line note instead (and no PNG)."""
    reason = None
    if not table.noise_decisions:
        reason = "the run made no noise decisions (--noise-ratio 0)"
    elif not table.flagged.any():
        reason = "the noise decisions flagged no sample"
    elif not table.files:
        reason = "the run did not record its image files"
    if reason:
        log(f"gallery skipped: {reason}")
        return []
    names = display_names(table.classes)
    paths = table.paths(root)
    suspects = most_suspected(table, count)
    contrast = least_suspected(table, suspects)
    flagged = int(table.flagged.sum())
    fig, missing = _grid(table, suspects, paths, names, "suspected",
                         f"Most suspected labels: {len(suspects)} of {flagged} flagged samples, highest belief first")
    written = [save_png(fig, Path(out) / SUSPECTED_PNG)]
    fig, missing_too = _grid(table, contrast, paths, names, "contrast",
                             "For contrast: the least suspected samples of the same given classes (cell k: the class "
                             "of suspect k)")
    written.append(save_png(fig, Path(out) / CONTRAST_PNG))
    missing += missing_too
    if missing:
        where = table.root if root is None else root
        log(f"gallery: {missing} image{'s' if missing > 1 else ''} could not be read under {where!r} (shown blank)"
            + ("; if the training folder has moved, `fastprune report RUN --data DIR` shows them" if root is None
               else ""))
    return written


_SUBTITLE = {
    "suspected": "given label → the class the evidence points to (whose word) · action · belief that the label "
                 "is wrong\nAUM: the model's mean margin z_label − max other (< 0: it prefers another class) · "
                 "CLIP: cosine margin of the image to the label's text",
    "contrast": "label · the model's latest prediction · belief · AUM: the model's mean margin z_label − max "
                "other · CLIP: cosine margin",
}
CELL_W, IMAGE_H, TEXT_H, HEADER_H = 2.45, 1.75, 0.78, 0.8  # inches


def _grid(table: SampleTable, indices: np.ndarray, paths: list[str], names: list[str], kind: str, title: str):
    """One grid figure of ``indices`` (-1: an empty cell); returns it and how many images could not be read."""
    plt = pyplot()
    n = max(1, len(indices))
    cols = min(COLUMNS, n)
    rows = math.ceil(n / cols)
    width = cols * CELL_W + 0.2
    height = HEADER_H + rows * (IMAGE_H + TEXT_H) + 0.1
    fig = plt.figure(figsize=(max(width, 7.0), height))
    width = max(width, 7.0)
    fig.text(0.5, 1 - 0.12 / height, title, ha="center", va="top", fontsize=11, weight="bold")
    fig.text(0.5, 1 - 0.38 / height, _SUBTITLE[kind], ha="center", va="top", fontsize=7.5, color="#444444",
             linespacing=1.3)
    x0 = (width - cols * CELL_W) / 2
    missing = 0
    for k, i in enumerate(indices.tolist()):
        r, c = divmod(k, cols)
        left = x0 + c * CELL_W + (CELL_W - IMAGE_H) / 2
        top = HEADER_H + r * (IMAGE_H + TEXT_H)
        ax = fig.add_axes([left / width, 1 - (top + IMAGE_H) / height, IMAGE_H / width, IMAGE_H / height])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.98, str(k + 1), transform=ax.transAxes, ha="left", va="top", fontsize=7,
                color="white", bbox={"boxstyle": "square,pad=0.15", "fc": "#333333", "ec": "none", "alpha": 0.8})
        centre = (x0 + c * CELL_W + CELL_W / 2) / width
        if i < 0:
            ax.set_facecolor("#F2F2F2")
            ax.text(0.5, 0.5, "no unflagged sample\nof this class", ha="center", va="center", fontsize=7.5,
                    color="#666666", transform=ax.transAxes)
            continue
        if not _draw_image(ax, paths[i]):
            missing += 1
        lines = _cell_lines(table, i, names, kind)
        action = ACTION_NAMES[int(table.action[i])]
        for side in ax.spines.values():
            side.set_edgecolor(COLORS.get(action, "#333333"))
            side.set_linewidth(2.0)
        y = top + IMAGE_H + 0.06
        for text, color, weight in lines:
            fig.text(centre, 1 - y / height, text, ha="center", va="top", fontsize=7.5, color=color, weight=weight)
            y += 0.165
    return fig, missing


def _cell_lines(table: SampleTable, i: int, names: list[str], kind: str) -> list[tuple[str, str, str]]:
    """(text, colour, weight) of a cell's caption lines."""
    given = shorten(names[int(table.label[i])])
    action = ACTION_NAMES[int(table.action[i])]
    margins = f"AUM {_num(table.model_margin[i], '+.2f')}"
    if np.isfinite(table.clip_margin[i]):
        margins += f" · CLIP {_num(table.clip_margin[i], '+.3f')}"
    if kind == "suspected":
        target, source = suggestion(table, i)
        to = f"→ {shorten(names[target])} ({source})" if target >= 0 else "→ ? (no other class preferred)"
        verb = {"relabel": "relabeled", "exclude": "excluded", "down-weight": "down-weighted"}.get(action, action)
        return [(f"given: {given}", "#8B0000", "bold"), (to, "#1B6E20", "normal"),
                (f"{verb} · belief {table.belief[i]:.2f}", COLORS.get(action, "#333333"), "bold"),
                (margins, "#333333", "normal")]
    pred = int(table.model_pred[i])
    said = "model agrees" if pred == int(table.label[i]) else (
        f"model says: {shorten(names[pred])}" if pred >= 0 else "model: not scored")
    return [(f"label: {given}", "#0B3C8C", "bold"), (said, "#1B6E20", "normal"),
            (f"kept · belief {table.belief[i]:.2f}", COLORS["kept"], "normal"), (margins, "#333333", "normal")]


def _num(x, fmt: str) -> str:
    return "?" if not np.isfinite(x) else format(float(x), fmt)


def _draw_image(ax, path: str) -> bool:
    """The image at ``path`` in ``ax`` (small images with visible pixels); a grey cell when it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.draft("RGB", (THUMBNAIL, THUMBNAIL))
            im = im.convert("RGB")
            im.thumbnail((THUMBNAIL, THUMBNAIL))
            pixels = np.asarray(im)
    except (OSError, ValueError, SyntaxError):
        ax.set_facecolor("#DDDDDD")
        ax.text(0.5, 0.5, "image not found", ha="center", va="center", fontsize=7.5, color="#555555",
                transform=ax.transAxes)
        return False
    small = max(pixels.shape[:2]) < 96
    ax.imshow(pixels, interpolation="nearest" if small else "antialiased")
    ax.set_anchor("S")  # a wide image sits on its caption
    return True
