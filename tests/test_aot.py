"""Every kernel specialisation compiles ahead of time for real GPUs (sm_80, sm_90) without a GPU."""

import json
import os
import subprocess
import sys

import pytest

from fastprune.kernels import aot


@pytest.mark.aot
def test_every_specialisation_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "fastprune.kernels.aot", "--arch", "80", "90", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert len(rows) == 2 * len(aot.all_specs())
    assert {r["arch"] for r in rows} == {80, 90}
    assert {r["kernel"] for r in rows} == {"fused_step_kernel", "settle_kernel", "scale_grad_kernel",
                                           "priority_kernel", "finalize_kernel", "shuffle_kernel", "compact_kernel",
                                           "em_kernel"}
    for r in rows:
        assert r["cubin_bytes"] > 0, r["label"]
        assert r["spill_bytes"] == 0, f"{r['label']} sm_{r['arch']} spills {r['spill_bytes']} bytes"
        if r["expect_vector_loads"]:
            assert r["vector_loads"], f"{r['label']} sm_{r['arch']}: no 16-byte loads ({r['global_loads']})"


def test_specialisations_cover_what_the_launcher_chooses():
    """The AOT list holds every tile the launcher can pick, for each dtype, alignment and mode."""
    from fastprune.kernels.step import TILES

    labels = [s.label for s in aot.step_specs() if s.kernel == "fused_step_kernel"]
    assert len(labels) == len(set(labels)) == len(TILES) * 3 * 2 * 7
    assert any("bfloat16" in s and "VEC=8" in s and "chunked" in s for s in labels)


def test_aot_refuses_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("only meaningful under the interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        aot.compile_all(specs=aot.select_specs()[:1])
