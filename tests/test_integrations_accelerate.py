"""fastprune.integrations.accelerate: the sampler Accelerate shards, and examples/accelerate_loop.py, on the CPU
(one process, and 2 gloo processes started by torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

import accelerate_programs as A  # noqa: E402

import fastprune  # noqa: E402
from fastprune.integrations.accelerate import SelectionSampler, selection_sampler  # noqa: E402

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0",
       "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_selection_sampler_yields_the_whole_selection_and_follows_next_epoch():
    pruner = fastprune.DynamicPruner(40, 4, epochs=3, keep_ratio=0.5, device="cpu")
    sampler = selection_sampler(pruner)
    assert isinstance(sampler, SelectionSampler)
    assert list(sampler) == pruner.global_indices.tolist() and len(sampler) == 40
    labels = torch.arange(40) % 4
    pruner.step(torch.randn(40, 4), labels, torch.arange(40))
    pruner.next_epoch()
    assert list(sampler) == pruner.global_indices.tolist() and len(sampler) == pruner.history[1]["kept"] < 40


def test_pruner_on_accelerates_cpu_device_takes_cpu_tensors():
    """Accelerate names the CPU "cpu:0" on several processes; CPU tensors report plain "cpu"."""
    pruner = fastprune.DynamicPruner(8, 2, epochs=2, device=torch.device("cpu", 0))
    assert pruner.device == torch.device("cpu")
    assert torch.isfinite(pruner.step(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.arange(4)))


def test_selection_sampler_needs_a_pruner():
    with pytest.raises(ValueError, match="pruner must be a fastprune.DynamicPruner, got list"):
        selection_sampler([1, 2, 3])


def test_each_sample_is_trained_once_on_two_processes(tmp_path):
    """Accelerate deals out the selection's batches; the pruner's own shard would be dealt out again."""
    proc = subprocess.run(TORCHRUN + [str(ROOT / "tests" / "accelerate_programs.py"), str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["processes"] == 2 and r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    for epoch in range(A.EPOCHS):
        runs = [r["ours"][epoch] for r in ranks]
        selection = runs[0]["selection"]
        assert runs[1]["selection"] == selection, "every process serves the same selection"
        trained = [i for run in runs for batch in run["batches"] for i in batch]
        assert set(trained) == set(selection), f"epoch {epoch}: every selected sample, nothing else"
        extra = list(trained)
        for i in selection:
            extra.remove(i)
        assert len(extra) < 2 * A.BATCH and set(extra) <= set(selection[:2 * A.BATCH]), \
            "repeats only to complete the last round, from the selection's start"
        assert all(len(run["batches"]) == run["steps_expected"] for run in runs), "pruner.steps_per_epoch holds"
        shard = [i for r in ranks for batch in r["shard"][epoch]["batches"] for i in batch]
        assert len(set(shard)) < len(ranks[0]["shard"][epoch]["selection"]), \
            f"epoch {epoch}: with pruner.sampler() Accelerate shards the shards and skips samples"
    assert "the pruner spans 1 process(es) but 2 are training" in ranks[0]["refused"]


@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_example_runs(tmp_path, processes):
    """The example as a user runs it; on 2 processes as ``accelerate launch --cpu`` would (torchrun's setup and
    ACCELERATE_USE_CPU, without which Accelerate runs each CPU process on its own).  SqueezeNet has no batch norm,
    so a pruned epoch's last batch may hold a single image."""
    from imagegen import make_tree

    n = len(make_tree(str(tmp_path / "data"), per_class=(6, 5, 5)))
    launcher = [sys.executable] if processes == 1 else TORCHRUN
    proc = subprocess.run(launcher + [str(ROOT / "examples" / "accelerate_loop.py"), str(tmp_path / "data"),
                                      "--epochs", "3", "--batch-size", "4", "--image-size", "48",
                                      "--arch", "squeezenet1_1", "--workers", "0"],
                          env={**ENV, "ACCELERATE_USE_CPU": "true"}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1", "epoch 2"], "the main process prints"
    assert all(f"on {processes} process(es)" in line for line in lines)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["pruner"]
    kept = [h["kept"] for h in saved["history"]]
    assert kept[0] == n and kept[1] < n
    visits = saved["visits"]
    assert bool((visits >= 1).all()), "epoch 0 trained everything"
    assert visits.sum() >= sum(kept[:3]), "every selected sample trained (none skipped by a second sharding)"
    assert float(lines[-1].rsplit("lr ", 1)[1]) < 1e-4, "the learning rate schedule ran to its end"
