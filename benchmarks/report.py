"""Machine description, tables and the BENCHMARKS.md section writer shared by the benchmarks."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> dict:
    """What the figures were measured on."""
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
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    return ap


def cli_main(parse_args, produce, argv=None) -> int:
    """Parse, measure, print the table and update its BENCHMARKS.md section."""
    args = parse_args(argv)
    _records, text, section = produce(args, machine())
    print(text)
    if not args.no_write:
        write_section(section, text)
    return 0
