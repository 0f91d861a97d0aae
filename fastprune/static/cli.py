"""``fastprune prune-static``: a subset file for a dataset, from features and its labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .baselines import el2n_scores, forgetting_scores, random_subset
from .influence import influence_prune
from .subset import save_subset


def load_features(source, index) -> torch.Tensor:
    """N x F features: a ``fastprune embed`` directory (image table, checked against the index) or a file."""
    path = Path(source)
    if path.is_dir():
        from ..embeddings import Embeddings

        return Embeddings.load(path, index=index).image.float()
    if not path.exists():
        raise FileNotFoundError(f"features {str(path)!r} do not exist")
    feats = torch.from_numpy(np.load(path)) if path.suffix == ".npy" else torch.load(path, weights_only=True)
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != len(index):
        raise ValueError(f"features in {str(path)!r} must be an N x F array with N={len(index)} rows")
    return feats.float()


def prune_static(index, method: str = "influence", prune_ratio: float | None = None, epsilon: float | None = None,
                 features=None, l2: float = 1e-3, seed: int = 0, out=None):
    """Choose the kept indices with ``method``; write a subset file to ``out`` when given."""
    n = len(index)
    labels = index.labels
    if method == "random":
        if prune_ratio is None:
            raise ValueError("--method random needs --prune-ratio")
        keep = random_subset(n, 1.0 - prune_ratio, seed)
    else:
        if features is None:
            raise ValueError(f"--method {method} needs --features (a `fastprune embed` directory or an N x F file)")
        x = load_features(features, index)
        if method == "influence":
            keep = influence_prune(x, labels, prune_ratio=prune_ratio, epsilon=epsilon, l2=l2)
        else:
            if prune_ratio is None:
                raise ValueError(f"--method {method} needs --prune-ratio")
            scores = el2n_scores(x, labels) if method == "el2n" else forgetting_scores(x, labels, seed=seed)
            k = round((1.0 - prune_ratio) * n)
            keep = torch.sort(torch.topk(scores, k).indices).values  # keep the hardest: highest scores
    params = {"prune_ratio": prune_ratio, "epsilon": epsilon, "l2": l2, "seed": seed,
              "features": None if features is None else str(features)}
    meta = {"method": method, "params": params}
    if out is not None:
        save_subset(out, keep, n, method, params, index.fingerprint)
    return keep, meta
