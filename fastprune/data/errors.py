"""Finding and naming the files a loader could not read or decode."""

from __future__ import annotations

import os


class SkippedFiles(list):
    """``(index, path, reason)`` of every file a loader left out in the current epoch."""


def check_file(path: str) -> str | None:
    """Why ``path`` cannot be used as an image (None when it decodes fully)."""
    from PIL import Image

    if not os.path.exists(path):
        return "file not found (deleted after the scan?)"
    try:
        if os.path.getsize(path) == 0:
            return "file is empty"
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated and corrupt data
    except OSError as e:
        return f"corrupt or truncated image ({e})"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        return f"corrupt image ({type(e).__name__}: {e})"
    return None


def find_bad_files(files: list[str], indices: list[int]) -> list[tuple[int, str, str]]:
    """``(index, path, reason)`` for each unusable file among ``indices``."""
    bad = []
    for i in indices:
        reason = check_file(files[i])
        if reason is not None:
            bad.append((i, files[i], reason))
    return bad


def raise_for_bad_file(bad: tuple[int, str, str], count: int, cause: Exception | None = None):
    """Raise the error that names the first bad file."""
    i, path, reason = bad
    more = f" (and {count - 1} more unusable files near it)" if count > 1 else ""
    msg = f"{path}: {reason} [sample {i}]{more}; pass on_error='skip' to leave such files out"
    if reason.startswith("file not found"):
        raise FileNotFoundError(msg) from cause
    raise ValueError(msg) from cause
