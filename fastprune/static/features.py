"""Penultimate features of a model over a dataset: what static pruning's linear head is fitted on.

    model, info = load_checkpoint_model("runs/r50/checkpoint.pt", num_classes=index.num_classes)
    feats = extract_features(index, model, image_size=info["image_size"])   # N x F float32, CPU

The features are the input of the model's final ``nn.Linear`` classifier (torchvision's ``fc`` /
``classifier[-1]`` / ``heads.head``, timm's ``head.fc`` / ``head``, fastprune's ``SmallCNN.head``), captured
with a forward pre-hook, so any architecture whose output is a linear layer's output works unchanged.
Images go through the deterministic evaluation transform (resize + centre crop, ImageNet mean/std) of
``fastprune.data.default_transform(train=False)``, in index order.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..devices import default_workers, resolve_device
from ..rundir import describe_load_error

_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers


def _strip(sd: Mapping) -> dict:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _checkpoint_path(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "checkpoint.pt").exists():
            raise FileNotFoundError(f"model run directory {str(p)!r} has no checkpoint.pt "
                                    "(expected a `fastprune train --out` directory or its checkpoint.pt)")
        return p / "checkpoint.pt"
    if not p.exists():
        raise FileNotFoundError(f"model checkpoint {str(p)!r} does not exist")
    return p


def read_checkpoint(path) -> tuple[dict, dict, Path]:
    """(state dict of the model, the run's config or {}, checkpoint file) of a ``fastprune train`` checkpoint.

    ``path`` is the run directory or its ``checkpoint.pt``; a bare ``state_dict`` file (name -> tensor)
    is accepted too (it records no architecture, so the caller must supply one).  A file that cannot be read
    (truncated, garbage) or holds something else is a one-line ``ValueError`` naming it.
    """
    path = _checkpoint_path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip, EOF and weights-only errors all mean: not ours
        if isinstance(e, OSError) and e.errno is not None:
            raise  # unreadable (permissions, ...): the error names the file
        raise ValueError(f"{str(path)!r} is not a fastprune checkpoint: {describe_load_error(path, e)}") from e
    if isinstance(ck, Mapping) and isinstance(ck.get("model"), Mapping):
        sd, cfg = ck["model"], ck.get("config") if isinstance(ck.get("config"), Mapping) else {}
    elif isinstance(ck, Mapping) and ck and all(isinstance(v, torch.Tensor) for v in ck.values()):
        sd, cfg = ck, {}
    else:
        what = f"a dict with keys {sorted(map(str, ck))[:6]}" if isinstance(ck, Mapping) else type(ck).__name__
        raise ValueError(f"{str(path)!r} is not a fastprune checkpoint (expected `fastprune train`'s checkpoint.pt "
                         f"with 'model' and 'config', or a state_dict; got {what})")
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{str(path)!r} is not a fastprune checkpoint: its 'model' entry is not a state_dict")
    return _strip(sd), dict(cfg), path


def find_classifier(model: torch.nn.Module, num_classes: int | None = None) -> tuple[str, torch.nn.Linear]:
    """(name, module) of the final linear classifier: the last ``nn.Linear`` (with ``num_classes`` outputs
    when given and one has them)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer, so its penultimate features (the input "
                         "of the final linear classifier) are not defined; pass layer= (the name of the module "
                         "whose input to take) or precomputed features")
    if num_classes is not None:
        fits = [(n, m) for n, m in linears if m.out_features == num_classes]
        if fits:
            return fits[-1]
    return linears[-1]


def load_checkpoint_model(checkpoint, num_classes: int | None = None, arch: str | None = None,
                          device="cpu") -> tuple[torch.nn.Module, dict]:
    """The model of a ``fastprune train`` checkpoint (run directory or ``checkpoint.pt``), in eval mode.

    ``arch`` is read from the checkpoint's config (``--arch`` of the run); pass it only for a bare
    state_dict, or to assert it.  With ``num_classes`` (the dataset's), a classifier of another size is
    an error.  Returns ``(model, info)``: info holds ``checkpoint``, ``arch``, ``num_classes``,
    ``image_size`` (the run's, or None) and ``classifier`` (the final layer's name).
    """
    from ..train import build_model

    device = resolve_device(device, "device")
    sd, cfg, path = read_checkpoint(checkpoint)
    recorded = cfg.get("arch")
    if arch is not None and recorded is not None and arch != recorded:
        raise ValueError(f"checkpoint {str(path)!r} is a {recorded!r} model, not {arch!r} (leave out --arch)")
    arch = arch or recorded
    if not arch:
        raise ValueError(f"checkpoint {str(path)!r} records no architecture: pass --arch (arch=)")
    # the classifier's size comes from the weights: build once with any size to learn the layer's name
    probe = build_model(arch, num_classes or 1)
    name, _ = find_classifier(probe, num_classes or 1)
    w = sd.get(f"{name}.weight")
    if w is None or w.dim() != 2:
        raise ValueError(f"checkpoint {str(path)!r} does not hold a {arch!r} model (no classifier weight "
                         f"{name + '.weight'!r}; was it trained with another --arch?)")
    trained = int(w.shape[0])
    if num_classes is not None and trained != num_classes:
        raise ValueError(f"checkpoint {str(path)!r} was trained on {trained} classes but the dataset has "
                         f"{num_classes}: it belongs to another dataset")
    model = probe if trained == (num_classes or 1) else build_model(arch, trained)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(path)!r} does not fit a {arch!r} model: "
                         f"{' '.join(str(e).split())[:400]}") from e
    model.to(device).eval()
    image_size = cfg.get("image_size")
    info = {"checkpoint": str(path), "arch": arch, "num_classes": trained, "classifier": name,
            "image_size": int(image_size) if image_size else None}
    return model, info


def _resolve_layer(model, layer, num_classes):
    if layer is None:
        name, mod = find_classifier(model, num_classes)
        return name, mod, True
    if isinstance(layer, torch.nn.Module):
        names = {id(m): n for n, m in model.named_modules()}
        if id(layer) not in names:
            raise ValueError("layer is not a module of model")
        return names[id(layer)], layer, False
    mods = dict(model.named_modules())
    if layer not in mods:
        close = [n for n in mods if n and (layer in n or n in layer)][:5]
        raise ValueError(f"model has no module {layer!r}" + (f"; close: {', '.join(close)}" if close else ""))
    return layer, mods[layer], False


def extract_features(index, model: torch.nn.Module, batch_size: int = 256, device=None,
                     num_workers: int | None = None, image_size: int = 224, layer=None, progress: bool = True,
                     channels_last: bool | None = None, bf16: bool | None = None) -> torch.Tensor:
    """Penultimate features of every sample of ``index``, in index order: an N x F float32 CPU tensor.

    ``layer`` (a module name or module of ``model``) picks whose input is taken; by default the final
    ``nn.Linear`` classifier, checked on the first batch to produce the model's output.  ``model`` is moved
    to ``device`` (default: CUDA when available, else CPU) and run in eval mode under
    ``torch.inference_mode``, under bf16 autocast on CUDA as in training (``bf16=False``: fp32; the features
    are returned in fp32 either way); its train/eval mode is restored afterwards.  Images are decoded by
    ``num_workers`` processes (default: up to 8) with the evaluation transform at ``image_size``.
    """
    from ..data import ImageFolderIndex, TorchLoader

    if not isinstance(index, ImageFolderIndex):
        raise ValueError(f"index must be a fastprune.data.ImageFolderIndex, got {type(index).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 0):
        raise ValueError(f"num_workers must be an integer >= 0 (or None), got {num_workers!r}")
    device = resolve_device(device, "device")
    if num_workers is None:
        num_workers = default_workers()
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    bf16 = device.type == "cuda" if bf16 is None else bool(bf16)
    name, module, check = _resolve_layer(model, layer, index.num_classes)

    captured: list[torch.Tensor] = []

    def hook(_mod, inputs):
        captured.append(inputs[0])

    was_training = model.training
    model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # every sample once, in index order (no pruner, no sharding); a bad file is a one-line error naming it
    loader = TorchLoader(index, None, batch_size=batch_size, train=False, device=device, num_workers=num_workers,
                         image_size=image_size, channels_last=channels_last)
    loader._hint = "every image needs its features: replace the file or take it out of the dataset"
    n = len(index)
    out: torch.Tensor | None = None
    handle = module.register_forward_pre_hook(hook)
    bar = tqdm(total=n, unit="img", desc=f"features {index.source.name}", disable=not progress, leave=False)
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            start = 0
            for images, _, _ in loader:
                captured.clear()
                logits = model(images)
                if len(captured) != 1:
                    raise ValueError(f"layer {name!r} ran {len(captured)} times in one forward pass (expected once); "
                                     "pass layer= to choose the classifier")
                feats = captured[0]
                if out is None:  # first batch: is this really the classifier, and what is F?
                    if check and not _same_output(logits, module(feats)):
                        raise ValueError(f"the last nn.Linear of {type(model).__name__} ({name!r}) is not its final "
                                         "layer (the model's output is not that layer's output); pass layer= (the "
                                         "name of the classifier module whose input to take)")
                    if feats.dim() != 2:
                        raise ValueError(f"the input of {name!r} has shape {tuple(feats.shape)}, not batch x F")
                    out = torch.empty(n, feats.shape[1], dtype=torch.float32)
                out[start:start + feats.shape[0]] = feats.float().cpu()
                start += feats.shape[0]
                bar.update(feats.shape[0])
    finally:
        handle.remove()
        bar.close()
        model.train(was_training)
    assert out is not None and start == n  # an ImageFolderIndex is never empty
    if not torch.isfinite(out).all():
        bad = int(torch.nonzero(~torch.isfinite(out).all(dim=1))[0, 0])
        raise ValueError(f"the model's features of sample {bad} ({index.files[bad]}) are NaN or Inf")
    return out


def _same_output(logits, recomputed: torch.Tensor) -> bool:
    """Is the model's output the classifier's output (up to bf16 rounding, where autocast is on)?"""
    if not isinstance(logits, torch.Tensor) or logits.shape != recomputed.shape:
        return False
    if logits.dtype == torch.float32 and recomputed.dtype == torch.float32:
        return torch.equal(logits, recomputed)
    return torch.allclose(logits.float(), recomputed.float(), rtol=2e-2, atol=2e-2)


def save_features(path, features: torch.Tensor) -> Path:
    """Write N x F features as ``.npy`` (or ``.pt``), readable by ``prune-static --features``."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt":
        torch.save(features.contiguous(), path)
    elif path.suffix == ".npy":
        np.save(path, features.numpy())
    else:
        raise ValueError(f"--save-features must end in .npy or .pt, got {str(path)!r}")
    return path

