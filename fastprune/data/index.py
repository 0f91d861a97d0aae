"""ImageFolderIndex: a dataset's file list and labels, scanned once and cached."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

EXTENSIONS = (".jpg", ".jpeg", ".png")
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastprune" / "index"


class ImageFolderIndex:
    """Files and labels of an image dataset, shared by every loader and by the embedding code.

    ``source`` is either an ImageNet-style folder ``root/<class>/<file>`` (JPEG and PNG, extensions
    in any case; classes sorted by name and files in the order of torchvision's ``ImageFolder``, so
    labels and sample indices match it) or a CSV list file with ``path,label`` rows (paths relative
    to the file's folder or absolute; labels integers or class names; an optional header row).

    Scanning a large folder is slow, so the scan is cached (``cache_dir``; ``False`` disables it)
    and reused while the modification times of the root and of every scanned folder are unchanged:
    adding, removing or renaming a file or class rescans.
    """

    def __init__(self, source: str | os.PathLike, cache_dir: str | os.PathLike | bool | None = None,
                 progress: bool = True):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset root {str(source)!r} does not exist")
        self.source = path.resolve()
        self.from_cache = False
        if path.is_file():
            self.root = self.source.parent
            classes, rel, labels = _read_list(self.source)
        else:
            self.root = self.source
            classes, rel, labels = self._scan_cached(cache_dir, progress)
        if not rel:
            raise ValueError(f"dataset {str(self.source)!r} has no JPEG or PNG images")
        self.classes: list[str] = classes
        self._rel: list[str] = rel
        self._labels = np.asarray(labels, dtype=np.int64)
        self._files: list[str] | None = None

    # ------------------------------------------------------------------ scan

    def _scan_cached(self, cache_dir, progress):
        if cache_dir is False:
            return _scan(self.root, progress)[:3]
        cache_dir = Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()
        key = hashlib.sha256(str(self.root).encode()).hexdigest()[:24]
        cache = cache_dir / f"{key}.json.gz"
        cached = _load_cache(cache, self.root)
        if cached is not None:
            self.from_cache = True
            return cached
        classes, rel, labels, dirs = _scan(self.root, progress)
        _save_cache(cache, {"version": _CACHE_VERSION, "root": str(self.root), "dirs": dirs, "classes": classes,
                            "files": rel, "labels": labels})
        return classes, rel, labels

    # --------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._rel)

    @property
    def files(self) -> list[str]:
        """Absolute paths, in sample-index order."""
        if self._files is None:
            root = str(self.root)
            self._files = [p if os.path.isabs(p) else os.path.join(root, p) for p in self._rel]
        return self._files

    @property
    def relative_files(self) -> list[str]:
        return list(self._rel)

    @property
    def labels(self) -> torch.Tensor:
        """Class index of every sample (int64)."""
        return torch.from_numpy(self._labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        """Stable hash of the class names, relative file names and labels (not of the location)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.classes).encode())
        for rel, label in zip(self._rel, self._labels.tolist(), strict=True):
            h.update(f"{rel}\0{label}\n".encode())
        return h.hexdigest()[:32]

    def __repr__(self) -> str:
        return f"ImageFolderIndex({str(self.source)!r}, samples={len(self)}, classes={self.num_classes})"


def as_index(index, what: str = "index") -> ImageFolderIndex:
    """``index`` itself, or the index of the dataset at that path (str or os.PathLike); else a ValueError."""
    if isinstance(index, ImageFolderIndex):
        return index
    if isinstance(index, (str, os.PathLike)):
        return ImageFolderIndex(index)
    raise ValueError(f"{what} must be a fastprune.data.ImageFolderIndex or a dataset path (folder or CSV list), "
                     f"got {type(index).__name__}")


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def _scan(root: Path, progress: bool):
    """Walk ``root`` the way torchvision's ImageFolder does; returns classes, files, labels, dir mtimes."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"dataset root {str(root)!r} has no class folders (expected root/<class>/<image>)")
    rel, labels = [], []
    dirs = {".": os.stat(root).st_mtime_ns}
    for label, cls in enumerate(tqdm(classes, desc=f"scanning {root.name}", unit="class", disable=not progress,
                                     leave=False, delay=2.0)):
        before = len(rel)
        for dirpath, _, fnames in sorted(os.walk(root / cls, followlinks=True)):
            dirs[os.path.relpath(dirpath, root)] = os.stat(dirpath).st_mtime_ns
            rdir = os.path.relpath(dirpath, root)
            for fname in sorted(fnames):
                if _is_image(fname):
                    rel.append(os.path.join(rdir, fname))
                    labels.append(label)
        if len(rel) == before:
            raise FileNotFoundError(f"class folder {str(root / cls)!r} has no JPEG or PNG images")
    return classes, rel, labels, dirs


def _load_cache(cache: Path, root: Path):
    try:
        with gzip.open(cache, "rt") as f:
            data = json.load(f)
    except (OSError, ValueError, EOFError):
        return None
    if data.get("version") != _CACHE_VERSION or data.get("root") != str(root):
        return None
    try:
        for rel, mtime in data["dirs"].items():
            if os.stat(root / rel).st_mtime_ns != mtime:
                return None
    except OSError:
        return None
    return data["classes"], data["files"], data["labels"]


def _save_cache(cache: Path, data: dict):
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as raw, gzip.open(raw, "wt") as f:
            json.dump(data, f)
        os.replace(tmp, cache)
    except OSError:  # a read-only cache location only costs a rescan next time
        pass


def _read_list(path: Path):
    """Read a ``path,label`` CSV list file."""
    rows = []
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'path,label', got {','.join(row)!r}")
            rows.append((lineno, row[0].strip(), row[1].strip()))
    if rows and rows[0][1].lower() == "path":  # header
        rows = rows[1:]
    if not rows:
        raise ValueError(f"list file {str(path)!r} has no rows")
    names = [r[2] for r in rows]
    if all(n.lstrip("-").isdigit() for n in names):
        ints = [int(n) for n in names]
        bad = next(((ln, v) for (ln, _, _), v in zip(rows, ints, strict=True) if v < 0), None)
        if bad:
            raise ValueError(f"{path}:{bad[0]}: label {bad[1]} is negative")
        classes = [str(i) for i in range(max(ints) + 1)]
        labels = ints
    else:
        classes = sorted(set(names))
        lookup = {c: i for i, c in enumerate(classes)}
        labels = [lookup[n] for n in names]
    files = []
    for lineno, p, _ in rows:
        if not _is_image(p):
            raise ValueError(f"{path}:{lineno}: {p!r} is not a JPEG or PNG file")
        files.append(p)
    return classes, files, labels
