"""DaliLoader (CPU pipeline) and the DataLoader fallback: exactly the selection, nothing else read."""

import contextlib
import os
import shutil
import sys

import fileopens
import pytest
import torch
from imagegen import corrupt

import fastprune as fp
from fastprune.data import DaliLoader, ImageFileDataset, IndexedDataset

dali = pytest.importorskip("nvidia.dali", reason="DALI is not installed")

SIZE = 32


def make_pruner(index, **kw):
    args = dict(epochs=5, keep_ratio=0.5, warmup=1, anneal=0.0, device="cpu", seed=1)
    args.update(kw)
    return fp.DynamicPruner(len(index), index.num_classes, **args)


@contextlib.contextmanager
def only_selected_present(index, selected, tmp_path):
    """Move every file outside ``selected`` away: reading one of them would fail."""
    away = tmp_path / "away"
    away.mkdir(exist_ok=True)
    moved = []
    keep = set(selected)
    for i, f in enumerate(index.files):
        if i not in keep:
            dst = away / f"{i}.bin"
            shutil.move(f, dst)
            moved.append((dst, f))
    try:
        yield len(moved)
    finally:
        for dst, f in moved:
            shutil.move(dst, f)


def train_epoch(pruner, loader, num_classes):
    got = []
    for x, y, idx in loader:
        got.append((x, y, idx))
        pruner.step(torch.randn(idx.numel(), num_classes, requires_grad=True), y, idx).backward()
    return got


def check_batches(batches, index, order, batch_size, dtype=torch.float32):
    idx = torch.cat([b[2] for b in batches])
    assert idx.tolist() == order.tolist()  # exactly the selection, in order, once each
    assert [b[2].numel() for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    for x, y, i in batches:
        assert x.shape == (i.numel(), 3, SIZE, SIZE) and x.dtype == dtype
        assert torch.equal(y, index.labels[i]) and y.dtype == torch.int64 and i.dtype == torch.int64
        assert -2.2 < x.float().min() and x.float().max() < 2.7 and x.float().std() > 0.1


def test_dali_yields_exactly_the_selection_and_reads_nothing_else(index, tmp_path):
    pruner = make_pruner(index)
    loader = DaliLoader(index, pruner, batch_size=4, image_size=SIZE, num_threads=2)
    sizes = []
    for _ in range(4):
        order = pruner.epoch_indices.clone()
        with only_selected_present(index, order.tolist(), tmp_path) as moved:
            batches = train_epoch(pruner, loader, index.num_classes)
        check_batches(batches, index, order, 4)
        assert len(loader) == len(batches)
        sizes.append((order.numel(), moved))
        pruner.next_epoch()
    assert sizes[0] == (13, 0) and all(n < 13 and m == 13 - n for n, m in sizes[1:])


@pytest.mark.skipif(not fileopens.available(), reason="needs Linux inotify")
@pytest.mark.parametrize("which", ["dali", "fallback"])
def test_files_opened_are_exactly_the_selection(index, which):
    """inotify sees every open, DALI's C++ reader threads included: the opened set is the selection."""
    pruner = make_pruner(index, keep_ratio=0.4)
    if which == "dali":
        loader = DaliLoader(index, pruner, batch_size=4, image_size=SIZE, num_threads=2)
    else:
        loader = torch.utils.data.DataLoader(IndexedDataset(ImageFileDataset(index, image_size=SIZE)),
                                             batch_size=4, sampler=pruner.sampler(), num_workers=0)
    folders = sorted({os.path.dirname(f) for f in index.files})
    for _ in range(3):
        counter = fileopens.OpenCounter(folders)
        try:
            order = pruner.epoch_indices.clone()
            train_epoch(pruner, loader, index.num_classes)
            opened = set(counter.poll())
        finally:
            counter.close()
        assert opened == {index.files[i] for i in order.tolist()}
        pruner.next_epoch()


def test_eval_mode_without_pruner(index):
    loader = DaliLoader(index, batch_size=5, train=False, image_size=SIZE, num_threads=2, device="cpu")
    first = list(loader)
    second = list(loader)
    assert torch.cat([b[2] for b in first]).tolist() == list(range(len(index)))
    for (a, _, _), (b, _, _) in zip(first, second, strict=True):
        assert torch.equal(a, b)  # no random augmentation in eval


def test_bf16_channels_last(index):
    pruner = make_pruner(index)
    loader = DaliLoader(index, pruner, batch_size=8, image_size=SIZE, dtype=torch.bfloat16, channels_last=True,
                        num_threads=2)
    batches = list(loader)
    check_batches(batches, index, pruner.epoch_indices, 8, dtype=torch.bfloat16)
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_resume_mid_epoch(index):
    pruner = make_pruner(index)
    loader = DaliLoader(index, pruner, batch_size=3, image_size=SIZE, num_threads=2)
    it = iter(loader)
    head = [next(it)[2] for _ in range(2)]
    sd_loader, sd_pruner = loader.state_dict(), pruner.state_dict()
    del it
    fresh_pruner = make_pruner(index)
    fresh_pruner.load_state_dict(sd_pruner)
    fresh = DaliLoader(index, fresh_pruner, batch_size=3, image_size=SIZE, num_threads=2)
    fresh.load_state_dict(sd_loader)
    tail = [b[2] for b in fresh]
    assert torch.cat(head + tail).tolist() == pruner.epoch_indices.tolist()
    rest = [b[2] for b in loader]  # the interrupted loader itself also continues
    assert torch.cat(head + rest).tolist() == pruner.epoch_indices.tolist()
    assert len(list(loader)) == len(loader)  # a finished epoch iterated again starts over


@pytest.mark.parametrize("how,exc", [("truncated", ValueError), ("garbage", ValueError),
                                     ("deleted", FileNotFoundError)])
def test_bad_file_raises_naming_it(index, how, exc):
    jpegs = [i for i, f in enumerate(index.files) if f.lower().endswith((".jpg", ".jpeg"))]
    victim = index.files[jpegs[3]]
    corrupt(victim, how)
    loader = DaliLoader(index, make_pruner(index), batch_size=4, image_size=SIZE, num_threads=2)
    with pytest.raises(exc, match=rf"{victim}: .*\[sample {jpegs[3]}\]"):
        list(loader)


def test_skip_mode_logs_and_reports(index, caplog):
    jpegs = [i for i, f in enumerate(index.files) if f.lower().endswith((".jpg", ".jpeg"))]
    bad = {jpegs[1]: "garbage", jpegs[4]: "deleted"}
    for i, how in bad.items():
        corrupt(index.files[i], how)
    pruner = make_pruner(index)
    loader = DaliLoader(index, pruner, batch_size=4, image_size=SIZE, num_threads=2, on_error="skip")
    for _ in range(2):
        order = pruner.epoch_indices
        with pytest.warns(RuntimeWarning, match=r"DaliLoader skipped \d unreadable files"):
            batches = train_epoch(pruner, loader, index.num_classes)
        expected = [i for i in order.tolist() if i not in bad]
        assert torch.cat([b[2] for b in batches]).tolist() == expected
        assert sorted(i for i, _, _ in loader.skipped) == sorted(i for i in bad if i in order.tolist())
        pruner.next_epoch()
    assert any("skipping" in r.getMessage() and index.files[jpegs[1]] in r.getMessage() for r in caplog.records)


def test_without_dali_the_error_says_what_to_do(index, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"pip install 'fastprune\[dali\]'.*IndexedDataset"):
        DaliLoader(index)


def test_bad_arguments(index):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        DaliLoader(index, batch_size=0)
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16"):
        DaliLoader(index, dtype=torch.int8)
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip', got 'ignore'"):
        DaliLoader(index, on_error="ignore")
    with pytest.raises(ValueError, match="shard_id=2 must be smaller than num_shards=2"):
        DaliLoader(index, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="num_shards must be an integer >= 1, got 0"):
        DaliLoader(index, shard_id=0, num_shards=0)
    pruner = fp.DynamicPruner(len(index), index.num_classes, epochs=2, device="cpu")
    with pytest.raises(ValueError, match="disagree with the pruner's rank 0 of 1"):
        DaliLoader(index, pruner, shard_id=1, num_shards=2)
    with pytest.raises(ValueError, match=r"pruner has num_samples=99 but the index has 13 samples"):
        DaliLoader(index, fp.DynamicPruner(99, 3, epochs=2, device="cpu"))
    with pytest.raises(ValueError, match="index must be a fastprune.data.ImageFolderIndex or a dataset path"):
        DaliLoader([index.files[0]])
    with pytest.raises(FileNotFoundError, match="dataset root '/some/folder' does not exist"):
        DaliLoader("/some/folder")


def test_fallback_dataloader_exactly_once(index, tmp_path):
    pruner = make_pruner(index)
    ds = IndexedDataset(ImageFileDataset(index, train=True, image_size=SIZE))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=pruner.sampler(), num_workers=2)
    for _ in range(3):
        order = pruner.epoch_indices.clone()
        with only_selected_present(index, order.tolist(), tmp_path):
            batches = train_epoch(pruner, loader, index.num_classes)
        check_batches(batches, index, order, 4)
        pruner.next_epoch()


def test_fallback_bad_file_names_it(index):
    corrupt(index.files[2], "garbage")
    ds = ImageFileDataset(index, image_size=SIZE)
    with pytest.raises(ValueError, match=rf"{index.files[2]}: corrupt or truncated image"):
        ds[2]
