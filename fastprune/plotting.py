"""What every figure of a run's report shares: matplotlib without a display, atomic PNG writes, readable class
names, and one colour per thing that can happen to a sample."""

from __future__ import annotations

import re
from pathlib import Path

from .rundir import atomic_write

DPI = 110

# One colour per fate, in every figure: the policy's (kept, pruned) and the noise decisions' (flags).
COLORS = {"kept": "#4C72B0", "pruned": "#B8B8B8", "down-weight": "#F0A030", "exclude": "#D62728",
          "relabel": "#9467BD", "keep": "#4C72B0", "not scored yet": "#E0E0E0"}


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed, safe in any process)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG atomically (a reader never sees half a file) and close it."""
    plt = pyplot()
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
    return path


def display_names(classes: list[str]) -> list[str]:
    """Readable class names: ImageNet's for WordNet-id folders (n01440764 -> tench), else the folder names
    with ``_``/``-`` as spaces."""
    from .embeddings import class_prompts_names

    return class_prompts_names(list(classes))


def shorten(name: str, width: int = 24) -> str:
    """A class name that fits a gallery cell: its first comma-separated part without a parenthesised aside
    ("military hat (bearskin or shako)" -> "military hat"), cut with an ellipsis beyond ``width``."""
    short = re.sub(r"\s*\([^)]*\)", "", name.split(",")[0]).strip() or name
    return short if len(short) <= width else short[:width - 1].rstrip() + "…"
