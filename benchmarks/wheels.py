"""Install carried wheels (DALI, open_clip, Liger-Kernel, ...) on a machine without network access.

    python -m benchmarks.wheels DIR --target SITE

DIR holds ``*.whl`` files, or the parts ``wheels.tar.0``, ``wheels.tar.1``, ... of a tar of them split to fit a
size limit (``tar cf - *.whl | split -b 56m -d -a 1 - wheels.tar.``), or both, directly or in subfolders
(``part1/``, ``part2/``, ...).  They are installed with
``pip --no-index --no-deps`` into SITE, which then goes first on ``PYTHONPATH``: nothing is fetched, and the
machine's own torch and triton stay as they are.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def tar_parts(folder: Path) -> list[Path]:
    """The split tar's parts in order (``wheels.tar.0`` ... ``wheels.tar.10`` sort by their number); raises
    when one is missing, which would otherwise show as a corrupt tar."""
    parts = [p for p in folder.rglob("wheels.tar.*") if p.suffix[1:].isdigit()]
    numbers = [int(p.suffix[1:]) for p in parts]
    if sorted(numbers) != list(range(len(parts))):
        raise FileNotFoundError(f"{folder}: the split tar's parts are not 0 to {len(parts) - 1}: "
                                f"{', '.join(map(str, sorted(numbers)))}")
    return sorted(parts, key=lambda p: int(p.suffix[1:]))


def find_wheels(folder: Path) -> list[Path]:
    """What ``folder`` offers: its wheels, and the tar parts; raises if neither is there."""
    if not folder.is_dir():
        raise FileNotFoundError(f"wheel folder {folder} does not exist")
    found = sorted(folder.rglob("*.whl")) + tar_parts(folder)
    if not found:
        raise FileNotFoundError(f"{folder} holds no *.whl files and no wheels.tar.N parts")
    return found


def install(folder: Path, target: Path) -> list[str]:
    """Unpack the tar parts (if any) and pip-install every wheel into ``target``; the wheels' names."""
    found = find_wheels(folder)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = [p for p in found if p.suffix == ".whl"]
        parts = [p for p in found if p.suffix != ".whl"]
        if parts:
            joined = Path(tmp) / "wheels.tar"
            with joined.open("wb") as out:
                for part in parts:
                    with part.open("rb") as src:
                        shutil.copyfileobj(src, out)
            with tarfile.open(joined) as tar:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: refuse links and paths out of tmp
                    tar.extractall(tmp, filter="data")
                else:
                    tar.extractall(tmp)
            wheels += sorted(Path(tmp).glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
               "--disable-pip-version-check", "--target", str(target), *map(str, wheels)]
        subprocess.run(cmd, check=True)
    return [w.name for w in wheels]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="*.whl files and/or wheels.tar.N parts")
    ap.add_argument("--target", type=Path, required=True, help="install here (then put it on PYTHONPATH)")
    args = ap.parse_args(argv)
    names = install(args.folder, args.target)
    print(f"installed {len(names)} wheels into {args.target}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
