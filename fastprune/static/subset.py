"""Subset files: the output of static pruning, consumed by ``fastprune train --subset`` and
``DynamicPruner(initial_subset=...)``."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import torch

from .. import __version__
from ..rundir import atomic_write, prepare_file


def save_subset(path: str | os.PathLike, keep: torch.Tensor, num_samples: int, method: str,
                params: dict | None = None, fingerprint: str | None = None) -> Path:
    """Write the kept indices with how they were chosen and the dataset they belong to (JSON, atomic: a failed
    write leaves neither a partial file nor a temporary)."""
    keep = torch.as_tensor(keep).to(torch.int64)
    if keep.dim() != 1 or (keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= num_samples)):
        raise ValueError(f"keep must be a 1-D tensor of indices in [0, {num_samples})")
    path = prepare_file(path, "subset file", "subset.json")  # not a folder; its folder made and writable
    data = {"method": method, "params": params or {}, "num_samples": int(num_samples), "kept": keep.numel(),
            "fingerprint": fingerprint, "fastprune_version": __version__,
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "indices": keep.tolist()}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))
    return path


def load_subset(path: str | os.PathLike, index=None) -> tuple[torch.Tensor, dict]:
    """(kept indices, metadata); with ``index``, check that the subset was made for that dataset."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"subset file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
        keep = torch.tensor(data["indices"], dtype=torch.int64)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r} is not a fastprune subset file ({e})") from e
    if index is not None:
        index.check_record(data, data.get("num_samples"), f"subset {str(path)!r}", "was made")
    meta = {k: v for k, v in data.items() if k != "indices"}
    return keep, meta
