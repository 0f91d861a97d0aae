"""CLIP embedding tables: one image embedding per sample, one text embedding per class.

``Embeddings.compute`` runs an open_clip model over an ``ImageFolderIndex`` (decoding
through the project's data path, preprocessing with the model's own resize, crop and
mean/std) and over a prompt ensemble of the class names; ``save``/``load`` keep them in a
directory (``image.npy`` N x D fp16, memory-mappable and written in chunks; ``text.npy``;
``meta.json``).  The pruner takes them as ``DynamicPruner(image_emb=emb.image, text_emb=emb.text)``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .data.index import ImageFolderIndex
from .data.loader import LOADERS
from .devices import default_workers

_ASSETS = Path(__file__).resolve().parent / "assets"
IMAGE_FILE, TEXT_FILE, META_FILE, PROGRESS_FILE = "image.npy", "text.npy", "meta.json", "progress.json"


def nonfinite_rows(table: torch.Tensor, chunk: int = 1 << 16) -> tuple[int, int | None]:
    """(how many rows of ``table`` hold a NaN or inf, the first such row or None), in bounded memory."""
    count, first = 0, None
    for lo in range(0, table.shape[0], chunk):
        bad = ~torch.isfinite(table[lo:lo + chunk]).all(dim=1)
        n = int(bad.sum())
        if n and first is None:
            first = lo + int(bad.nonzero()[0])
        count += n
    return count, first


def imagenet_class_names() -> dict[str, str]:
    """WordNet id -> readable name for the 1,000 ImageNet-1k classes (shipped with fastprune)."""
    names = {}
    with open(_ASSETS / "imagenet_classes.tsv") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            wnid, name = line.rstrip("\n").split("\t")
            names[wnid] = name
    return names


def class_prompts_names(classes: list[str], mapping: str | os.PathLike | dict | None = None) -> list[str]:
    """Readable names for prompts: a user mapping, else ImageNet names for WordNet ids, else folder names."""
    if mapping is not None:
        if not isinstance(mapping, dict):
            mapping = _read_mapping(Path(mapping))
        missing = [c for c in classes if c not in mapping]
        if missing:
            raise ValueError(f"class-name mapping has no entry for {len(missing)} classes, e.g. {missing[:3]}")
        return [mapping[c] for c in classes]
    imagenet = imagenet_class_names()
    if all(c in imagenet for c in classes):
        return [imagenet[c] for c in classes]
    return [re.sub(r"[_\-]+", " ", c).strip() for c in classes]


def _read_mapping(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"class-name mapping file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    out = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = re.split(r"\t|,", line, maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'folder<TAB or comma>name', got {line!r}")
        out[parts[0].strip()] = parts[1].strip()
    return out


def prompt_templates(templates: str | list[str] | None) -> list[str]:
    """``"openai"`` (the 80 prompts published with CLIP), ``"simple"`` (7), a list, or a file, one per line."""
    from open_clip import zero_shot_metadata as z

    if templates is None or templates == "openai":
        return [t("{}") if callable(t) else t for t in z.OPENAI_IMAGENET_TEMPLATES]
    if templates == "simple":
        return [t("{}") if callable(t) else t for t in z.SIMPLE_IMAGENET_TEMPLATES]
    if isinstance(templates, (str, os.PathLike)):
        path = Path(templates)
        if not path.exists():
            raise FileNotFoundError(f"templates must be 'openai', 'simple', a list or a file; {str(path)!r} "
                                    "does not exist")
        templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    templates = list(templates)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"each template needs a '{{}}' for the class name; got {bad[:3] or 'none'}")
    return templates


# --------------------------------------------------------------------------- weights


def _reachable(host: str, port: int = 443, timeout: float = 4.0) -> bool:
    """Whether an HTTPS server answers at ``host`` within ``timeout`` seconds (any HTTP status counts).

    A bare TCP connect is not enough: proxies and firewalls may accept connections they never serve.
    """
    import urllib.error
    import urllib.request

    try:
        req = urllib.request.Request(f"https://{host}:{port}/", method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError, socket.timeout):
        return False


def resolve_pretrained(model: str, pretrained: str | os.PathLike | None, cache_dir: str | None = None):
    """What to hand open_clip for ``pretrained``, and a description for the metadata.

    A local file is used as it is.  A tag must be in open_clip's list for the model; if its weights
    are not cached and their host cannot be reached within seconds, this fails with a message that
    says how to pass a local checkpoint instead (it never waits on a network that is not there).
    """
    import open_clip

    if pretrained is None:
        return None, {"pretrained": None, "note": "random initialisation (no weights)"}
    path = Path(str(pretrained)).expanduser()
    if path.is_file():
        return str(path), {"pretrained": str(path.resolve()), "checkpoint_sha256": _sha256(path)}
    if os.sep in str(pretrained) or str(pretrained).endswith((".bin", ".pt", ".pth", ".safetensors")):
        raise FileNotFoundError(f"pretrained checkpoint {str(pretrained)!r} does not exist")
    cfg = open_clip.get_pretrained_cfg(model, str(pretrained))
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"pretrained={str(pretrained)!r} is not an open_clip tag for model {model!r} "
                         f"(known: {', '.join(tags) or 'none'}) nor an existing file")
    if not _cached(cfg, cache_dir):
        host = "huggingface.co" if cfg.get("hf_hub") else urlparse(cfg.get("url", "")).hostname or "huggingface.co"
        if not _reachable(host):
            raise ConnectionError(
                f"the weights for {model} pretrained={pretrained!r} are not in the local cache and {host} cannot "
                f"be reached. On a machine with network run: python -c \"import open_clip; "
                f"open_clip.create_model_and_transforms('{model}', pretrained='{pretrained}')\" and copy the "
                f"downloaded checkpoint file here (see the README, 'CLIP weights offline'); then pass "
                f"pretrained=/path/to/that/file")
    return str(pretrained), {"pretrained": str(pretrained), "hf_hub": cfg.get("hf_hub"), "url": cfg.get("url")}


def _cached(cfg: dict, cache_dir: str | None) -> bool:
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        model_id, filename = os.path.split(cfg["hf_hub"])
        for name in ([filename] if filename else ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"]):
            hit = try_to_load_from_cache(model_id, name, cache_dir=cache_dir)
            if isinstance(hit, str):
                return True
        return False
    url = cfg.get("url", "")
    root = cache_dir or os.path.expanduser("~/.cache/clip")
    return bool(url) and os.path.isfile(os.path.join(root, os.path.basename(url)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_clip(model: str, pretrained=None, device="cpu", cache_dir: str | None = None):
    """(model in eval mode, its validation preprocessing, metadata about the weights)."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("computing CLIP embeddings needs open_clip: pip install 'fastprune[clip]'") from e
    if model not in open_clip.list_models():
        raise ValueError(f"model {model!r} is not an open_clip model (see open_clip.list_models())")
    weights, info = resolve_pretrained(model, pretrained, cache_dir)
    with torch.random.fork_rng(devices=[]):  # random weights (pretrained=None) are reproducible
        torch.manual_seed(0)
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights, device=device,
                                                                   cache_dir=cache_dir)
    net.eval()
    return net, preprocess, info


def preprocess_cfg(net) -> dict:
    """The model's own preprocessing: size, mean/std, interpolation, resize mode."""
    from open_clip.transform import PreprocessCfg

    cfg = dict(getattr(net.visual, "preprocess_cfg", {}) or {})
    base = PreprocessCfg()
    size = cfg.get("size", getattr(net.visual, "image_size", base.size))
    size = size[0] if isinstance(size, (tuple, list)) else size
    return {"size": int(size), "mean": tuple(cfg.get("mean", base.mean)), "std": tuple(cfg.get("std", base.std)),
            "interpolation": cfg.get("interpolation", base.interpolation),
            "resize_mode": cfg.get("resize_mode", base.resize_mode)}


# ------------------------------------------------------------------------ the tables


class Embeddings:
    """CLIP image (N x D) and class-text (C x D) embedding tables, L2-normalised, fp16."""

    def __init__(self, image: torch.Tensor, text: torch.Tensor, meta: dict | None = None):
        if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
            raise ValueError(f"image and text tables must be N x D and C x D with the same D; got "
                             f"{tuple(image.shape)} and {tuple(text.shape)}")
        self.image, self.text = image, text
        self.meta = dict(meta or {})

    @classmethod
    def from_arrays(cls, image, text, meta: dict | None = None, device="cpu") -> Embeddings:
        """Tables made elsewhere (arrays or tensors); rows are normalised and stored as fp16."""
        image = F.normalize(torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image).float(),
                            dim=1)
        text = F.normalize(torch.as_tensor(np.asarray(text) if not torch.is_tensor(text) else text).float(), dim=1)
        meta = {"N": image.shape[0], "C": text.shape[0], "D": image.shape[1], **(meta or {})}
        return cls(image.half().to(device), text.half().to(device), meta)

    def __repr__(self) -> str:
        return (f"Embeddings(N={self.image.shape[0]}, C={self.text.shape[0]}, D={self.image.shape[1]}, "
                f"model={self.meta.get('model')!r}, device={self.image.device})")

    # ------------------------------------------------------------------ storage

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``image.npy``, ``text.npy`` and ``meta.json`` into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _atomic_npy(path / IMAGE_FILE, self.image.detach().to("cpu", torch.float16).numpy())
        _atomic_npy(path / TEXT_FILE, self.text.detach().to("cpu", torch.float16).numpy())
        meta = {**self.meta, "N": self.image.shape[0], "C": self.text.shape[0], "D": self.image.shape[1],
                "dtype": "float16", "complete": True}
        meta.setdefault("fastprune_version", __version__)
        meta.setdefault("date", _dt.datetime.now().isoformat(timespec="seconds"))
        _atomic_json(path / META_FILE, meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, index: ImageFolderIndex | None = None, device="cpu") -> Embeddings:
        """Load a saved directory; with ``index``, check that the tables belong to that dataset.

        Every file is checked as it is read (shapes, dtype, finite values): a damaged or foreign file is an
        error that names it, never a silent wrong table.
        """
        path = Path(path)
        if path.is_file():
            raise ValueError(f"embeddings are a directory written by `fastprune embed`; {str(path)!r} is a file")
        meta_path = path / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{str(path)!r} holds no embeddings ({META_FILE} is missing)")
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path}: not readable JSON ({e}); compute the embeddings again") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: not the metadata of fastprune embeddings (a JSON object)")
        if not meta.get("complete"):
            raise ValueError(f"embeddings in {str(path)!r} are incomplete; finish them with "
                             "`fastprune embed ... --resume`")
        if index is not None:
            index.check_record(meta, meta.get("N"), f"embeddings in {str(path)!r}", "were computed")
        # Memory-mapped: copied once, straight from the page cache to the device.
        image = _read_table(path / IMAGE_FILE, meta, rows=meta.get("N"), mmap=True)
        text = _read_table(path / TEXT_FILE, meta, rows=meta.get("C"))
        if image.shape[1] != text.shape[1]:
            raise ValueError(f"{path / IMAGE_FILE} has width {image.shape[1]} but {path / TEXT_FILE} has "
                             f"{text.shape[1]}; compute the embeddings again")
        image, text = torch.from_numpy(image), torch.from_numpy(text)
        for name, table in ((IMAGE_FILE, image), (TEXT_FILE, text)):
            count, first = nonfinite_rows(table)
            if count:
                raise ValueError(f"{path / name}: {count} of {table.shape[0]} rows hold NaN or inf (first: row "
                                 f"{first}); compute the embeddings again")
        device = torch.device(device)
        if device.type != "cpu":
            image, text = image.to(device), text.to(device)
        return cls(image, text, meta)

    # ------------------------------------------------------------------ compute

    @classmethod
    def compute(cls, index: ImageFolderIndex, model: str = "ViT-B-32", pretrained="openai", device=None,
                batch_size: int = 256, templates="openai", classnames=None, out: str | os.PathLike | None = None,
                resume: bool = False, loader: str = "auto", num_workers: int | None = None,
                cache_dir: str | None = None, progress: bool = True,
                on_chunk: Callable[[int], None] | None = None, chunk_rows: int | None = None) -> Embeddings:
        """Embed every image of ``index`` and every class name with an open_clip model.

        ``out`` writes the tables as they are computed (in chunks of ``chunk_rows`` rows, a
        multiple of ``batch_size``); ``resume=True`` continues an interrupted run in ``out``
        and gives the same file as an uninterrupted one.  ``loader``: ``"dali"``, ``"torch"``
        (PIL and open_clip's own transform) or ``"auto"`` (DALI when installed).
        """
        if not isinstance(index, ImageFolderIndex):
            raise ValueError(f"index must be a fastprune.data.ImageFolderIndex, got {type(index).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if loader not in LOADERS:
            raise ValueError(f"loader must be 'auto', 'dali' or 'torch', got {loader!r}")
        if resume and out is None:
            raise ValueError("resume=True needs out= (the directory of the interrupted run)")
        from .devices import resolve_device

        device = resolve_device(device, "device")
        chunk_rows = chunk_rows or batch_size * max(1, 8192 // batch_size)
        if chunk_rows % batch_size:
            raise ValueError(f"chunk_rows={chunk_rows} must be a multiple of batch_size={batch_size}")
        temps = prompt_templates(templates)
        names = class_prompts_names(index.classes, classnames)
        net, preprocess, weights = load_clip(model, pretrained, device, cache_dir)
        pcfg = preprocess_cfg(net)
        if loader == "auto":
            loader = "dali" if _has_dali() else "torch"
        meta = {"model": model, **weights, **index.identity(), "classes": index.classes,
                "class_names": names, "templates": temps, "preprocess": pcfg, "loader": loader,
                "batch_size": batch_size, "fastprune_version": __version__}

        text = _text_table(net, model, names, temps, device)
        n, d = len(index), int(text.shape[1])
        store = _ImageStore(out, n, d, meta, resume) if out is not None else None
        image = store.array if store is not None else np.zeros((n, d), dtype=np.float16)
        start = store.rows_done if store is not None else 0
        bar = tqdm(total=n, initial=start, unit="img", desc=f"embedding {index.source.name}", disable=not progress,
                   smoothing=0.1)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else _null()
        with torch.no_grad(), autocast:
            for images, idx in _batches(index, loader, preprocess, pcfg, batch_size, start, device, num_workers):
                feats = F.normalize(net.encode_image(images.to(device, non_blocking=True)).float(), dim=-1)
                lo = int(idx[0])
                if int(idx[-1]) != lo + idx.numel() - 1:
                    raise RuntimeError("internal error: the loader did not return samples in order")
                image[lo:lo + idx.numel()] = feats.to("cpu", torch.float16).numpy()
                bar.update(idx.numel())
                done = lo + idx.numel()
                if store is not None and (done % chunk_rows == 0 or done == n):
                    store.commit(done)
                    if on_chunk is not None:
                        on_chunk(done)
        bar.close()
        meta["date"] = _dt.datetime.now().isoformat(timespec="seconds")
        emb = cls(torch.from_numpy(np.asarray(image)), torch.from_numpy(text.cpu().numpy()), meta)
        if store is not None:
            store.finish(text.cpu().numpy(), emb.meta)
            emb = cls.load(out, device=device)
        elif device.type != "cpu":
            emb = cls(emb.image.to(device), emb.text.to(device), meta)
        return emb


def _null():
    import contextlib

    return contextlib.nullcontext()


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _text_table(net, model: str, names: list[str], templates: list[str], device) -> torch.Tensor:
    """Normalised mean over the prompt ensemble of the normalised text embeddings, per class (fp16)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(model)
    rows = []
    with torch.no_grad():
        for name in names:
            tokens = tokenizer([t.format(name) for t in templates]).to(device)
            feats = F.normalize(net.encode_text(tokens).float(), dim=-1)
            rows.append(F.normalize(feats.mean(dim=0), dim=0))
    return torch.stack(rows).half()


_NO_SKIP = "every image needs an embedding: replace the file or take it out of the dataset"  # the error's hint


def _batches(index, loader, preprocess, pcfg, batch_size, start, device, num_workers):
    """(images, idx) in index order from sample ``start`` on; an unusable image is a one-line error naming it."""
    if start >= len(index):
        return
    if loader == "dali":
        from .data import DaliLoader

        dl = DaliLoader(index, None, batch_size=batch_size, train=False, device=device,
                        num_threads=num_workers, image_size=pcfg["size"], mean=pcfg["mean"], std=pcfg["std"],
                        resize_size=pcfg["size"], interpolation="cubic" if pcfg["interpolation"] == "bicubic"
                        else "linear", resize_mode="squash" if pcfg["resize_mode"] == "squash" else "shorter")
    else:
        from .data import TorchLoader

        workers = default_workers() if num_workers is None else num_workers
        dl = TorchLoader(index, None, batch_size=batch_size, train=False, device=device, num_workers=workers,
                         transform=preprocess)
    dl._hint = _NO_SKIP
    dl.load_state_dict({"epoch": 0, "position": start, "passes": 0, "bad": {}})
    for images, _, idx in dl:
        yield images, idx


class _ImageStore:
    """``image.npy`` written in place as chunks complete; ``progress.json`` says how far it got."""

    def __init__(self, out, n: int, d: int, meta: dict, resume: bool):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        key = {k: meta[k] for k in ("model", "pretrained", "fingerprint", "batch_size", "loader")}
        key.update({"N": n, "D": d, "checkpoint_sha256": meta.get("checkpoint_sha256")})
        self.key = key
        prog_path = self.dir / PROGRESS_FILE
        if resume:
            if not prog_path.exists():
                if (self.dir / META_FILE).exists():
                    raise ValueError(f"{str(self.dir)!r} already holds finished embeddings; nothing to resume")
                raise FileNotFoundError(f"nothing to resume in {str(self.dir)!r} ({PROGRESS_FILE} is missing)")
            prog = json.loads(prog_path.read_text())
            if prog["key"] != key:
                diff = {k: (prog["key"].get(k), v) for k, v in key.items() if prog["key"].get(k) != v}
                raise ValueError(f"cannot resume {str(self.dir)!r}: the run differs in {diff} (saved, now)")
            self.rows_done = int(prog["rows_done"])
            self.array = np.load(self.dir / IMAGE_FILE, mmap_mode="r+")
        else:
            if (self.dir / META_FILE).exists() or prog_path.exists():
                raise FileExistsError(f"{str(self.dir)!r} already holds embeddings; use another directory, "
                                      "delete it, or pass resume=True to continue an interrupted run")
            self.rows_done = 0
            self.array = np.lib.format.open_memmap(self.dir / IMAGE_FILE, mode="w+", dtype=np.float16, shape=(n, d))
            self.commit(0)

    def commit(self, rows_done: int):
        self.array.flush()
        self.rows_done = rows_done
        _atomic_json(self.dir / PROGRESS_FILE, {"key": self.key, "rows_done": rows_done})

    def finish(self, text: np.ndarray, meta: dict):
        self.array.flush()
        _atomic_npy(self.dir / TEXT_FILE, text)
        n, d = self.array.shape
        _atomic_json(self.dir / META_FILE, {**meta, "N": n, "C": text.shape[0], "D": d, "dtype": "float16",
                                            "complete": True})
        (self.dir / PROGRESS_FILE).unlink(missing_ok=True)
        del self.array


def _read_table(path: Path, meta: dict, rows: int | None, mmap: bool = False) -> np.ndarray:
    """A saved 2-D float table, or an error naming the file and what is wrong with it."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; compute the embeddings again")
    try:
        table = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy table ({e}); compute the embeddings again") from None
    if table.ndim != 2 or table.dtype not in (np.float16, np.float32):
        raise ValueError(f"{path}: expected a 2-D float16 or float32 table, found {table.ndim}-D {table.dtype}")
    if rows is not None and table.shape[0] != rows:
        raise ValueError(f"{path} has {table.shape[0]} rows but its {META_FILE} says {rows}; it is damaged or "
                         "from another run; compute the embeddings again")
    return table


def _atomic_json(path: Path, data: dict):
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _atomic_npy(path: Path, array: np.ndarray):
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
