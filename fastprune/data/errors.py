"""Finding and naming the files a loader could not read or decode, and what the loaders do about them."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import NamedTuple

import numpy as np

log = logging.getLogger("fastprune.data")

# One wording for both kinds of user: the Python API's argument and the CLI's flag.
SKIP_HINT = "pass on_error='skip' (fastprune train: --skip-bad-files) to leave such files out"


class BadFile(NamedTuple):
    """An unusable sample: its index, its file and why (what a dataset hands on instead of an image)."""

    index: int
    path: str
    reason: str


class SkippedFiles(list):
    """``(index, path, reason)`` of every file a loader left out in the current epoch."""


def check_file(path: str, decode: bool = True) -> str | None:
    """Why ``path`` cannot be used as an image (None when it can).  ``decode``: a full decode, which also
    catches truncated data; otherwise only what is cheap to learn (it exists, is not empty, PIL recognises
    its format; for PNG the chunks' checksums too)."""
    from PIL import Image

    if not os.path.exists(path):
        return "file not found (deleted after the scan?)"
    try:
        if os.path.getsize(path) == 0:
            return "file is empty"
        with Image.open(path) as im:
            im.load() if decode else im.verify()
    except OSError as e:
        return f"corrupt or truncated image ({_one_line(e, path)})"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        return f"corrupt image ({type(e).__name__}: {_one_line(e, path)})"
    return None


def why_unusable(path: str, error: Exception) -> str:
    """The reason to report for ``path`` after decoding it raised ``error``."""
    return check_file(path) or f"unreadable image ({type(error).__name__}: {_one_line(error, path)})"


def _one_line(error: Exception, path: str) -> str:
    """The error's text on one line, without the path (the message names it first)."""
    return " ".join(str(error).replace(f" {path!r}", "").replace(f" {path}", "").split())


def find_bad_files(files: list[str], indices: list[int]) -> list[tuple[int, str, str]]:
    """``(index, path, reason)`` for each unusable file among ``indices``."""
    bad = []
    for i in indices:
        reason = check_file(files[i])
        if reason is not None:
            bad.append(BadFile(i, files[i], reason))
    return bad


def scan_headers(files: list[str], progress: bool = True, desc: str = "checking images") -> list[BadFile]:
    """``check_file`` without decoding, for every file, in threads (file systems answer in parallel); the
    unusable ones."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        reasons = list(tqdm(pool.map(functools.partial(check_file, decode=False), files, chunksize=64), total=len(files), desc=desc, unit="file",
                            leave=False, delay=2.0, disable=not progress))
    return [BadFile(i, files[i], r) for i, r in enumerate(reasons) if r is not None]


def raise_for_bad_file(bad: tuple[int, str, str], count: int, cause: Exception | None = None,
                       hint: str | None = SKIP_HINT):
    """Raise the one-line error that names the first bad file (FileNotFoundError when it is missing)."""
    i, path, reason = bad
    more = f" (and {count - 1} more unusable files near it)" if count > 1 else ""
    msg = f"{path}: {reason} [sample {i}]{more}" + (f"; {hint}" if hint else "")
    if reason.startswith("file not found"):
        raise FileNotFoundError(msg) from cause
    raise ValueError(msg) from cause


class SkipsBadFiles:
    """What DaliLoader and TorchLoader share about unusable files.

    ``on_error="raise"`` turns the first one into an error naming it; ``"skip"`` logs each, leaves it
    out and warns at the end of the epoch (``skipped``: this epoch's).  Every file found is kept
    (``state_dict()["bad"]``), so later epochs, and a resumed run, leave it out from the start.  With a
    pruner on several ranks a left-out file's place goes to another sample of the rank's shard, so every
    rank runs the same number of steps (DDP needs it) and the ranks' positions stay aligned.
    """

    pruner = None
    _hint = SKIP_HINT  # what the error suggests; callers that cannot skip (every sample needed) replace it

    def _init_bad_files(self, on_error: str) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self._bad: dict[int, tuple[str, str]] = {}  # unusable files found so far: index -> (path, reason)
        self.skipped = SkippedFiles()

    def _order(self, order: np.ndarray) -> np.ndarray:
        """The order without the files known to be unusable (on several ranks: with substitutes)."""
        if not self._bad:
            return order
        bad = np.isin(order, np.fromiter(self._bad, dtype=np.int64))
        if not bad.any():
            return order
        usable = order[~bad]
        if self.pruner is None or self.pruner.world_size == 1:
            return usable
        if usable.size == 0:
            first = self._bad[int(order[0])]
            raise RuntimeError(f"every file of rank {self.pruner.rank}'s shard ({order.size} samples) is unreadable; "
                               f"first: {first[0]}: {first[1]}")
        out = order.copy()
        out[bad] = usable[np.arange(int(bad.sum())) % usable.size]
        return out

    def _epoch_starts(self, order: np.ndarray) -> None:
        """A new epoch: the known unusable files in it are left out again (and reported again)."""
        in_order = set(order.tolist()) & set(self._bad) if self._bad else ()
        self.skipped = SkippedFiles((i, *self._bad[i]) for i in sorted(in_order))

    def _found(self, bad: list[tuple[int, str, str]], cause: Exception | None = None) -> None:
        """Unusable files met while loading: raise naming the first, or (skip) log and remember them."""
        if self.on_error == "raise":
            raise_for_bad_file(bad[0], len(bad), cause, self._hint)
        for i, path, reason in bad:
            if i in self._bad:
                continue  # met again as another's substitute before this epoch's order was rebuilt
            log.warning("skipping %s: %s", path, reason)
            self._bad[i] = (path, reason)
            self.skipped.append((i, path, reason))

    def _warn_skipped(self) -> None:
        if self.skipped:
            first = self.skipped[0]
            warnings.warn(f"{type(self).__name__} skipped {len(self.skipped)} unreadable files this epoch "
                          f"(first: {first[1]}: {first[2]}); see loader.skipped", RuntimeWarning, stacklevel=3)

    def _bad_state(self) -> dict:
        return {"bad": {i: list(v) for i, v in self._bad.items()}}

    def _load_bad_state(self, sd: dict) -> None:
        self._bad = {int(k): tuple(v) for k, v in sd.get("bad", {}).items()}
