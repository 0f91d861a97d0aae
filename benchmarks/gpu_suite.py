"""Everything a GPU machine should measure, in one command of at most 8 minutes, from the repository root:

    PYTHONPATH=. python3 -m benchmarks.gpu_suite [--wheels DIR] [--only PART ...] [--no-write]
    PYTHONPATH=. python3 -m benchmarks.gpu_suite --dry-run          # the CPU-side check (CI)

Parts, each a subprocess with a time limit, so that a CUDA fault or a hang in one cannot stop the others:
carried wheels (``--wheels``), the preflight (device, versions, optional packages), ``tests/cuda`` with
compiled kernels, then every benchmark at its GPU sizes through ``python -m benchmarks --only NAME
--max-seconds S`` (records in ``results/<device>-<date>.json``, tables in BENCHMARKS.md).  A benchmark
starts no new configuration after S seconds and its table names what it left out; the step benchmark, last,
gets whatever time the others left.  At the end: the parts table (ok / failed / timed out / skipped, seconds)
and the goal table (every goal of ``benchmarks/goals.py``: measured value, met / not met / not measured),
printed, written to BENCHMARKS.md's ``suite-<device>`` section and to ``results/suite-<date>-<time>/`` with
every part's full log.  Exit status 1 if a part failed or ran out of time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .goals import GOALS, GoalResult, evaluate, goal_table, prose, sample_records
from .report import BENCHMARKS_MD, LEFT_OUT, results_file, table, write_section

ROOT = Path(__file__).resolve().parent.parent
TOTAL_MINUTES = 8.0
RESERVE_S = 15.0  # for the report at the end and the grace a stopped part gets
MIN_REST_S = 55.0  # the least a part with budget_s=None (it takes what the others leave) is given
GRACE_S = 5.0  # SIGTERM, then this long, then SIGKILL
TAIL_LINES = 25  # of a failed part's output, in the report
PREFLIGHT_JSON = "preflight.json"
NO_CUDA = 3  # benchmarks.preflight's exit status without a CUDA device


@dataclass
class Part:
    """One step of the suite: a command with a hard time limit."""

    name: str
    argv: list[str]
    budget_s: float | None  # hard limit; None: what the plan leaves when it starts (at least MIN_REST_S)
    margin_s: float | None = None  # benchmarks get --max-seconds (limit - margin): start-up + longest configuration
    gpus: int = 1  # CUDA devices it needs: skipped with fewer (0: runs anyway)
    absent: dict[str, str] = field(default_factory=dict)  # optional package -> what was measured without it
    junit: Path | None = None  # pytest's report, for the counts
    exit_meanings: dict[int, str] = field(default_factory=dict)  # exit status -> what it means
    why: str = ""  # the plan's line on what it does and what its limit allows for
    check: Callable[[Part], str] | None = None  # the dry run's reachability check: a detail, or raises


@dataclass
class PartResult:
    name: str
    status: str  # "ok", "failed", "timed out" or "skipped"
    seconds: float
    limit_s: float | None
    detail: str = ""  # exit status, limit, or why it was skipped
    notes: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)

    @property
    def status_text(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status


# ----------------------------------------------------------------------------- the plan

def python_cmd() -> list[str]:
    """This interpreter, with -S when it runs without site (a checkout checked as if not installed)."""
    return [sys.executable] + (["-S"] if sys.flags.no_site else [])


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pytest_args(junit: Path | None) -> list[str]:
    """tests/cuda's pytest arguments; per-test timeout and 4 workers where those plugins are installed."""
    args = [str(ROOT / "tests" / "cuda"), "-p", "no:cacheprovider", "-q", "-rA"]
    if junit is not None:
        args.append(f"--junitxml={junit}")
    if have("pytest_timeout"):
        args.append("--timeout=60")
    if have("xdist"):
        args += ["-n", "4"]  # the kernels' compilation dominates: four processes share it
    return args


def build_plan(out: Path, run_dir: Path, write: bool = True, wheels: Path | None = None,
               site: Path | None = None) -> list[Part]:
    """The parts in order, with their limits (seconds).  The limits are the expected time plus a margin; the
    reasoning is in each part's ``why``.  Slack left by a part goes to ``step``, the last."""
    py = python_cmd()
    parts = []
    if wheels is not None:
        parts.append(Part("wheels", [*py, "-m", "benchmarks.wheels", str(wheels), "--target", str(site)], 15,
                          gpus=0, check=check_wheels,
                          why="pip --no-index into the site folder, first on PYTHONPATH; H100 2026-11-24: 5 s"))
    parts.append(Part("preflight", [*py, "-m", "benchmarks.preflight", "--json", str(run_dir / PREFLIGHT_JSON)],
                      30, gpus=0, check=check_preflight, exit_meanings={NO_CUDA: "no CUDA device"},
                      why="imports torch, triton and the optional packages; H100 2026-11-24: 14-18 s"))
    junit = run_dir / "tests-cuda.xml"
    parts.append(Part("tests/cuda", [*py, "-m", "pytest", *pytest_args(junit)], 90, junit=junit,
                      check=check_collect,
                      why="compiled kernels vs the reference; H100 2026-11-24: 39-46 s, mostly compiling"))

    def bench(name: str, limit: float | None, margin: float, why: str, **kw) -> Part:
        argv = [*py, "-m", "benchmarks", "--only", name, "--out", str(out)] + (["--write"] if write else [])
        return Part(name, argv, limit, margin, why=why, check=check_bench_args, **kw)

    dali_absent = "DALI absent: "
    parts += [
        bench("select", 60, 40, "H100 2026-11-24: 39-40 s, mostly the NumPy host baseline at 100M"),
        bench("loader", 60, 20, "H100 2026-11-24: 34-38 s for keeps 1.0 and 0.7 (PIL ~2.5 s an epoch, DALI 0.2 s); "
              "keep 0.5 needs ~15 s more",
              absent={"nvidia.dali": dali_absent + "the torchvision DataLoader measured alone"}),
        bench("epoch", 95, 25, "H100 2026-11-24: 38 s with DALI; 69 s with the PIL fallback (1000 img/s), which "
              "then needs ~15 s more for keep 0.5",
              absent={"nvidia.dali": dali_absent + "the DataLoader fallback (PIL decode) fed the model"}),
        bench("distributed", 60, 35, "NCCL, one GPU per rank: 3 sizes x 2 spawned ranks (~50 s)", gpus=2),
        bench("step", None, 45, "H100 2026-11-24: 68-89 s for 24 configurations x 7 methods, compiles included",
              absent={"liger_kernel": "Liger-Kernel absent: no liger baseline"}),
    ]
    return parts


def nominal_limit(part: Part) -> float:
    return part.budget_s if part.budget_s is not None else MIN_REST_S


def check_plan(parts: list[Part], total_s: float) -> list[str]:
    """What is wrong with the plan: limits over the total, margins over limits, names twice."""
    problems = []
    names = [p.name for p in parts]
    problems += [f"part {n!r} appears twice" for n in sorted({n for n in names if names.count(n) > 1})]
    need = sum(nominal_limit(p) for p in parts) + RESERVE_S
    if need > total_s:
        problems.append(f"the parts' limits and the {RESERVE_S:.0f} s reserve add up to {need:.0f} s, over the "
                        f"{total_s:.0f} s allowed")
    problems += [f"{p.name}: margin {p.margin_s:.0f} s leaves nothing of its {nominal_limit(p):.0f} s limit"
                 for p in parts if p.margin_s is not None and p.margin_s >= nominal_limit(p)]
    return problems


def limit_now(parts: list[Part], i: int, elapsed: float, total_s: float) -> float:
    """Part ``i``'s limit when it starts: its own, or (budget_s None) what the total leaves after the reserve
    and the limits of the parts after it."""
    part = parts[i]
    if part.budget_s is not None:
        return part.budget_s
    later = sum(nominal_limit(p) for p in parts[i + 1:])
    return max(MIN_REST_S, total_s - RESERVE_S - elapsed - later)


def plan_table(parts: list[Part], total_s: float) -> str:
    def max_seconds(p: Part) -> str:
        if p.margin_s is None:
            return "-"
        return f"limit - {p.margin_s:.0f}" if p.budget_s is None else f"{p.budget_s - p.margin_s:.0f}"

    rows = [[p.name, f"{p.budget_s:.0f}" if p.budget_s is not None else f"the rest (>= {MIN_REST_S:.0f})",
             max_seconds(p), p.gpus, p.why] for p in parts]
    return (table(["part", "limit s", "--max-seconds", "GPUs", "why that limit"], rows) +
            f"\n\nLimits plus the {RESERVE_S:.0f} s reserve: {sum(nominal_limit(p) for p in parts) + RESERVE_S:.0f}"
            f" s of {total_s:.0f} s.")


# ----------------------------------------------------------------------------- running

def child_env(site: Path | None = None) -> dict:
    """The parts' environment: this checkout (and carried wheels) importable, compiled kernels, live output."""
    env = dict(os.environ)
    paths = ([str(site)] if site else []) + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(PYTHONPATH=os.pathsep.join(paths), TRITON_INTERPRET="0", PYTHONUNBUFFERED="1")
    return env


def _pump(stream, log, tail: deque, left_out: list[str], prefix: str) -> None:
    """Copy a part's output to its log and the console, keeping its tail and any left-out lines."""
    try:
        for line in stream:
            log.write(line)
            sys.stdout.write(f"{prefix}{line}")
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
            if line.startswith(LEFT_OUT):
                left_out.append(line.strip())
    except (ValueError, OSError):  # the log was closed under a straggler: the part is over anyway
        pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the part's process group (it leads its own session); at least the part itself if that fails."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            proc.send_signal(sig)


def run_part(part: Part, limit: float, env: dict, log_path: Path) -> PartResult:
    """Run one part under ``limit`` seconds in its own process group; on time-out SIGTERM, then SIGKILL, the
    whole group (ranks, loader workers, pytest workers); what it left running is killed either way."""
    argv = list(part.argv)
    if part.margin_s is not None:
        argv += ["--max-seconds", f"{max(1.0, limit - part.margin_s):.0f}"]
    print(f"\n== {part.name} (limit {limit:.0f} s): {shlex.join(argv)}", flush=True)
    tail: deque = deque(maxlen=TAIL_LINES)
    left_out: list[str] = []
    t0 = time.monotonic()
    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
        reader = threading.Thread(target=_pump, args=(proc.stdout, log, tail, left_out, f"[{part.name}] "),
                                  daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=GRACE_S)
    seconds = time.monotonic() - t0
    if timed_out:
        status, detail = "timed out", f"stopped at its {limit:.0f} s limit"
    elif proc.returncode == 0:
        status, detail = "ok", ""
    elif proc.returncode < 0:
        status, detail = "failed", f"killed by signal {-proc.returncode}"
    else:
        status, detail = "failed", f"exit status {proc.returncode}"
        if proc.returncode in part.exit_meanings:
            detail += f", {part.exit_meanings[proc.returncode]}"
    notes = list(left_out)
    if part.junit is not None:
        counts = junit_counts(part.junit)
        notes.insert(0, counts if counts else "no test report")
    return PartResult(part.name, status, seconds, limit, detail, notes, list(tail))


def junit_counts(path: Path) -> str | None:
    """"N passed, F failed, E errors, S skipped" from pytest's junit XML; None without one."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"


def read_findings(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / PREFLIGHT_JSON).read_text())
    except (OSError, ValueError):
        return None


def skip_reason(part: Part, findings: dict | None) -> str:
    """Why ``part`` cannot run here ('' if it can); without the preflight's findings every part is tried."""
    if findings is None or part.gpus == 0:
        return ""
    have_gpus = findings.get("cuda_devices", 0)
    if have_gpus >= part.gpus:
        return ""
    return "no CUDA device (see preflight)" if have_gpus == 0 else \
        f"needs {part.gpus} CUDA devices, this machine has {have_gpus}"


def absent_notes(part: Part, findings: dict | None) -> list[str]:
    optional = (findings or {}).get("optional", {})
    return [note for module, note in part.absent.items() if module in optional and not optional[module]]


def this_runs_records(out: Path, device: str, since: _dt.datetime) -> list[dict]:
    """The records the parts wrote for ``device`` since ``since`` (older ones share the day's file)."""
    stamp = since.isoformat(timespec="seconds")
    records = []
    for day in sorted({since.date(), _dt.date.today()}):
        path = results_file(out, {"device": device, "date": day.isoformat()})
        try:
            records += json.loads(path.read_text())["records"]
        except (OSError, ValueError, KeyError):
            continue
    return [r for r in records if r.get("measured_at", "") >= stamp and r.get("device") == device]


def run_suite(parts: list[Part], run_dir: Path, out: Path, total_s: float, env: dict,
              benchmarks_md: Path | None = BENCHMARKS_MD) -> int:
    """Run every part (never stopping at a failure), then report parts and goals; the exit status."""
    run_dir.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now()
    t0 = time.monotonic()
    results: list[PartResult] = []
    for i, part in enumerate(parts):
        findings = read_findings(run_dir)
        reason = skip_reason(part, findings)
        if reason:
            print(f"\n== {part.name}: skipped, {reason}", flush=True)
            results.append(PartResult(part.name, "skipped", 0.0, part.budget_s, reason))
            continue
        limit = limit_now(parts, i, time.monotonic() - t0, total_s)
        result = run_part(part, limit, env, run_dir / f"{part.name.replace('/', '-')}.log")
        result.notes += absent_notes(part, read_findings(run_dir))
        results.append(result)
    findings = read_findings(run_dir) or {}
    device = findings.get("device")
    records = this_runs_records(out, device, started) if device else []
    goals = evaluate(records, device or "no CUDA device")
    wall = time.monotonic() - t0
    section = summary(results, goals, findings, started, wall, total_s, run_dir)
    failures = [r for r in results if r.status in ("failed", "timed out")]
    full = section + "".join(f"\n\n#### {r.name}: {r.status_text}, last lines\n\n```\n" + "\n".join(r.tail) + "\n```"
                             for r in failures)
    print("\n" + full, flush=True)
    (run_dir / "summary.md").write_text(full + "\n")
    (run_dir / "summary.json").write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "seconds": round(wall, 1), "limit_s": total_s,
        "findings": findings, "parts": [asdict(r) for r in results],
        "goals": [{"bench": g.goal.bench, "goal": g.goal.text, "set_for": g.goal.device, "measured": g.measured,
                   "status": g.status, "note": g.note} for g in goals]}, indent=1))
    if benchmarks_md is not None and device:
        write_section(f"suite-{device}", section, benchmarks_md)
    print(f"\nwrote {run_dir / 'summary.md'}" + (f" and the suite-{device} section of {benchmarks_md.name}"
                                                  if benchmarks_md is not None and device else ""))
    return 1 if failures else 0


def summary(results: list[PartResult], goals: list[GoalResult], findings: dict, started: _dt.datetime, wall: float,
            total_s: float, run_dir: Path) -> str:
    """The parts table and the goal table under one heading (BENCHMARKS.md's suite section)."""
    versions = ", ".join(f"{k} {findings[k]}" for k in ("torch", "triton", "numpy", "python") if findings.get(k))
    optional = ", ".join(f"{k} {v or 'absent'}" for k, v in findings.get("optional", {}).items())
    head = (f"### GPU suite — {started:%Y-%m-%d %H:%M}, device: {findings.get('device') or 'no CUDA device'}"
            + (f", {versions}" if versions else "") + "\n\n"
            f"`python -m benchmarks.gpu_suite`: {len(results)} parts in {wall:.0f} s (limit {total_s:.0f} s); "
            f"optional packages: {optional or 'unknown'}; logs in `{_shown(run_dir)}/`.")
    rows = [[r.name, r.status_text, f"{r.seconds:.0f}", "-" if r.limit_s is None else f"{r.limit_s:.0f}",
             "; ".join(r.notes) or "-"] for r in results]
    return (head + "\n\n" + table(["part", "status", "seconds", "limit s", "notes"], rows) +
            "\n\nGoals (benchmarks/goals.py), from this run's records:\n\n" + goal_table(goals))


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- the dry run

def check_preflight(part: Part) -> str:
    """The preflight runs here (no GPU needed) and writes its findings."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = list(part.argv)
        argv[argv.index("--json") + 1] = str(Path(tmp) / PREFLIGHT_JSON)
        proc = subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
        if proc.returncode not in (0, NO_CUDA) or not (Path(tmp) / PREFLIGHT_JSON).exists():
            raise RuntimeError(f"exit status {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
        found = json.loads((Path(tmp) / PREFLIGHT_JSON).read_text())
    return f"runs with site {found['site']}, device: {found['device'] or 'none'}; fastprune: {found['fastprune']}"


def check_collect(part: Part) -> str:
    """pytest collects tests/cuda with the part's own arguments (no report file)."""
    if not (ROOT / "tests" / "cuda").is_dir():
        raise RuntimeError(f"{ROOT / 'tests' / 'cuda'} does not exist")
    args = [a for a in part.argv if not a.startswith("--junitxml")] + ["--collect-only"]
    proc = subprocess.run(args, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=180)
    tests = [line for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode != 0 or not tests:
        raise RuntimeError(f"collection failed (exit status {proc.returncode}, {len(tests)} tests): "
                           f"{(proc.stdout + proc.stderr)[-1500:]}")
    return f"{len(tests)} tests collected"


def check_bench_args(part: Part) -> str:
    """``python -m benchmarks`` and each benchmark it runs accept exactly the arguments the part passes,
    ``--max-seconds`` included."""
    main = importlib.import_module(f"{__package__}.__main__")
    argv = part.argv[part.argv.index("-m") + 2:]
    if part.margin_s is not None:
        argv += ["--max-seconds", f"{nominal_limit(part) - part.margin_s:.0f}"]
    try:
        args = main.parse_args(argv)
        for name in args.only or main.BENCHES:
            main.BENCHES[name].parse_args(main.bench_flags(args))
    except SystemExit as e:  # argparse's way of refusing
        raise RuntimeError(f"arguments refused: {shlex.join(argv)}") from e
    return f"parsers accept: {shlex.join(argv)}"


def check_wheels(part: Part) -> str:
    from .wheels import find_wheels

    return f"{len(find_wheels(Path(part.argv[part.argv.index('benchmarks.wheels') + 1])))} wheel files or parts"


def check_markers(text: str) -> list[str]:
    """Problems with BENCHMARKS.md's ``<!-- name -->`` ... ``<!-- /name -->`` sections (the only comments)."""
    problems, seen, open_name = [], set(), None
    for m in re.finditer(r"<!-- (/?)(\S.*?) -->", text):
        closing, name = m.group(1) == "/", m.group(2)
        if not closing:
            if open_name is not None:
                problems.append(f"<!-- {name} --> opens inside <!-- {open_name} -->")
            if name in seen:
                problems.append(f"<!-- {name} --> appears twice")
            seen.add(name)
            open_name = name
        else:
            if name != open_name:
                problems.append(f"<!-- /{name} --> closes " + (f"<!-- {open_name} -->" if open_name else "nothing"))
            open_name = None
    if open_name is not None:
        problems.append(f"<!-- {open_name} --> is never closed")
    return problems


def check_benchmarks_md(path: Path) -> str:
    if not path.is_file():
        raise RuntimeError(f"{path} does not exist")
    if not os.access(path, os.W_OK):
        raise RuntimeError(f"{path} is not writable")
    problems = check_markers(path.read_text())
    if problems:
        raise RuntimeError("; ".join(problems))
    return "writable, sections well formed"


def check_goals() -> str:
    """Every goal's extractor finds its value in records shaped as the benchmarks write them."""
    records = sample_records()
    missing = [g.text for g in GOALS if g.measure(records) is None]
    if missing:
        raise RuntimeError(f"no value from the sample records for: {'; '.join(missing)}")
    statuses = [r.status for r in evaluate(records, "NVIDIA H100 80GB HBM3")]
    benches = sorted({g.bench for g in GOALS})
    if any(not prose(b) for b in benches):
        raise RuntimeError("a benchmark with goals has no goal sentence")
    return f"{len(GOALS)} goals of {len(benches)} benchmarks evaluate ({statuses.count('met')} met on the samples)"


def dry_run(parts: list[Part], total_s: float, benchmarks_md: Path = BENCHMARKS_MD) -> int:
    """The plan, the files and every part's reachability, checked without a GPU; 0 when all hold."""
    print(plan_table(parts, total_s) + "\n", flush=True)

    def plan() -> str:
        problems = check_plan(parts, total_s)
        if problems:
            raise RuntimeError("; ".join(problems))
        return f"{len(parts)} parts fit in {total_s:.0f} s"

    checks: list[tuple[str, Callable[[], str]]] = [
        ("plan", plan), ("BENCHMARKS.md", lambda: check_benchmarks_md(benchmarks_md)), ("goals", check_goals),
    ] + [(f"part {p.name}", (lambda p=p: p.check(p))) for p in parts if p.check is not None]
    failed = 0
    for name, fn in checks:
        try:
            detail, ok = fn(), True
        except Exception as e:  # noqa: BLE001 - every check is reported, the rest still run
            detail, ok = f"{type(e).__name__}: {e}", False
        failed += not ok
        print(f"{'ok' if ok else 'FAILED':6s} {name}: {detail}", flush=True)
    print(f"\ndry run: {len(checks) - failed} of {len(checks)} checks passed")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="check the plan, the files and that every part is reachable, without a GPU")
    ap.add_argument("--out", type=Path, default=ROOT / "results", help="results folder (default results/)")
    ap.add_argument("--wheels", type=Path, help="install the *.whl files or wheels.tar.N parts in this folder first")
    ap.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "fastprune-site",
                    help="where --wheels installs (default: fastprune-site in the temporary folder)")
    ap.add_argument("--only", nargs="+", metavar="PART", help="run only these parts (the preflight always runs)")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md as it is")
    ap.add_argument("--minutes", type=float, default=TOTAL_MINUTES, help="the whole run's limit (default 8)")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    run_dir = out / f"suite-{_dt.datetime.now():%Y-%m-%d-%H%M%S}"
    wheels = args.wheels.resolve() if args.wheels else None  # the parts run from the repository root
    site = args.site.resolve() if wheels else None
    parts = build_plan(out, run_dir, write=not args.no_write, wheels=wheels, site=site)
    if args.only:
        unknown = sorted(set(args.only) - {p.name for p in parts})
        if unknown:
            ap.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(p.name for p in parts)}")
        parts = [p for p in parts if p.name in args.only or p.name in ("wheels", "preflight")]
    total_s = args.minutes * 60
    if args.dry_run:
        return dry_run(parts, total_s)
    for problem in check_plan(parts, total_s):
        print(f"warning: {problem}")
    print(plan_table(parts, total_s), flush=True)
    return run_suite(parts, run_dir, out, total_s, child_env(site), None if args.no_write else BENCHMARKS_MD)


if __name__ == "__main__":
    raise SystemExit(main())
