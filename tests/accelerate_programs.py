"""Run under torchrun: Accelerate's own sharding of a loader over the pruner's selection (2 gloo processes).

Each process writes, per epoch, the samples it trained, and what the same loop trains when the loader draws
from ``pruner.sampler()`` instead (this process's shard, which Accelerate would shard again)."""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import fastprune
from fastprune.data import IndexedDataset
from fastprune.integrations.accelerate import selection_sampler

N, C, BATCH, EPOCHS = 53, 5, 4, 3


def epochs_trained(accelerator, pruner, sampler) -> list:
    """Train EPOCHS epochs of fixed per-sample logits; the sample indices of every batch, per epoch."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(N, C, generator=g) * 3, torch.arange(N) % C)
    loader = accelerator.prepare(DataLoader(IndexedDataset(data), batch_size=BATCH, sampler=sampler))
    out = []
    for _ in range(EPOCHS):
        batches = []
        for logits, y, idx in loader:
            pruner.step(logits, y, idx)
            batches.append(idx.tolist())
        out.append({"batches": batches, "selection": pruner.global_indices.tolist(),
                    "steps_expected": pruner.steps_per_epoch(BATCH)})
        pruner.next_epoch()
    return out


def main(root: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    options = dict(epochs=EPOCHS, keep_ratio=0.5, warmup=1, anneal=0.0, seed=1, device=accelerator.device)
    pruner = fastprune.DynamicPruner(N, C, **options)
    ours = epochs_trained(accelerator, pruner, selection_sampler(pruner))
    own = fastprune.DynamicPruner(N, C, **options)
    shard = epochs_trained(accelerator, own, own.sampler())
    local = fastprune.DynamicPruner(N, C, process_group=False, **options)
    try:
        selection_sampler(local)
        refused = None
    except ValueError as e:
        refused = str(e)
    with open(os.path.join(root, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump({"ours": ours, "shard": shard, "processes": accelerator.num_processes, "refused": refused,
                   "distributed_type": str(accelerator.distributed_type)}, f)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
