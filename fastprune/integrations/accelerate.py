"""Hugging Face Accelerate: a sampler over the pruner's whole selection, for loaders that Accelerate shards.

    accelerator = Accelerator()
    pruner = fastprune.DynamicPruner(len(ds), num_classes, epochs, device=accelerator.device)   # after Accelerator()
    loader = DataLoader(IndexedDataset(ds), batch_size=64, sampler=selection_sampler(pruner))
    model, opt, loader = accelerator.prepare(model, opt, loader)
    for epoch in range(epochs):
        for x, y, idx in loader:
            loss = pruner.step(model(x), y, idx)          # instead of F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            ...
        pruner.next_epoch()                               # collective: every process calls it

Why not ``pruner.sampler()``: ``accelerator.prepare(loader)`` shards every map-style loader across processes
itself, whatever its sampler (it deals the loader's batches out in turn, ``BatchSamplerShard``).
``pruner.sampler()`` already yields only this process's shard of the selection, so Accelerate would deal out the
batches of each shard again and every process would train one batch in K of its shard: most of the selection
would never be trained.  ``selection_sampler`` yields the whole selection, the same on every process, and
Accelerate's own split gives each sample to one process (its ``even_batches`` completes the last round with the
selection's first samples, as the pruner's own shard rule does).  Each process then runs
``pruner.steps_per_epoch(batch_size)`` steps, as with ``pruner.sampler()``.  A
``fastprune.schedule.ProgressScheduler`` may go through ``accelerator.prepare`` or not: it reads the run's progress
from the pruner, so the prepared scheduler's one step per process changes nothing.
"""

from __future__ import annotations

from typing import Iterator

import torch

try:
    import accelerate  # noqa: F401 - the adapter is for Accelerate; say so early when it is missing
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastprune.integrations.accelerate needs Accelerate: pip install 'fastprune[accelerate]'") from e

from ..pruner import DynamicPruner


class SelectionSampler(torch.utils.data.Sampler):
    """The pruner's whole current selection (every process's part), in order; follows ``next_epoch()``."""

    def __init__(self, pruner: DynamicPruner):
        self.pruner = pruner

    def __iter__(self) -> Iterator[int]:
        return iter(self.pruner.global_indices.tolist())

    def __len__(self) -> int:
        return int(self.pruner.global_indices.numel())


def selection_sampler(pruner: DynamicPruner) -> SelectionSampler:
    """A sampler for a DataLoader that ``accelerator.prepare`` will shard (see the module's docstring).

    Raises ``ValueError`` when the pruner does not span the processes Accelerate runs (built before
    ``Accelerator()`` created the process group, or with ``process_group=False``): each process would then keep
    its own scores and make its own selection.
    """
    if not isinstance(pruner, DynamicPruner):
        raise ValueError(f"pruner must be a fastprune.DynamicPruner, got {type(pruner).__name__}")
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if pruner.world_size != world:
        raise ValueError(f"the pruner spans {pruner.world_size} process(es) but {world} are training: build it after "
                         "Accelerator() (which joins the processes), on every process, without process_group=False")
    return SelectionSampler(pruner)
