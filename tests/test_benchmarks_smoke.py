"""Every benchmark runs (smoke sizes) and writes well-formed records; no speed is asserted here."""

import json
import os
import subprocess
import sys

import pytest
from conftest import fake_bench

pytest.importorskip("nvidia.dali", reason="DALI is not installed")


def test_bench_smoke_writes_well_formed_records(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TMPDIR"] = str(tmp_path)  # generated JPEGs go here
    proc = subprocess.run([sys.executable, "-m", "fastprune", "bench", "--smoke", "--out", str(tmp_path / "res"),
                           "--no-write"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / "res").glob("*-smoke.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert {"date", "device", "torch", "cpu"} <= set(data["machine"])
    records = data["records"]
    assert {r["bench"] for r in records} == {"step", "select", "loader", "epoch", "distributed", "noise"}
    noise = [r for r in records if r["bench"] == "noise"]
    records = [r for r in records if r["bench"] != "noise"]
    for r in records:
        for key in ("bench", "method", "device", "versions", "dtype", "sizes", "median_us", "iqr_us", "measured_at"):
            assert key in r, (key, r)
        assert r["median_us"] > 0 and r["iqr_us"] >= 0
    from benchmarks.bench_noise import ARMS, EXTRA_ARMS

    assert set(ARMS) - {"cleanlab, then full"} - set(EXTRA_ARMS) <= {r["arm"] for r in noise}
    for r in noise:
        assert 0 <= r["accuracy"] <= 1 and 0 < r["visits"] <= 1 and r["seconds"] > 0 and r["planted"] > 0
    from benchmarks.goals import GOALS

    # the goals whose sizes a smoke run reaches read their values from real records, not only from samples
    reached = {g.text for g in GOALS if g.measure(records) is not None}
    assert {"fused / ce <= 0.7", "eager / fused >= 3", "keep 0.7 <= 0.73x the full epoch",
            "DaliLoader's keep-0.7 epoch <= 0.73x its keep-1.0 epoch",
            "<= 16 bytes per sample handed to the all-reduce per rank"} <= reached
    step = [r for r in records if r["bench"] == "step"]
    assert {"fused", "ce", "eager", "infobatch"} <= {r["method"] for r in step}
    assert all("GBps" in r and "ratio_to_fused" in r for r in step)
    dist = [r for r in records if r["bench"] == "distributed"]
    assert all(r["bytes_per_rank"] > 0 and r["sizes"]["ranks"] == 2 for r in dist)
    for table in ("Step overhead", "Epoch selection", "Loader throughput", "Epoch time", "Distributed epoch end"):
        assert table in proc.stdout


def test_step_table_reads_device_times_on_a_gpu():
    """GPU runs time every method that never synchronises from a CUDA graph: the table's times, ratios and GB/s
    are those device times (a synchronising method keeps its wall time, marked), the host's enqueue and wall
    times sit beside them; CPU runs keep the plain medians."""
    import argparse

    from benchmarks import bench_step
    from benchmarks.goals import GOALS

    info = {"date": "2026-01-01", "device": "GPU", "cpu": "x", "cpu_cores": 1, "torch": "t"}

    def rec(method, us, graph_us=None, B=256, host=None):
        r = {"bench": "step", "method": method, "dtype": "bfloat16", "sizes": {"B": B, "C": 1000, "D": 512},
             "median_us": us, "GBps": 1.0, "host_syncs": 0 if graph_us else 1}
        if graph_us is not None:
            r.update(graph_median_us=graph_us, host_us=host)
        return r

    records = [rec("fused", 300, 6.0, host=290), rec("ce", 90, 12.0, host=80), rec("eager", 400, 48.0, host=390),
               rec("infobatch", 500)]
    args = argparse.Namespace(smoke=False)
    text = bench_step.render(records, {"copy_GBps": 100.0}, info, args)
    header = next(line for line in text.splitlines() if line.startswith("| B |"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")],
                     [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| 256 "))
                      .strip("|").split("|")]))
    assert cells["fused us"] == "6" and cells["ce us"] == "12" and cells["infobatch us"] == "500*"
    assert cells["fused / ce"] == "0.50" and cells["eager / fused"] == "8.0x"
    assert cells["host enqueue us, fused / ce"] == "290 / 80"
    assert cells["wall us (do_bench), fused / ce"] == "300 / 90 = 3.33"
    ratio = next(g for g in GOALS if g.text == "fused / ce <= 0.7")
    assert ratio.measure(records).value == 0.5  # the goal reads device times too
    cpu = [{k: v for k, v in r.items() if k not in ("graph_median_us", "host_us")} for r in records]
    plain = bench_step.render(cpu, {"copy_GBps": 100.0}, dict(info, device="cpu"), args)
    assert "host enqueue" not in plain and "| 300 | 90 |" in plain
    assert ratio.measure(cpu).value == 300 / 90


def test_only_runs_add_up_in_one_results_file(tmp_path, monkeypatch):
    """`--only` runs on the same day merge into one file; a re-run benchmark replaces its own records."""
    import benchmarks.__main__ as M

    calls = {"n": 0}

    monkeypatch.setattr(M, "BENCHES", {"step": fake_bench("step", calls), "select": fake_bench("select", calls)})
    monkeypatch.setattr(M, "machine", lambda: {"device": "Dev X", "date": "2026-01-02"})
    out = tmp_path / "res"
    assert M.main(["--only", "step", "--out", str(out), "--no-write"]) == 0
    assert M.main(["--only", "select", "--out", str(out), "--no-write"]) == 0
    assert M.main(["--only", "step", "--out", str(out), "--no-write"]) == 0
    records = json.loads((out / "Dev-X-2026-01-02.json").read_text())["records"]
    assert sorted((r["bench"], r["run"]) for r in records) == [("select", 2), ("step", 3)]


def test_publishing_tables_is_an_explicit_choice(tmp_path, monkeypatch, capsys):
    """BENCHMARKS.md changes only with --write, and never with smoke figures."""
    import benchmarks.__main__ as M
    from benchmarks import report

    written = []
    monkeypatch.setattr(M, "write_section", lambda section, text: written.append(section))
    monkeypatch.setattr(report, "write_section", lambda section, text: written.append(section))

    monkeypatch.setattr(M, "BENCHES", {"step": fake_bench("step", {"n": 0})})
    monkeypatch.setattr(M, "machine", lambda: {"device": "Dev X", "date": "2026-01-02"})
    out = str(tmp_path / "res")
    assert M.main(["--only", "step", "--out", out]) == 0 and written == []
    assert M.main(["--only", "step", "--out", out, "--smoke"]) == 0 and written == []
    with pytest.raises(SystemExit) as e:
        M.main(["--only", "step", "--out", out, "--smoke", "--write"])
    assert e.value.code == 2 and "smoke figures (--smoke) are never published" in capsys.readouterr().err
    assert M.main(["--only", "step", "--out", out, "--write"]) == 0 and written == ["step-x"]
    assert "--write" not in M.bench_flags(M.parse_args(["--write"]))  # the benchmarks themselves do not write

    written.clear()  # one benchmark on its own: the same rule
    assert report.cli_main(lambda argv: report.base_parser("x").parse_args(argv),
                           lambda args, info: ([], "table", "sec"), ["--cpu"]) == 0 and written == []
    assert report.cli_main(lambda argv: report.base_parser("x").parse_args(argv),
                           lambda args, info: ([], "table", "sec"), ["--cpu", "--write"]) == 0 and written == ["sec"]


def test_bench_epoch_rejects_a_bad_repeat_count(capsys):
    from benchmarks import bench_epoch

    with pytest.raises(SystemExit):
        bench_epoch.parse_args(["--repeats", "0", "--cpu"])
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err
    assert bench_epoch.parse_args(["--smoke", "--cpu"]).repeats == 1
    assert bench_epoch.parse_args(["--cpu"]).repeats == 3


@pytest.mark.parametrize("noise", [0.2, 0.4])
def test_the_noise_ceiling_arm_gets_the_decisions_budget(noise):
    """Leaving exactly the flips out as a static subset (the ceiling arm) selects what the decisions would select
    had they left out the same samples: the same drop probability, kept set and weights."""
    import torch

    from benchmarks.bench_noise import KEEP, decisions_budget
    from fastprune.kernels import select_epoch

    g = torch.Generator().manual_seed(1)
    n = 1077
    scores = torch.rand(n, generator=g) * 3
    visits = torch.ones(n, dtype=torch.int32)
    flips = torch.rand(n, generator=g) < noise
    kw = dict(use_consistency=False, policy="infobatch", noise_ratio=0.0, semantic_weight=0.0, max_drop=0.9,
              seed=3, epoch=4)
    decided = select_epoch(scores, visits, torch.zeros(n), keep_ratio=KEEP, noisy=flips.clone(), **kw)
    static = select_epoch(scores, visits, torch.zeros(n), exclude=flips, population=int((~flips).sum()),
                          keep_ratio=decisions_budget(n, int((~flips).sum())), **kw)
    assert torch.equal(decided.keep, static.keep) and float(decided.drop_prob) == float(static.drop_prob)
    assert torch.equal(decided.weights[decided.keep], static.weights[static.keep])
    assert (float(decided.drop_prob) > 0) == (noise < 1 - KEEP)  # at 40% noise nothing else is pruned


def test_the_noise_table_says_when_cleanlab_was_not_run(monkeypatch):
    from benchmarks import bench_noise
    from benchmarks.report import machine

    monkeypatch.setattr(bench_noise, "_has_cleanlab", lambda: False)
    args = bench_noise.parse_args(["--smoke", "--arms", "cleanlab, then full"])
    records, text, _ = bench_noise.produce(args, machine())
    assert records == [] and "was not run: cleanlab is not installed" in text


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--epochs", "0"]])
def test_noise_bench_refuses_nonpositive_counts(argv, capsys):
    from benchmarks import bench_noise

    with pytest.raises(SystemExit):
        bench_noise.parse_args(argv)
    assert "--seeds and --epochs must be >= 1" in capsys.readouterr().err
