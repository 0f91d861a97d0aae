"""Run every benchmark: ``python -m benchmarks [--smoke] [--out DIR] [--write]`` (or ``fastprune bench``).

Writes ``DIR/<device>-<date>.json`` (one record per configuration and method: bench, device, versions, dtype,
sizes, median and IQR in microseconds, and each benchmark's own figures) after every benchmark, and
regenerates the tables in BENCHMARKS.md.  Runs with ``--only`` on the same device and day add up in one file:
a benchmark's new records replace its old ones.  ``--max-seconds S`` lets each benchmark start configurations
for S seconds only; its table names the ones left out (``python -m benchmarks.gpu_suite`` uses it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from fastprune.rundir import atomic_write, prepare_dir

from . import bench_distributed, bench_epoch, bench_loader, bench_noise, bench_select, bench_step
from .report import add_max_seconds, add_write_flags, machine, publishing, results_file, write_section

BENCHES = {"step": bench_step, "select": bench_select, "loader": bench_loader, "epoch": bench_epoch,
           "distributed": bench_distributed, "noise": bench_noise}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fastprune bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU machines, CI): checks that all run")
    ap.add_argument("--out", default="results",
                    help="folder for the JSON results, made if missing (default results/)")
    add_write_flags(ap)
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these")
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU even with a GPU")
    add_max_seconds(ap)  # per benchmark
    return ap.parse_args(argv)


def bench_flags(args: argparse.Namespace) -> list[str]:
    """The flags every benchmark's own parser gets from this command."""
    flags = (["--smoke"] if args.smoke else []) + (["--cpu"] if args.cpu else [])
    if args.max_seconds is not None:
        flags += ["--max-seconds", f"{args.max_seconds:g}"]
    return flags  # this command writes the sections itself (with --write)


def main(argv=None) -> int:
    args = parse_args(argv)
    write = publishing(args)
    info = machine()
    try:  # before the first measurement: a results folder that cannot be used fails now, not after an hour
        out = prepare_dir(args.out, "--out")
        path = results_file(out, info, args.smoke)
        if path.is_dir():
            raise IsADirectoryError(f"--out {str(out)!r}: the results file {str(path)!r} is a folder; move it away "
                                    "or choose another --out")
    except OSError as e:
        print(f"fastprune bench: error: {e}", file=sys.stderr)
        return 2
    names = args.only or list(BENCHES)
    records = _kept_records(path, names)
    for name in names:
        module = BENCHES[name]
        print(f"== {name}", flush=True)
        recs, text, section = module.produce(module.parse_args(bench_flags(args)), info)
        print(text, flush=True)
        measured_at = _dt.datetime.now().isoformat(timespec="seconds")
        for r in recs:
            r.setdefault("device", info["device"])
            r["versions"] = {k: info[k] for k in ("torch", "triton", "dali", "python") if k in info}
            r["smoke"] = args.smoke
            r["measured_at"] = measured_at  # tells this run's records from older ones in the same file
        records += recs
        if write:
            write_section(section, text)
        _write_json(path, info, records)  # after every benchmark: an interrupted run keeps what it measured
    print(f"wrote {path} ({len(records)} records)")
    return 0


def _kept_records(path: Path, names: list[str]) -> list[dict]:
    """Records of the other benchmarks already in today's file (``--only`` runs add up to one file)."""
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())["records"]
    except (ValueError, KeyError, TypeError):
        print(f"{path} is not a results file; overwriting it")
        return []
    return [r for r in old if r.get("bench") not in names]


def _write_json(path: Path, info: dict, records: list[dict]) -> None:
    """The results file, replaced atomically (a failed write leaves the old file and no temporary)."""
    text = json.dumps({"machine": info, "records": records}, indent=1, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    raise SystemExit(main())
