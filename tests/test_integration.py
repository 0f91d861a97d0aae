"""The README's three-line integration with a plain DataLoader, and the demo command."""

import os
import subprocess
import sys

import pytest
import torch

import fastprune
from fastprune.synthetic import make_task, train

USER_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it


def test_three_line_integration_with_dataloader():
    task = make_task(num_samples=1200, num_classes=6, seed=1)
    ds = torch.utils.data.TensorDataset(task.x, task.y)
    model = torch.nn.Linear(task.x.shape[1], 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    pruner = fastprune.DynamicPruner(num_samples=len(ds), num_classes=6, epochs=4, keep_ratio=0.5,
                                     device="cpu")
    loader = torch.utils.data.DataLoader(fastprune.data.IndexedDataset(ds), batch_size=100,
                                         sampler=pruner.sampler())
    seen_per_epoch = []
    for _ in range(4):
        seen = []
        for x, y, idx in loader:
            loss = pruner.step(model(x), y, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen.append(idx)
        seen = torch.cat(seen)
        assert torch.equal(seen, pruner.epoch_indices)  # exactly the selection, in order
        seen_per_epoch.append(seen.numel())
        pruner.next_epoch()
    assert seen_per_epoch[0] == 1200 and seen_per_epoch[1] < 700
    assert (pruner.visits > 0).all()


def test_indexed_dataset_rejects_bad_items():
    with pytest.raises(ValueError, match="dataset must be a map-style dataset"):
        fastprune.data.IndexedDataset(iter([]))
    ds = fastprune.data.IndexedDataset([(1, 2, 3)])
    with pytest.raises(ValueError, match=r"dataset item 0 must be an \(x, y\) pair, got tuple of length 3"):
        ds[0]


def test_pruned_training_learns_and_filters_noise(reference_path):
    task = make_task(num_samples=3000, num_classes=8, seed=2)
    result = train(task, epochs=6, batch_size=200, log=lambda *_: None)
    assert result["accuracy"] > 0.8
    assert result["visits_saved"] > 0.15
    assert result["noise_recall"] > 0.8


def test_demo_command_runs():
    proc = subprocess.run([sys.executable, "-m", "fastprune", "demo", "--epochs", "3", "--samples", "2000",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, env=USER_ENV)
    assert proc.returncode == 0, proc.stderr
    assert "| fastprune infobatch 0.7 + noise filter |" in proc.stdout


def test_cli_reports_bad_arguments_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "fastprune", "demo", "--epochs", "0"], capture_output=True,
                          text=True, timeout=120, env=USER_ENV)
    assert proc.returncode == 2
    assert "error: epochs must be an integer >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr
