"""Every benchmark runs (smoke sizes) and writes well-formed records; no speed is asserted here."""

import json
import os
import subprocess
import sys

import pytest

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
    assert {r["bench"] for r in records} == {"step", "select", "loader", "epoch", "distributed"}
    for r in records:
        for key in ("bench", "method", "device", "versions", "dtype", "sizes", "median_us", "iqr_us"):
            assert key in r, (key, r)
        assert r["median_us"] > 0 and r["iqr_us"] >= 0
    step = [r for r in records if r["bench"] == "step"]
    assert {"fused", "ce", "eager", "infobatch"} <= {r["method"] for r in step}
    assert all("GBps" in r and "ratio_to_fused" in r for r in step)
    dist = [r for r in records if r["bench"] == "distributed"]
    assert all(r["bytes_per_rank"] > 0 and r["sizes"]["ranks"] == 2 for r in dist)
    for table in ("Step overhead", "Epoch selection", "Loader throughput", "Epoch time", "Distributed epoch end"):
        assert table in proc.stdout
