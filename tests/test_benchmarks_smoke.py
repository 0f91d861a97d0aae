"""The benchmarks still run (smoke mode, tiny sizes); their figures are not checked here."""

import json

import pytest

pytest.importorskip("nvidia.dali", reason="DALI is not installed")


def test_bench_loader_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from benchmarks import bench_loader

    out = tmp_path / "loader.json"
    assert bench_loader.main(["--smoke", "--size", "40", "--workers", "1", "--no-write", "--data",
                              str(tmp_path / "jpegs"), "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert {r["loader"] for r in records} == {"DaliLoader", "torchvision DataLoader (PIL)"}
    assert {r["keep"] for r in records} == {1.0, 0.7, 0.5}
    assert [r["images"] for r in records if r["loader"] == "DaliLoader"] == [40, 28, 20]
