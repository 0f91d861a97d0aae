"""ImageFolderIndex: a dataset's file list and labels, scanned once and cached."""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

EXTENSIONS = (".jpg", ".jpeg", ".png")
_CACHE_VERSION = 1
FINGERPRINT_VERSION = 2  # 1: names and labels; 2: also file sizes (and file times recorded apart)


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
            if _is_image(path.name):
                raise ValueError(f"dataset {str(source)!r} is an image file; give a folder root/<class>/<image> "
                                 "or a path,label CSV list")
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
        self._progress = progress
        self._fingerprint: str | None = None
        self._stat_cache: tuple[np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ scan

    def _scan_cached(self, cache_dir, progress):
        if cache_dir is False:
            classes, rel, labels, _, skips = _scan(self.root, progress)
            _warn_skips(self.root, skips)
            return classes, rel, labels
        cache_dir = Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()
        key = hashlib.sha256(str(self.root).encode()).hexdigest()[:24]
        cache = cache_dir / f"{key}.json.gz"
        cached = _load_cache(cache, self.root)
        if cached is not None:
            self.from_cache = True
            _warn_skips(self.root, cached[3])
            return cached[:3]
        classes, rel, labels, dirs, skips = _scan(self.root, progress)
        _save_cache(cache, {"version": _CACHE_VERSION, "root": str(self.root), "dirs": dirs, "classes": classes,
                            "files": rel, "labels": labels, "skips": skips})
        _warn_skips(self.root, skips)
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
        """Hash of the class names, relative file names, labels and file sizes (not of the location).

        It identifies the content as far as one ``stat`` per file can: a replaced, re-encoded or
        truncated image changes its size.  Modification times are kept apart (``file_times``): copying
        a dataset changes them, and a copy should still match what was computed on the original.
        """
        if self._fingerprint is None:
            sizes, _ = self._stats()
            h = self._names_hash()
            h.update(b"sizes\0" + sizes.tobytes())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    @property
    def names_fingerprint(self) -> str:
        """The older fingerprint (class names, file names and labels only) that earlier versions recorded."""
        return self._names_hash().hexdigest()[:32]

    @property
    def file_times(self) -> str:
        """Hash of every file's modification time: a file overwritten in place with the same size changes it."""
        _, mtimes = self._stats()
        return hashlib.sha256(mtimes.tobytes()).hexdigest()[:32]

    def identity(self) -> dict:
        """What a file computed from this data records about it, for ``compare`` later."""
        return {"fingerprint": self.fingerprint, "fingerprint_version": FINGERPRINT_VERSION,
                "file_times": self.file_times}

    def compare(self, recorded: dict) -> tuple[str | None, str | None]:
        """(why ``recorded``, an ``identity()`` or an older record, is of other data, or None; a caution, or None).

        A record without a fingerprint matches anything; one of the older kind (names only) matches on the
        names and says that the contents were not compared.
        """
        fp = recorded.get("fingerprint")
        if fp is None or fp == self.fingerprint:
            times = recorded.get("file_times")
            if fp is not None and times is not None and times != self.file_times:
                return None, ("some files have other modification times than when it was computed (expected "
                              "after copying the data; if images were overwritten in place, compute it again)")
            return None, None
        if fp == self.names_fingerprint:
            return None, ("it was recorded by an older fastprune, which compared file names and labels only, "
                          "not file sizes")
        return "the file names, classes, labels or file sizes differ", None

    def check_record(self, record: dict, count, subject: str, made: str) -> None:
        """Refuse what ``record`` (with ``count`` samples) was computed from when it is other data than this
        (``ValueError``: "{subject} {made} for another dataset than ..."); warn when ``compare`` has a caution."""
        why, caution = self.compare(record)
        if why is None and count != len(self):
            why = f"{count} samples there, {len(self)} here"
        if why is not None:
            raise ValueError(f"{subject} {made} for another dataset than {self}: {why}")
        if caution is not None:
            warnings.warn(f"{subject}: {caution}", RuntimeWarning, stacklevel=3)

    def _names_hash(self):
        h = hashlib.sha256()
        h.update(json.dumps(self.classes).encode())
        for rel, label in zip(self._rel, self._labels.tolist(), strict=True):
            h.update(f"{rel}\0{label}\n".encode())
        return h

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Size and modification time (ns) of every file; -1 for a file that is gone (the loaders name it)."""
        if self._stat_cache is None:
            files = self.files
            sizes = np.full(len(files), -1, dtype=np.int64)
            mtimes = np.full(len(files), -1, dtype=np.int64)
            chunk = 4096
            # Network file systems answer stat() with a round trip each: overlap them in threads.
            with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool, \
                    tqdm(total=len(files), desc=f"checking {self.source.name}", unit="file", leave=False,
                         delay=2.0, disable=not self._progress) as bar:
                for lo, part in zip(range(0, len(files), chunk),
                                    pool.map(_stat_many, (files[i:i + chunk] for i in range(0, len(files), chunk))),
                                    strict=True):
                    sizes[lo:lo + len(part)] = [s for s, _ in part]
                    mtimes[lo:lo + len(part)] = [t for _, t in part]
                    bar.update(len(part))
            self._stat_cache = sizes, mtimes
        return self._stat_cache

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


def _stat_many(paths: list[str]) -> list[tuple[int, int]]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((-1, -1))
    return out


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def _scan(root: Path, progress: bool):
    """Walk ``root`` the way torchvision's ImageFolder does; returns classes, files, labels, dir mtimes, skips.

    Linked folders are followed, but each real folder is scanned once: a link back to a folder already
    scanned (a loop, or a second link to one folder) would repeat its images, under another label, without
    end.  Such links are left out and listed (``skips``) for a warning.
    """
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"dataset root {str(root)!r} has no class folders (expected root/<class>/<image>)")
    rel, labels, skips = [], [], []
    dirs = {".": os.stat(root).st_mtime_ns}
    seen = {os.path.realpath(root), *(os.path.realpath(root / c) for c in classes)}
    for label, cls in enumerate(tqdm(classes, desc=f"scanning {root.name}", unit="class", disable=not progress,
                                     leave=False, delay=2.0)):
        before = len(rel)
        walked = []
        for dirpath, dirnames, fnames in os.walk(root / cls, followlinks=True):
            walked.append((dirpath, fnames))
            for d in list(dirnames):
                real = os.path.realpath(os.path.join(dirpath, d))
                if real in seen:
                    dirnames.remove(d)
                    skips.append((os.path.relpath(os.path.join(dirpath, d), root), real))
                else:
                    seen.add(real)
        for dirpath, fnames in sorted(walked):
            dirs[os.path.relpath(dirpath, root)] = os.stat(dirpath).st_mtime_ns
            rdir = os.path.relpath(dirpath, root)
            for fname in sorted(fnames):
                if _is_image(fname):
                    rel.append(os.path.join(rdir, fname))
                    labels.append(label)
        if len(rel) == before:
            raise FileNotFoundError(f"class folder {str(root / cls)!r} has no JPEG or PNG images")
    return classes, rel, labels, dirs, skips


def _warn_skips(root: Path, skips) -> None:
    if skips:
        link, real = skips[0]
        warnings.warn(f"{str(root)!r}: left out {len(skips)} linked folder{'s' if len(skips) > 1 else ''} that lead "
                      f"back to a folder already scanned (a link loop, or a second link to one folder), e.g. "
                      f"{link} -> {real}", RuntimeWarning, stacklevel=4)


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
    return data["classes"], data["files"], data["labels"], data.get("skips", [])


def _save_cache(cache: Path, data: dict):
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
    except OSError:  # a read-only cache location only costs a rescan next time
        return
    try:
        with os.fdopen(fd, "wb") as raw, gzip.open(raw, "wt") as f:
            json.dump(data, f)
        os.replace(tmp, cache)
    except OSError:  # a full disk, too: no half-written file stays behind
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _read_list(path: Path):
    """Read a ``path,label`` CSV list file."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != 2:
                    raise ValueError(f"{path}:{lineno}: expected 'path,label', got {','.join(row)!r}"[:300])
                rows.append((lineno, row[0].strip(), row[1].strip()))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path} is not a path,label CSV list (a text file) nor a folder: {e}") from None
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
    empty = sorted(set(range(len(classes))) - set(labels))
    if empty:  # integer labels name class indices: a gap is a class without samples
        shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        warnings.warn(f"{path}: the labels run to {len(classes) - 1}, but {len(empty)} of those classes have no "
                      f"rows ({shown}); they stay empty classes of the model", RuntimeWarning, stacklevel=3)
    return classes, files, labels
