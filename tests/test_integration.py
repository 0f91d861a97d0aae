"""The README's three-line integration with a plain DataLoader."""

import pytest
import torch

import fastprune


def test_three_line_integration_with_dataloader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 16, generator=g)
    y = (x[:, :6].argmax(1))
    ds = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Linear(16, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    pruner = fastprune.DynamicPruner(num_samples=len(ds), num_classes=6, epochs=4, keep_ratio=0.5,
                                     device="cpu")
    loader = torch.utils.data.DataLoader(fastprune.data.IndexedDataset(ds), batch_size=100,
                                         sampler=pruner.sampler())
    seen_per_epoch = []
    for _ in range(4):
        seen = []
        for xb, yb, idx in loader:
            loss = pruner.step(model(xb), yb, idx)
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
    assert pruner.visits_saved == pytest.approx(1 - sum(seen_per_epoch) / 4800)


def test_indexed_dataset_rejects_bad_items():
    with pytest.raises(ValueError, match="dataset must be a map-style dataset"):
        fastprune.data.IndexedDataset(iter([]))
    ds = fastprune.data.IndexedDataset([(1, 2, 3)])
    with pytest.raises(ValueError, match=r"dataset item 0 must be an \(x, y\) pair, got tuple of length 3"):
        ds[0]
