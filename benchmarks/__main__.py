"""Run every benchmark: ``python -m benchmarks [--smoke] [--out DIR] [--no-write]`` (or ``fastprune bench``).

Writes ``DIR/<device>-<date>.json`` (one record per configuration and method: bench, device, versions, dtype,
sizes, median and IQR in microseconds, and each benchmark's own figures) and regenerates the tables in
BENCHMARKS.md.
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
    records = []
    for name in args.only or BENCHES:
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9._-]+", "-", info["device"]).strip("-")
    path = out / f"{device}-{info['date']}{'-smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps({"machine": info, "records": records}, indent=1, default=str))
    print(f"wrote {path} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
