"""A run directory's safety: one run at a time, atomic writes, no temporaries left, outputs kept out of the data.

A run writes its files with ``atomic_write`` (a temporary, then a rename), holds ``RunLock`` while it trains,
and refuses an output folder inside its own data folders (its plots would become training images).  Commands
check where their outputs go (``prepare_dir``, ``prepare_file``) before the work, so that a folder that cannot
be written fails at once, naming the argument.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import tempfile
from pathlib import Path

import torch

TMP_PREFIX = ".fastprune-"  # temporaries of atomic writes: ".fastprune-XXXXXXXX.tmp"
LOCK_NAME = ".fastprune.lock"


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once, at import: setting it is process-wide
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the new one, never a part.  A
    failed write leaves no temporary behind; a full disk says so."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # a plain file's permissions, not mkstemp's private 0600
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        no_space = isinstance(e, OSError) and e.errno == errno.ENOSPC
        if no_space or (isinstance(e, RuntimeError) and "unexpected pos" in str(e)):  # torch.save's disk-full
            raise OSError(errno.ENOSPC, f"no space left on the device writing {path}") from e
        raise


def prepare_dir(folder, what: str = "--out") -> Path:
    """Create ``folder`` (with its parents) and check that files can be written in it, so that an output
    location that cannot be used fails at once, naming ``what``, not after a long computation."""
    folder = Path(folder)
    _make_writable(folder, f"{what} {str(folder)!r} is a file, not a folder",
                   f"{what} {str(folder)!r}: cannot create the folder",
                   f"{what} {str(folder)!r}: cannot write in the folder")
    return folder


def _make_writable(folder: Path, is_a_file: str, cannot_create: str, cannot_write: str) -> None:
    """Create ``folder`` with its parents and check that a file can be written in it; each failure is one of
    the messages given."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FileExistsError(is_a_file) from None
    except OSError as e:
        raise _unusable(e, cannot_create) from e
    _probe(folder, cannot_write)


def prepare_file(path, what: str = "--out", example: str = "out.json") -> Path:
    """Check that ``path`` can be written as a file before a long computation: it is not a folder (``example``
    names a file to suggest in it), its folder exists or is created and is writable, and its name fits."""
    path = Path(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder; give the path of the file to write, "
                                f"e.g. {str(path / example)!r}")
    folder = path.parent
    _make_writable(folder, f"{what} {str(path)!r}: its folder {str(folder)!r} is a file",
                   f"{what} {str(path)!r}: cannot create its folder {str(folder)!r}",
                   f"{what} {str(path)!r}: cannot write in its folder {str(folder)!r}")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(path.name)) > name_max:
        err = OSError(f"{what} {str(path)!r}: the file name is longer than this file system allows "
                      f"({len(os.fsencode(path.name))} > {name_max} bytes)")
        err.errno = errno.ENAMETOOLONG
        raise err
    return path


def _probe(folder: Path, message: str) -> None:
    """Write (and drop) a nameless temporary in ``folder``: the one sure test that writing there works."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=TMP_PREFIX):
            pass
    except OSError as e:
        raise _unusable(e, message) from e


def _unusable(e: OSError, message: str) -> OSError:
    """``e`` (same type, so callers can still tell a permission error) with a message naming the argument."""
    err = type(e)(f"{message}: {e.strerror or e}")
    err.errno = e.errno
    return err


def describe_load_error(path, e: BaseException) -> str:
    """Why ``torch.load`` or ``np.load`` could not read ``path``, in a few words on one line."""
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    text = " ".join(str(e).split())
    if empty:
        return "the file is empty"
    if isinstance(e, EOFError):
        return "the file ends too early (truncated?)"
    if "zip archive" in text or "central directory" in text:
        return "the file is truncated or corrupt: its zip archive cannot be read"
    first = text.split(". ")[0][:120]
    return f"the file is corrupt or of another kind ({type(e).__name__}{': ' + first if first else ''})"


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through ``atomic_write``."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_log(path: Path, history: list[dict]) -> None:
    """``log.jsonl`` as a checkpoint's history says: one line per finished epoch."""
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(h) + "\n" for h in history)))


def remove_stale_temporaries(out: Path, older: bool = False) -> None:
    """Temporaries a killed run left in its directory: this version's ``.fastprune-*.tmp``, and with ``older``
    (a run directory, e.g. when resuming) the ``tmpXXXXXXXX.tmp`` of older versions, a name a user's own file
    could have; other files stay."""
    for f in out.iterdir():
        if f.is_file() and f.suffix == ".tmp" and (f.name.startswith(TMP_PREFIX)
                                                   or (older and re.fullmatch(r"tmp[a-z0-9_]{8}\.tmp", f.name))):
            f.unlink(missing_ok=True)


def check_outside(out: Path, **folders) -> None:
    """Refuse an output folder inside (or equal to) one of the run's data folders (``name=path``)."""
    o = Path(out).resolve()
    for name, folder in folders.items():
        if folder is None:
            continue
        d = Path(folder).resolve()
        if o == d or d in o.parents:
            raise ValueError(f"--out {str(out)!r} is inside the {name} folder {str(folder)!r}: the run's images "
                             "(plots) would become training data next time; choose a folder outside it")


class RunLocked(FileExistsError):
    """Another live run holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory for one run: a lock file naming the holder's pid and host.

    A lock left by a process of this host that no longer runs is stale: it is replaced and ``stale`` says by
    whom.  A live holder, or one on another host (which cannot be checked from here), is an error that names
    it and says how to proceed."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.stale: dict | None = None

    def __enter__(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                        and not _alive(holder["pid"]):
                    self.stale = holder
                    self.path.unlink(missing_ok=True)
                    continue
                where = (f"process {holder.get('pid')} on {holder.get('host')}" if holder
                         else "a process whose lock file cannot be read")
                raise RunLocked(f"{str(self.path.parent)!r} is in use by {where}; wait for that run to finish, "
                                f"choose another --out, or, if that run is dead, delete {str(self.path)!r}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise RunLocked(f"could not take the lock {str(self.path)!r}")

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
