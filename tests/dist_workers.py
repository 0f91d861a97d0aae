"""Per-rank programs for the torch.distributed tests (gloo, CPU), and their launcher."""

from __future__ import annotations

import os

import torch

from fastprune.distributed import run_local

N, C, D = 53, 7, 16


def device() -> str:
    """Where the programs run: the CUDA suite sets FASTPRUNE_TEST_DEVICE=cuda (inherited by the ranks)."""
    return os.environ.get("FASTPRUNE_TEST_DEVICE", "cpu")


def launch(target, world: int, *args, timeout: float = 240.0, collective_timeout: float = 60.0,
           backend: str = "gloo"):
    """``fastprune.distributed.run_local`` with one thread per rank; a rank that raised gives a ``RankError``.

    Ranks still running after ``timeout`` seconds are killed and the test fails: nothing may hang.
    """
    return run_local(target, world, *args, backend=backend, timeout=timeout, collective_timeout=collective_timeout,
                     threads=1)


# ----------------------------------------------------------------- pruners and data

def embeddings():
    g = torch.Generator().manual_seed(5)
    image = torch.randn(N, D, generator=g)
    text = torch.randn(C, D, generator=g)
    return image, text


def labels():
    return torch.arange(N) % C


def logits_for(indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """Each sample's logits depend only on (sample, epoch): any rank produces the same loss for it."""
    rows = []
    for i in indices.tolist():
        g = torch.Generator().manual_seed(1000 * i + epoch)
        rows.append(torch.randn(C, generator=g) * (1.0 + (i % 5)))
    return torch.stack(rows)


CLIP_MODES = ("table", "batch", "none")  # a fixed image table, per-batch image embeddings, no CLIP


def make_pruner(epochs=5, keep_ratio=0.6, clip="table", **kw):
    from fastprune import DynamicPruner

    dev = device()
    image, text = (t.to(dev) for t in embeddings())
    args = dict(epochs=epochs, keep_ratio=keep_ratio, warmup=1, anneal=0.2, noise_ratio=0.1,
                image_emb=image if clip == "table" else None, text_emb=None if clip == "none" else text,
                seed=3, device=dev)
    args.update(kw)
    return DynamicPruner(N, C, **args)


def train_epoch(pruner, order: torch.Tensor, batch: int = 4):
    """Steps over ``order``; a pruner with CLIP text but no image table gets each batch's image embeddings."""
    y_all, dev = labels(), pruner.device
    per_batch = pruner.image_emb is None and pruner.text_emb is not None
    image = embeddings()[0]
    for lo in range(0, order.numel(), batch):
        idx = order[lo:lo + batch]
        with torch.no_grad():
            pruner.step(logits_for(idx, pruner.epoch).to(dev), y_all[idx].to(dev), idx.to(dev),
                        image_emb=image[idx].to(dev) if per_batch else None)


def snapshot(pruner) -> dict:
    return {"global": pruner.global_indices.clone(), "shard": pruner.epoch_indices.clone(),
            "scores": pruner.scores.to("cpu", copy=True), "visits": pruner.visits.to("cpu", copy=True),
            "consistency": pruner.consistency.to("cpu", copy=True), "weights": pruner.weights.to("cpu", copy=True),
            "noisy": pruner.suspected_noisy(), "epoch": pruner.epoch,
            **{k: getattr(pruner, k).to("cpu", copy=True)
               for k in ("model_margin", "model_pred", "given_labels", "clip_margin", "clip_pred")}}


def _to_cpu(value):
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value.to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


def run_epochs(rank, world, epochs=5, state=None, stop_after=None, save=None, clip="table", relabel=False):
    """Train ``epochs`` (or until ``stop_after``) on this rank's shards; snapshot after each selection."""
    pruner = make_pruner(epochs=epochs, clip=clip, noise_relabel=relabel)
    if state is not None:
        pruner.load_state_dict(torch.load(state, weights_only=False))
    snaps = [snapshot(pruner)]
    while pruner.epoch < (stop_after if stop_after is not None else epochs):
        train_epoch(pruner, pruner.epoch_indices)
        pruner.next_epoch()
        snaps.append(snapshot(pruner))
    sd = _to_cpu(pruner.state_dict())
    if save is not None and rank == 0:
        torch.save(sd, save)
    return {"snaps": snaps, "state": sd, "history": pruner.history, "last_sync": pruner.last_sync,
            "world": pruner.world_size}


# ----------------------------------------------------------------- failures

def bad_label_in_step(rank, world):
    """Rank 1 raises in step (CPU checks synchronously); rank 0 must not wait forever at next_epoch."""
    pruner = make_pruner()
    idx = pruner.epoch_indices[:4]
    y = labels()[idx]
    if rank == 1:
        y[0] = C + 3
    with torch.no_grad():
        pruner.step(logits_for(idx, 0), y, idx)
    pruner.next_epoch()
    return "finished"


def device_recorded_error(rank, world):
    """A bad label found on the device of rank 1 (validate='none' on a GPU): every rank stops at next_epoch."""
    from fastprune.kernels import common as K

    pruner = make_pruner()
    train_epoch(pruner, pruner.epoch_indices[:8])
    if rank == 1:  # what the kernel records for a bad label when nothing polls the counters
        pruner._state.errors[K.ERR_LABEL_COUNT] += 1
        pruner._state.errors[K.ERR_LABEL_VALUE] = K.example_key(C + 3)
    pruner.next_epoch()
    return "finished"


def mismatched_settings(rank, world):
    make_pruner(keep_ratio=0.6 if rank == 0 else 0.5)
    return "finished"


def out_of_step(rank, world):
    pruner = make_pruner()
    if rank == 0:
        pruner.sync()
    else:
        pruner.next_epoch()
    return "finished"


def agreement(rank, world):
    """``Group.agree`` on values every rank shares, on one that differs by rank, and its maxima."""
    from fastprune.distributed import resolve

    group = resolve(None, torch.device(device()))
    return [group.agree([7, -3], [rank, 10 * rank], device()), group.agree([5, rank], [], device()),
            group.agree([], [rank + 1], device())]


# ----------------------------------------------------------------- mid-epoch resume

def consume_and_save(rank, world, consumed: int, save):
    """Train ``consumed`` samples of this rank's shard of epoch 1 through a loader cursor, sync, save."""
    from fastprune.data.cursor import EpochCursor

    pruner = make_pruner()
    train_epoch(pruner, pruner.epoch_indices)
    pruner.next_epoch()
    cursor = EpochCursor(N, pruner)
    _, order = cursor.begin()
    part = order[:consumed]
    train_epoch(pruner, part)
    cursor.position += part.numel()
    pruner.sync()
    sd = {"pruner": pruner.state_dict(), "cursor": cursor.state_dict()}
    if rank == 0:
        torch.save(sd, save)
    return {"consumed": part, "global": pruner.global_indices.clone(), "scores": pruner.scores.clone(),
            "state": sd["pruner"]}


def resume_rest(rank, world, save):
    """Resume ``consume_and_save``'s checkpoint under this world size; return what is left to serve."""
    from fastprune.data.cursor import EpochCursor

    ck = torch.load(save, weights_only=False)
    pruner = make_pruner()
    pruner.load_state_dict(ck["pruner"])
    cursor = EpochCursor(N, pruner)
    cursor.load_state_dict(ck["cursor"])
    _, order = cursor.begin()
    return {"rest": order[cursor.position:].clone(), "global": pruner.global_indices.clone()}


def sync_bytes_without_embeddings(rank, world):
    """Without CLIP consistency the merge carries scores, the margin sum, visits and one word of classes
    (prediction, label)."""
    pruner = make_pruner(clip="none", noise_ratio=0.0)
    train_epoch(pruner, pruner.epoch_indices[:8])
    return pruner.sync()


def sleep_long(rank, world):
    import time

    time.sleep(60)


def dali_epoch_indices(rank, world, root):
    """The indices a rank's DaliLoader yields in epoch 0 and, after next_epoch(), epoch 1."""
    from fastprune import DynamicPruner
    from fastprune.data import DaliLoader, ImageFolderIndex

    index = ImageFolderIndex(root, cache_dir=False)
    pruner = DynamicPruner(len(index), index.num_classes, epochs=3, keep_ratio=0.5, warmup=1, device="cpu")
    loader = DaliLoader(index, pruner, batch_size=4, device="cpu", num_threads=1, image_size=32)
    seen = []
    for epoch in range(2):
        got = []
        for images, labels, idx in loader:
            with torch.no_grad():
                pruner.step(torch.randn(idx.numel(), index.num_classes), labels, idx)
            got.append(idx)
        seen.append({"yielded": torch.cat(got), "shard": pruner.epoch_indices.clone(),
                     "global": pruner.global_indices.clone()})
        pruner.next_epoch()
    return seen


def skip_epoch(rank, world, root, kind):
    """One epoch of a rank's loader (``kind``: dali or torch) with on_error="skip": the indices it yields and
    its shard."""
    import warnings

    from fastprune import DynamicPruner
    from fastprune.data import DaliLoader, ImageFolderIndex, TorchLoader

    index = ImageFolderIndex(root, cache_dir=False)
    pruner = DynamicPruner(len(index), index.num_classes, epochs=3, keep_ratio=0.5, warmup=1, device="cpu")
    if kind == "dali":
        loader = DaliLoader(index, pruner, batch_size=4, device="cpu", num_threads=1, image_size=32, on_error="skip")
    else:
        loader = TorchLoader(index, pruner, batch_size=4, num_workers=0, image_size=32, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = [idx for _, _, idx in loader]
    return {"yielded": torch.cat(batches), "batches": len(batches), "shard": pruner.epoch_indices.clone(),
            "skipped": [i for i, _, _ in loader.skipped], "position": loader.state_dict()["position"]}


def train_skipping(rank, world, data, out, kind):
    """`fastprune train` with the ``kind`` loader (dali or torch) and skip_bad_files on every rank."""
    import warnings

    import fastprune.train as T

    cfg = train_config(data, out)
    cfg.loader, cfg.skip_bad_files, cfg.checkpoint_every = kind, True, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.train(cfg, progress=False, log=lambda *_: None)


class Interrupted(Exception):
    pass


def train_cut_mid_epoch(rank, world, data, out, cut_step):
    """`fastprune train` on 2 ranks, checkpointing every step; rank 0 stops right after the checkpoint at
    ``cut_step`` (the other rank's next collective then fails)."""
    import fastprune.train as T

    real_save = T._atomic_save

    def save_then_stop(obj, path):
        real_save(obj, path)
        if obj["step"] == cut_step:
            raise Interrupted(f"stopped after the checkpoint at step {cut_step}")

    T._atomic_save = save_then_stop
    T.train(train_config(data, out), progress=False, log=lambda *_: None)


def train_config(data, out, resume=False):
    import fastprune.train as T

    return T.TrainConfig(data=data, out=out, arch="smallcnn", epochs=2, batch_size=4, image_size=16, workers=0,
                         loader="torch", device="cpu", checkpoint_every=1, keep_ratio=0.5, warmup=1, anneal=0.0,
                         resume=resume)


# ----------------------------------------------------------------- relabels

RN = 140  # 20 samples a class: enough for the per-class mixtures


def relabel_data():
    """Labels, the samples whose label is wrong (every tenth), their true class, image and text embeddings:
    a wrong-labelled sample's image embedding lies near its true class's text."""
    g = torch.Generator().manual_seed(7)
    y = torch.arange(RN) % C
    wrong = torch.arange(RN) % 10 == 3
    true = torch.where(wrong, (y + 1) % C, y)
    text = torch.randn(C, D, generator=g)
    image = text[true] + 0.3 * torch.randn(RN, D, generator=g)
    return y, wrong, true, image, text


def relabel_epochs(rank, world, local=False, epochs=6):
    """Per-batch embeddings and logits that favour each sample's true class: the noise decisions relabel."""
    from fastprune import DynamicPruner

    dev = device()
    y, _, true, image, text = relabel_data()
    pruner = DynamicPruner(RN, C, epochs=epochs, keep_ratio=0.6, warmup=1, anneal=0.2, noise_ratio=0.2,
                           noise_relabel=True, noise_start=2, text_emb=text.to(dev), seed=3, device=dev,
                           process_group=False if local else None)
    snaps = [snapshot(pruner)]
    while pruner.epoch < epochs:
        order = pruner.epoch_indices
        for lo in range(0, order.numel(), 4):
            idx = order[lo:lo + 4]
            rows = []
            for i in idx.tolist():
                g = torch.Generator().manual_seed(1000 * i + pruner.epoch)
                z = 0.5 * torch.randn(C, generator=g)
                z[true[i]] += 4.0
                rows.append(z)
            with torch.no_grad():
                pruner.step(torch.stack(rows).to(dev), y[idx].to(dev), idx.to(dev), image_emb=image[idx].to(dev))
        pruner.next_epoch()
        snaps.append(snapshot(pruner))
    return {"snaps": snaps, "history": pruner.history, "relabeled": pruner.relabeled.cpu(),
            "margin_count": pruner._state.margin_count.cpu()}
