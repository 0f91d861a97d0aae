"""The GPU suite's CPU side: its dry run from a checkout that is not installed, the goals, and the runner with
stand-in parts (a failure, a time-out, a skip: the rest still runs and the statuses and exit status say so)."""

import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from fastprune.benchmarks import gpu_suite as S
from fastprune.benchmarks.goals import GOALS, Goal, evaluate, loader_keep_ratio, prose, sample_records
from fastprune.benchmarks.report import LEFT_OUT, results_file

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_passes_from_a_checkout_that_is_not_installed(tmp_path):
    """python -S skips .pth files, so the editable install is invisible: only PYTHONPATH finds the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])
    proc = subprocess.run([sys.executable, "-S", "-m", "benchmarks.gpu_suite", "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    checks = re.findall(r"^(ok|FAILED) +(.+?):", out, re.M)
    names = [name for _, name in checks]
    assert all(status == "ok" for status, _ in checks)
    assert {"plan", "BENCHMARKS.md", "goals", "part preflight", "part tests/cuda", "part step", "part select",
            "part loader", "part epoch", "part distributed"} <= set(names)
    assert f"dry run: {len(checks)} of {len(checks)} checks passed" in out
    assert int(re.search(r"part tests/cuda: (\d+) tests collected", out).group(1)) > 0
    preflight = next(line for line in out.splitlines() if "part preflight" in line)
    assert "site disabled (-S)" in preflight and "source tree on PYTHONPATH" in preflight
    assert "--max-seconds" in next(line for line in out.splitlines() if "part step" in line)


def test_the_plan_fits_in_eight_minutes_with_carried_wheels(tmp_path):
    parts = S.build_plan(tmp_path, tmp_path / "run", wheels=tmp_path, site=tmp_path / "site")
    assert [p.name for p in parts] == ["wheels", "preflight", "tests/cuda", "select", "loader", "epoch",
                                       "distributed", "step"]
    assert S.check_plan(parts, 8 * 60) == []
    assert S.check_plan(parts, 7 * 60)  # the same plan does not fit in 7 minutes
    doubled = parts + [replace(parts[-2], budget_s=100)]
    assert any("appears twice" in p for p in S.check_plan(doubled, 60 * 60))


def test_the_rest_goes_to_the_part_without_a_limit():
    parts = [S.Part("a", [], 100), S.Part("rest", [], None, margin_s=10), S.Part("b", [], 50)]
    assert S.limit_now(parts, 1, elapsed=200, total_s=480) == 480 - S.RESERVE_S - 200 - 50
    assert S.limit_now(parts, 1, elapsed=470, total_s=480) == S.MIN_REST_S
    assert S.limit_now(parts, 0, elapsed=470, total_s=480) == 100


@pytest.mark.parametrize("text,problem", [
    ("<!-- a -->\nx\n<!-- /a -->\n<!-- b -->\n<!-- /b -->", None),
    ("<!-- a -->\nx\n", "never closed"),
    ("<!-- a -->\n<!-- b -->\n<!-- /b -->\n<!-- /a -->", "opens inside"),
    ("<!-- /a -->", "closes nothing"),
    ("<!-- a -->\n<!-- /a -->\n<!-- a -->\n<!-- /a -->", "appears twice"),
])
def test_section_markers_are_checked(text, problem):
    problems = S.check_markers(text)
    assert (problems == []) if problem is None else any(problem in p for p in problems), problems


def test_dry_run_fails_when_a_check_fails(tmp_path, capsys):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("<!-- step-cpu -->\nno end\n")
    parts = [S.Part("ok", [sys.executable, "-c", "pass"], 10, check=lambda p: "fine")]
    assert S.dry_run(parts, 60, md) == 1
    assert re.search(r"^FAILED BENCHMARKS.md: .*never closed", capsys.readouterr().out, re.M)
    md.write_text("<!-- step-cpu -->\n<!-- /step-cpu -->\n")
    assert S.dry_run(parts, 60, md) == 0
    assert S.dry_run(parts, 20, md) == 1  # 10 s + the 15 s reserve is over 20 s


# ----------------------------------------------------------------------------- goals

def _status(results, text):
    return next(r for r in results if r.goal.text == text)


def test_goals_met_not_met_and_not_measured():
    records = sample_records()
    h100 = evaluate(records, "NVIDIA H100 80GB HBM3")
    assert {r.status for r in h100} == {"met"} and len(h100) == len(GOALS)
    worse = [dict(r, median_us=r["median_us"] * 3) if r["bench"] == "step" and r["method"] == "fused"
             and r["sizes"]["C"] == 32000 else r for r in records]
    slow = _status(evaluate(worse, "NVIDIA H100 80GB HBM3"), "fused / ce <= 0.7")
    assert slow.status == "not met"
    assert slow.measured.startswith("2.00 (worst of 2 configurations: B=4096 C=32000 bfloat16")
    no_100m = [r for r in records if not (r["bench"] == "select" and r["sizes"]["N"] == 100_000_000)]
    results = evaluate(no_100m, "NVIDIA H100 80GB HBM3")
    assert _status(results, "<= 20 ms at 100M").status == "not measured"
    assert _status(results, "<= 0.3 ms at 1.28M").status == "met"
    assert _status(results, "<= 0.3 ms at 1.28M").measured == "0.250 ms (N=1,281,167)"


def test_gpu_goals_are_not_judged_on_cpu_figures_and_flagged_on_another_gpu():
    records = sample_records()
    cpu = evaluate(records, "cpu")
    for r in cpu:
        assert r.status == ("not measured" if r.goal.device else "met"), r
    h200 = _status(evaluate(records, "NVIDIA H200"), "fused / ce <= 0.7")
    assert h200.status == "met" and h200.note == "goal set for the H100"


def test_goal_sentences_come_from_the_goal_data():
    assert prose("step") == ("Goals (H100): fused / ce <= 0.7, eager / fused >= 3, compiled / fused >= 1.5, "
                             "fused host syncs == 0, >= 80% of copy bandwidth at B*C >= 64M.")
    assert prose("epoch") == "Goal: keep 0.7 <= 0.73x the full epoch."
    tighter = Goal("epoch", "keep 0.7 {op} {threshold:g}x the full epoch", "<=", 0.71, GOALS[0].measure)
    assert tighter.text == "keep 0.7 <= 0.71x the full epoch"
    assert all("{" not in g.text for g in GOALS)


def test_every_table_in_benchmarks_md_states_the_current_goals():
    """Sections are regenerated from goals.py; a hand edit or a changed goal without a re-run shows here."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    sections = re.findall(r"<!-- (\w+)-(.+?) -->\n(.*?)<!-- /\1-\2 -->", text, re.S)
    benches = {g.bench for g in GOALS}
    assert benches <= {bench for bench, _, _ in sections}
    for bench, device, body in sections:
        if bench in benches:
            assert prose(bench) in body.replace("\n", " "), f"{bench}-{device} does not state {prose(bench)!r}"


# ----------------------------------------------------------------------------- the runner

def _script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks process states in /proc")
def test_runner_goes_on_after_a_failure_and_a_time_out(tmp_path):
    run_dir, out, md = tmp_path / "run", tmp_path / "results", tmp_path / "BENCHMARKS.md"
    md.write_text("# benchmarks\n\n<!-- step-cpu -->\nunchanged\n<!-- /step-cpu -->\n")
    device = "Test GPU 1"
    findings = {"device": device, "cuda_devices": 1, "torch": "2.11", "optional": {"nvidia.dali": None}}
    results = results_file(out, {"device": device, "date": dt.date.today().isoformat()})
    step = [{"bench": "step", "method": m, "dtype": "bfloat16", "sizes": {"B": 1024, "C": 1000, "D": 512},
             "median_us": us, "host_syncs": 0, "device": device} for m, us in (("fused", 100), ("ce", 200),
                                                                                ("eager", 150))]
    old = {"bench": "select", "method": "next_epoch", "sizes": {"N": 1_281_167}, "median_us": 100, "device": device,
           "measured_at": "2000-01-01T00:00:00"}  # an earlier run's, in the same file: not this run's figure
    marker, pidfile = tmp_path / "last-ran", tmp_path / "grandchild.pid"
    parts = [
        S.Part("preflight", _script(tmp_path, "preflight", f"""
            import json, pathlib
            pathlib.Path({str(run_dir / S.PREFLIGHT_JSON)!r}).write_text(json.dumps({findings!r}))
            print("preflight done")"""), 10, gpus=0),
        S.Part("fails", _script(tmp_path, "fails", """
            import sys
            print("working"); print("boom", file=sys.stderr); sys.exit(3)"""), 10),
        S.Part("hangs", _script(tmp_path, "hangs", f"""
            import pathlib, subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            pathlib.Path({str(pidfile)!r}).write_text(str(child.pid))
            print("started", flush=True)
            time.sleep(120)"""), 3),
        S.Part("records", _script(tmp_path, "records", f"""
            import datetime, json, pathlib
            now = datetime.datetime.now().isoformat(timespec="seconds")
            recs = [dict(r, measured_at=now) for r in {step!r}] + [{old!r}]
            path = pathlib.Path({str(results)!r})
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({{"machine": {{}}, "records": recs}}))
            print({LEFT_OUT!r} + " (--max-seconds 5): N=100,000,000")"""), 10,
               absent={"nvidia.dali": "DALI absent: measured without it"}),
        S.Part("needs-two", [sys.executable, "-c", "raise SystemExit(9)"], 10, gpus=2),
        S.Part("last", _script(tmp_path, "last", f"""
            import pathlib, sys
            pathlib.Path({str(marker)!r}).write_text(" ".join(sys.argv[1:]))"""), None, margin_s=10),
    ]
    t0 = time.monotonic()
    rc = S.run_suite(parts, run_dir, out, total_s=120, env=S.child_env(), benchmarks_md=md)
    assert rc == 1
    assert time.monotonic() - t0 < 30
    summary = json.loads((run_dir / "summary.json").read_text())
    by = {p["name"]: p for p in summary["parts"]}
    assert [p["name"] for p in summary["parts"]] == [p.name for p in parts]
    assert by["preflight"]["status"] == "ok"
    assert (by["fails"]["status"], by["fails"]["detail"]) == ("failed", "exit status 3")
    assert "boom" in by["fails"]["tail"]
    assert by["hangs"]["status"] == "timed out" and by["hangs"]["seconds"] < 3 + S.GRACE_S + 2
    assert by["hangs"]["tail"] == ["started"]
    deadline = time.monotonic() + 5
    while _alive(int(pidfile.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(int(pidfile.read_text())), "the timed-out part's own child was left running"
    assert by["records"]["status"] == "ok"
    assert by["records"]["notes"] == [f"{LEFT_OUT} (--max-seconds 5): N=100,000,000",
                                      "DALI absent: measured without it"]
    assert (by["needs-two"]["status"], by["needs-two"]["detail"]) == \
        ("skipped", "needs 2 CUDA devices, this machine has 1")
    assert by["last"]["status"] == "ok"  # ran after the failure and the time-out
    granted = by["last"]["limit_s"]
    assert granted > S.MIN_REST_S and marker.read_text() == f"--max-seconds {granted - 10:.0f}"
    goals = {g["goal"]: g for g in summary["goals"]}
    assert goals["fused / ce <= 0.7"]["status"] == "met"
    assert goals["eager / fused >= 3"]["status"] == "not met"
    assert goals["<= 0.3 ms at 1.28M"]["status"] == "not measured"  # the old record does not count
    assert (run_dir / "fails.log").read_text().splitlines()[1:] == ["working", "boom"]
    report = (run_dir / "summary.md").read_text()
    assert "| hangs | timed out: stopped at its 3 s limit |" in report
    assert "#### fails: failed: exit status 3, last lines" in report
    text = md.read_text()
    assert "<!-- step-cpu -->\nunchanged\n<!-- /step-cpu -->" in text
    section = re.search(r"<!-- suite-Test GPU 1 -->\n(.*?)<!-- /suite-Test GPU 1 -->", text, re.S).group(1)
    assert "| fails | failed: exit status 3 |" in section
    assert "| step | fused / ce <= 0.7 | H100 | 0.50 (worst of 1 configurations: B=1024 C=1000 bfloat16) | met |" \
        in section

    ok = [S.Part("only", [sys.executable, "-c", "print('fine')"], 10, gpus=0)]
    assert S.run_suite(ok, tmp_path / "run2", out, total_s=60, env=S.child_env(), benchmarks_md=None) == 0


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>')
    assert S.junit_counts(xml) == "3 passed, 1 failed, 1 errors, 2 skipped"
    assert S.junit_counts(tmp_path / "missing.xml") is None


# ----------------------------------------------------------------------------- what the parts rely on

def test_a_trimmed_benchmark_names_what_it_left_out(reference_path):
    from fastprune.benchmarks import bench_select
    from fastprune.benchmarks.report import machine

    args = bench_select.parse_args(["--smoke", "--cpu", "--no-write", "--max-seconds", "0"])
    records, text, _ = bench_select.produce(args, machine())
    assert {r["sizes"]["N"] for r in records} == {10_000}  # the first configuration always runs
    assert f"{LEFT_OUT} (--max-seconds 0): N=100,000." in text


def test_the_selection_benchmark_times_another_checkout_beside_this_one(tmp_path, reference_path):
    """``--baseline DIR``: the other tree's ``next_epoch()`` in a subprocess (here this very checkout), as a
    column; a folder that is not a checkout is refused."""
    import torch

    from fastprune.benchmarks import bench_select
    from fastprune.benchmarks.report import machine

    root = Path(bench_select.__file__).resolve().parents[1]
    args = bench_select.parse_args(["--smoke", "--cpu", "--no-write", "--max-seconds", "0", "--baseline", str(root)])
    records, text, _ = bench_select.produce(args, machine())
    base = [r for r in records if r["method"] == bench_select.BASELINE]
    assert len(base) == 1 and base[0]["median_us"] > 0 and base[0]["tree"] == str(root)
    assert f"{bench_select.BASELINE} ms" in text and f"checkout {root}" in text
    with pytest.raises(SystemExit, match="not a fastprune checkout"):
        bench_select.baseline_us(str(tmp_path), 100, torch.device("cpu"), 1)
    with pytest.raises(SystemExit):  # and before anything is measured
        bench_select.parse_args(["--smoke", "--baseline", str(tmp_path)])


def test_without_dali_the_loader_table_says_what_it_measured(tmp_path, monkeypatch, reference_path):
    from fastprune.benchmarks import bench_loader
    from fastprune.benchmarks.report import machine

    monkeypatch.setattr(bench_loader, "have_dali", lambda: False)
    args = bench_loader.parse_args(["--smoke", "--cpu", "--no-write", "--size", "20", "--repeats", "1",
                                    "--batch-size", "8", "--workers", "0", "--data", str(tmp_path)])
    records, text, _ = bench_loader.produce(args, machine())
    assert {r["method"] for r in records} == {"torchvision DataLoader (PIL)"}
    assert "DALI is not installed: the torchvision DataLoader (PIL, CPU decode) was measured alone." in text
    assert loader_keep_ratio(records) is None  # the DaliLoader goal: not measured


def test_generated_images_do_not_depend_on_how_the_work_is_split(tmp_path):
    from fastprune.benchmarks.bench_loader import _write_images

    for name, ids in (("all", range(4)), ("one", range(2, 3))):
        (tmp_path / name / "n00000000").mkdir(parents=True)
        _write_images(tmp_path / name, ids, classes=1, seed=0)
    image = "n00000000/img_0000002.JPEG"
    assert (tmp_path / "all" / image).read_bytes() == (tmp_path / "one" / image).read_bytes()


def test_carried_wheels_install_from_split_tar_parts(tmp_path):
    from fastprune.benchmarks.wheels import install

    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fp_probe/__init__.py", "VALUE = 42\n")
        z.writestr("fp_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fp-probe\nVersion: 1.0\n")
        z.writestr("fp_probe-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("fp_probe-1.0.dist-info/RECORD", "")
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("fp_probe-1.0-py3-none-any.whl")
        info.size = len(wheel.getvalue())
        t.addfile(info, io.BytesIO(wheel.getvalue()))
    data = tar.getvalue()
    for k, chunk in enumerate((data[:len(data) // 2], data[len(data) // 2:])):  # as split -d writes them
        (tmp_path / "carried" / f"part{k + 1}").mkdir(parents=True)
        (tmp_path / "carried" / f"part{k + 1}" / f"wheels.tar.{k}").write_bytes(chunk)
    assert install(tmp_path / "carried", tmp_path / "site") == ["fp_probe-1.0-py3-none-any.whl"]
    assert (tmp_path / "site" / "fp_probe" / "__init__.py").read_text() == "VALUE = 42\n"
    (tmp_path / "carried" / "part1" / "wheels.tar.0").unlink()
    with pytest.raises(FileNotFoundError, match="not 0 to 0"):
        install(tmp_path / "carried", tmp_path / "site")
