"""``fastprune prune-static``: a subset file for a dataset, from features (given, or extracted with a trained
model) and its labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..devices import resolve_device
from ..rundir import describe_load_error, prepare_file
from .baselines import el2n_scores, forgetting_scores, random_subset
from .influence import influence_prune
from .subset import save_subset

METHODS = ("influence", "el2n", "forgetting", "random")


def load_features(source, index) -> torch.Tensor:
    """N x F features: a ``fastprune embed`` directory (image table, checked against the index) or a file
    (``.npy``, else ``torch.save``'s format).  A file that cannot be read, or holds anything but an N x F array
    of numbers, is a one-line error naming it."""
    path = Path(source)
    if path.is_dir():
        from ..embeddings import Embeddings

        return Embeddings.load(path, index=index).image.float()
    if not path.exists():
        raise FileNotFoundError(f"features {str(path)!r} do not exist")
    try:
        if path.suffix == ".npy":
            feats = np.load(path, allow_pickle=False)
        else:
            feats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - numpy, pickle, zip and EOF errors all mean: not a features file
        if isinstance(e, OSError) and e.errno is not None:
            raise  # unreadable (permissions, ...): the error names the file
        raise ValueError(f"features {str(path)!r} cannot be read: {describe_load_error(path, e)}") from e
    if isinstance(feats, np.ndarray):
        if feats.dtype.kind not in "fiu":
            raise ValueError(f"features in {str(path)!r} must be numbers, got an array of {feats.dtype}")
        feats = torch.from_numpy(feats)
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != len(index):
        raise ValueError(f"features in {str(path)!r} must be an N x F array with N={len(index)} rows")
    if feats.dtype == torch.bool or feats.is_complex():
        raise ValueError(f"features in {str(path)!r} must be real numbers, got {feats.dtype}")
    return feats.float()


def model_features(index, model, arch=None, device=None, batch_size: int = 256, num_workers=None,
                   image_size=None, layer=None, progress: bool = True, bf16: bool | None = None
                   ) -> tuple[torch.Tensor, dict]:
    """Penultimate features over ``index`` of a ``fastprune train`` checkpoint (run directory or file)."""
    from .features import extract_features, load_checkpoint_model

    device = resolve_device(device, "device")
    net, info = load_checkpoint_model(model, num_classes=index.num_classes, arch=arch)
    size = image_size if image_size is not None else (info["image_size"] or 224)
    bf16 = device.type == "cuda" if bf16 is None else bool(bf16)
    feats = extract_features(index, net, batch_size=batch_size, device=device, num_workers=num_workers,
                             image_size=size, layer=layer, progress=progress, bf16=bf16)
    info = {**info, "image_size": size, "layer": layer or info["classifier"], "bf16": bf16}
    return feats, info


def _integer(name: str, value, lo: int) -> None:
    """``value`` is None (the default) or an integer >= ``lo``, else a ``ValueError`` naming the argument."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lo):
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def prune_static(index, method: str = "influence", prune_ratio: float | None = None, epsilon: float | None = None,
                 features=None, l2: float = 1e-3, seed: int = 0, out=None, model=None, arch=None, device=None,
                 batch_size: int = 256, num_workers=None, image_size=None, layer=None, save_features=None,
                 progress: bool = True, bf16: bool | None = None):
    """Choose the kept indices with ``method``; write a subset file to ``out`` when given.

    Features come from ``features`` (a ``fastprune embed`` directory or an N x F file) or are extracted
    with ``model`` (a ``fastprune train`` checkpoint: its penultimate features; see ``features.py``).
    """
    n = len(index)
    labels = index.labels
    if features is not None and model is not None:
        raise ValueError("give either --features or --model, not both")
    if method not in METHODS:
        raise ValueError(f"method must be influence, el2n, forgetting or random, got {method!r}")
    if method in ("random", "el2n", "forgetting") and prune_ratio is None:
        raise ValueError(f"--method {method} needs --prune-ratio")
    if method == "influence" and (prune_ratio is None) == (epsilon is None):
        raise ValueError("--method influence needs exactly one of --prune-ratio and --epsilon")
    if prune_ratio is not None and not (isinstance(prune_ratio, (int, float)) and 0.0 <= prune_ratio <= 1.0):
        raise ValueError(f"--prune-ratio must be in [0, 1], got {prune_ratio!r}")
    if save_features is not None and Path(save_features).suffix not in (".npy", ".pt"):
        raise ValueError(f"--save-features must end in .npy or .pt, got {str(save_features)!r}")
    _integer("--batch-size", batch_size, 1)
    _integer("--workers", num_workers, 0)
    _integer("--image-size", image_size, 1)
    device = resolve_device(device, "--device")
    # where the results go: checked (and their folders made) before the features are read or extracted
    if out is not None:
        prepare_file(out, "--out", "subset.json")
    if save_features is not None and model is not None and method != "random":
        prepare_file(save_features, "--save-features", "features.npy")
    model_info = None
    if method == "random":
        keep = random_subset(n, 1.0 - prune_ratio, seed)
    else:
        if features is None and model is None:
            raise ValueError(f"--method {method} needs --features (a `fastprune embed` directory or an N x F file) "
                             "or --model (a `fastprune train` checkpoint to extract penultimate features with)")
        if model is not None:
            x, model_info = model_features(index, model, arch=arch, device=device, batch_size=batch_size,
                                           num_workers=num_workers, image_size=image_size, layer=layer,
                                           progress=progress, bf16=bf16)
            if save_features is not None:
                from .features import save_features as _save

                _save(save_features, x)
        else:
            x = load_features(features, index)
        if method == "influence":
            keep = influence_prune(x, labels, prune_ratio=prune_ratio, epsilon=epsilon, l2=l2)
        else:
            scores = el2n_scores(x, labels) if method == "el2n" else forgetting_scores(x, labels, seed=seed)
            k = round((1.0 - prune_ratio) * n)
            keep = torch.sort(torch.topk(scores, k).indices).values  # keep the hardest: highest scores
    params = {"prune_ratio": prune_ratio, "epsilon": epsilon, "l2": l2, "seed": seed,
              "features": None if features is None else str(features)}
    if model_info is not None:
        params.update(model=model_info["checkpoint"], arch=model_info["arch"], layer=model_info["layer"],
                      image_size=model_info["image_size"], bf16=model_info["bf16"],
                      saved_features=None if save_features is None else str(save_features))
    meta = {"method": method, "params": params}
    if out is not None:
        save_subset(out, keep, n, method, params, index.fingerprint)
    return keep, meta
