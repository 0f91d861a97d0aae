"""Run every benchmark: ``python -m benchmarks [--smoke] [--out DIR] [--no-write]`` (or ``fastprune bench``).

Writes ``DIR/<device>-<date>.json`` (one record per configuration and method: bench, device, versions, dtype,
sizes, median and IQR in microseconds, and each benchmark's own figures) after every benchmark, and
regenerates the tables in BENCHMARKS.md.  Runs with ``--only`` on the same device and day add up in one file:
a benchmark's new records replace its old ones.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from . import bench_distributed, bench_epoch, bench_loader, bench_select, bench_step
from .report import machine, write_section

BENCHES = {"step": bench_step, "select": bench_select, "loader": bench_loader, "epoch": bench_epoch,
           "distributed": bench_distributed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastprune bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU machines, CI): checks that all run")
    ap.add_argument("--out", default="results", help="directory for the JSON results (default results/)")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these")
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU even with a GPU")
    args = ap.parse_args(argv)
    info = machine()
    flags = (["--smoke"] if args.smoke else []) + (["--cpu"] if args.cpu else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9._-]+", "-", info["device"]).strip("-")
    path = out / f"{device}-{info['date']}{'-smoke' if args.smoke else ''}.json"
    names = args.only or list(BENCHES)
    records = _kept_records(path, names)
    for name in names:
        module = BENCHES[name]
        print(f"== {name}", flush=True)
        recs, text, section = module.produce(module.parse_args(flags + ["--no-write"]), info)
        print(text, flush=True)
        for r in recs:
            r.setdefault("device", info["device"])
            r["versions"] = {k: info[k] for k in ("torch", "triton", "dali", "python") if k in info}
            r["smoke"] = args.smoke
        records += recs
        if not args.no_write:
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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": info, "records": records}, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
