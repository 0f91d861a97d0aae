"""Machine description, tables, time budgets and the BENCHMARKS.md section writer shared by the benchmarks.

Imports no torch at module level: the GPU suite's driver process uses it without touching the device.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import sys
import time
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
LEFT_OUT = "Not measured within the time budget"  # how a benchmark names what --max-seconds left out


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    info = {
        "date": _dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return info


def results_file(out: Path, info: dict, smoke: bool = False) -> Path:
    """``out/<device>-<date>.json``: where ``python -m benchmarks`` keeps a device's records of one day."""
    device = re.sub(r"[^A-Za-z0-9._-]+", "-", info["device"]).strip("-")
    return Path(out) / f"{device}-{info['date']}{'-smoke' if smoke else ''}.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def describe(info: dict) -> str:
    parts = [f"{info['date']}", f"device: {info['device']}", f"CPU: {info['cpu']} ({info['cpu_cores']} cores)",
             f"torch {info['torch']}"]
    for k in ("triton", "dali"):
        if k in info:
            parts.append(f"{k} {info[k]}")
    return ", ".join(parts)


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section ``<!-- name -->`` ... ``<!-- /name -->`` of BENCHMARKS.md."""
    text = path.read_text() if path.exists() else "# fastprune benchmarks\n\nFigures are medians measured in one run with their baselines; the machine and date head each table.\n"
    block = f"<!-- {name} -->\n{body.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU even with a GPU")
    add_write_flags(ap)
    add_max_seconds(ap)
    return ap


def add_write_flags(ap: argparse.ArgumentParser) -> None:
    """``--write``: publishing a run's tables in BENCHMARKS.md is an explicit choice (never with --smoke)."""
    ap.add_argument("--write", action="store_true",
                    help="update this run's sections of BENCHMARKS.md (the published tables); off by default")
    ap.add_argument("--no-write", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old scripts


def publishing(args: argparse.Namespace) -> bool:
    """Whether to write BENCHMARKS.md; exits with a usage error for ``--write`` with ``--smoke``."""
    if args.write and getattr(args, "smoke", False):
        print("error: --write publishes tables in BENCHMARKS.md; smoke figures (--smoke) are never published",
              file=sys.stderr)
        raise SystemExit(2)
    return bool(args.write) and not args.no_write


def check_output_file(ap: argparse.ArgumentParser, path, flag: str, example: str = "records.json") -> None:
    """A benchmark's JSON output ``path`` is checked (not a folder, its folder made and writable) before the
    measurements, not when they are done; a bad one is a usage error naming ``flag``."""
    if path is None:
        return
    from fastprune.rundir import prepare_file  # imports torch: only the benchmarks that write files use it

    try:
        prepare_file(path, flag, example)
    except OSError as e:
        ap.error(str(e))


def write_json(path, obj) -> None:
    """``obj`` as indented JSON at ``path``, atomically (no partial file or temporary left on failure)."""
    import json

    from fastprune.rundir import atomic_write

    text = json.dumps(obj, indent=1, default=str)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def add_max_seconds(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="start no new configuration after this many seconds; the table names those left out")


class TimeBudget:
    """``--max-seconds``: a benchmark starts no new configuration once its budget is spent, and says which it
    left out (on stderr at once, and in its table), so a short run trims figures visibly, never silently.
    The first configuration always runs: every table gets a row."""

    def __init__(self, max_seconds: float | None):
        self.max_seconds = max_seconds
        self.start = time.monotonic()
        self.started = 0
        self.left_out: list[str] = []

    def allows(self, config: str) -> bool:
        """Whether to measure ``config`` (a short description of it); if not, it is recorded as left out."""
        if self.max_seconds is None or not self.started or time.monotonic() - self.start < self.max_seconds:
            self.started += 1
            return True
        self.left_out.append(config)
        print(f"{LEFT_OUT} (--max-seconds {self.max_seconds:g}): {config}", file=sys.stderr, flush=True)
        return False

    def note(self) -> str:
        """The sentence a table's intro carries when configurations were left out ('' when none were)."""
        if not self.left_out:
            return ""
        return f" {LEFT_OUT} (--max-seconds {self.max_seconds:g}): {'; '.join(self.left_out)}."


def cli_main(parse_args, produce, argv=None) -> int:
    """Parse, measure, print the table and, with ``--write``, update its BENCHMARKS.md section."""
    args = parse_args(argv)
    write = publishing(args)
    _records, text, section = produce(args, machine())
    print(text)
    if write:
        write_section(section, text)
    return 0


def device_us(rec: dict) -> float:
    """A record's device time: its CUDA-graph replay where measured (GPU runs), else its median."""
    return rec.get("graph_median_us", rec["median_us"])
