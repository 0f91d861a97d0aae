"""The pruner under torch.distributed: gloo process groups on the CPU, 2 and 3 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dist_workers as W
import pytest
import torch

from fastprune import distributed as D
from fastprune.data.cursor import EpochCursor

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

STATE = ("scores", "visits", "consistency", "weights", "model_margin", "model_pred", "given_labels", "clip_margin",
         "clip_pred")


def _flat(sd: dict, prefix: str = "") -> dict:
    """A state_dict's leaves by their path (nested dicts such as the evidence flattened)."""
    out = {}
    for key, value in sd.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _same(a, b) -> bool:
    """Equal bit for bit, NaN (unknown) in the same places."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all()
                                                               if a.is_floating_point() else torch.equal(a, b))


def _ok(results):
    for r, res in enumerate(results):
        assert not isinstance(res, D.RankError), f"rank {r} failed: {res.message}"
    return results


def _single(epochs=5, state=None, stop_after=None, clip="table", relabel=False):
    """The same training in one process, without a process group."""
    pruner = W.make_pruner(epochs=epochs, process_group=False, clip=clip, noise_relabel=relabel)
    if state is not None:
        pruner.load_state_dict(state)
    snaps = [W.snapshot(pruner)]
    while pruner.epoch < (stop_after if stop_after is not None else epochs):
        W.train_epoch(pruner, pruner.epoch_indices)
        pruner.next_epoch()
        snaps.append(W.snapshot(pruner))
    return snaps


def _assert_same_snapshots(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa["epoch"] == sb["epoch"]
        assert torch.equal(sa["global"], sb["global"]), f"epoch {sa['epoch']}: selections differ"
        for key in STATE:
            assert _same(sa[key], sb[key]), f"epoch {sa['epoch']}: {key} differ"
        assert torch.equal(sa["noisy"], sb["noisy"])


# ------------------------------------------------------------------ pure logic

@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (10, 3), (11, 4), (2, 3), (1, 4), (0, 2)])
def test_shard_rule_pads_from_the_start_and_covers(n, world):
    order = torch.randperm(max(n, 1))[:n]
    shards = [D.shard(order, r, world) for r in range(world)]
    size = -(-n // world) if n else 0
    assert all(s.numel() == size for s in shards), "every rank gets ceil(n / world) samples"
    union = torch.cat(shards)
    assert set(union.tolist()) == set(order.tolist()), "the shards cover the selection"
    padded = torch.cat([order, order.repeat(world)])[:size * world]  # the pad repeats the order's start
    for r in range(world):
        assert torch.equal(shards[r], padded[r::world])
    if n % world == 0:
        assert union.numel() == len(set(union.tolist())), "no padding: the shards are disjoint"


def test_float_keys_order_like_the_floats_and_invert_bit_for_bit():
    x = torch.tensor([float("-inf"), -3.0e38, -2.0, -1.0, -1e-40, -0.0, 0.0, 1e-40, 1.0, 2.0, 3.0e38, float("inf")])
    keys = D.float_key(x)
    assert (keys[1:] > keys[:-1]).all()
    assert torch.equal(D.key_float(keys).view(torch.int32), x.view(torch.int32))
    assert (keys > -(1 << 31)).all(), "every float beats what an untouching rank sends"
    nan = torch.tensor([float("nan")])
    assert torch.isnan(D.key_float(D.float_key(nan))).all()


class _ThreadGroup:
    """``world`` threads in one process, each with its own buffers: ``all_max`` as a process group does it."""

    def __init__(self, world):
        import threading

        self.world_size, self.bufs = world, [None] * world
        self.barrier = threading.Barrier(world)

    def member(self, rank):
        group = self

        class Member:
            def all_max(self, values):
                group.bufs[rank] = values
                group.barrier.wait()
                if rank == 0:
                    top = torch.stack(group.bufs).amax(0)
                    for b in group.bufs:
                        b.copy_(top)
                group.barrier.wait()
                return values

        return Member()


@pytest.mark.parametrize("num_classes,class_cols,words", [(7, 3, 1), (1000, 3, 1), (1024, 3, 2), (70000, 2, 2)])
def test_merge_takes_the_touching_ranks_values(num_classes, class_cols, words):
    """Floats and visits from the rank that touched a sample (the larger where both did), counters advanced
    by the merged visits' increase, class columns through their packed words; untouched samples unchanged."""
    import threading

    n, group = 9, _ThreadGroup(2)
    g = torch.Generator().manual_seed(0)
    base_f = torch.randn(2, n, generator=g)
    base_v = torch.randint(0, 5, (n,), generator=g, dtype=torch.int32)
    base_c = torch.randint(-1, num_classes, (class_cols, n), generator=g, dtype=torch.int32)
    offset = torch.randint(0, 3, (n,), generator=g, dtype=torch.int32)
    touched = [torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool),
               torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)]
    steps = [torch.tensor([1, 2, 0, 0, 1, 0, 0, 0, 3]), torch.tensor([0, 0, 1, 1, 2, 0, 0, 0, 0])]
    states, sent = [], [0, 0]
    for r in range(2):
        f = base_f.clone()
        f[:, touched[r]] = torch.randn(2, int(touched[r].sum()), generator=g) * 1e3
        v = (base_v + steps[r]).to(torch.int32)
        cnt = (v - offset).to(torch.int32)
        cls = base_c.clone()
        cls[:, touched[r]] = torch.randint(0, num_classes, (class_cols, int(touched[r].sum())), generator=g,
                                           dtype=torch.int32)
        states.append((f, v, cnt, cls))
    before = [tuple(t.clone() for t in st) for st in states]

    def rank(r):
        f, v, cnt, cls = states[r]
        sent[r] = D.merge(list(f), v, [cnt], list(cls), num_classes, touched[r], group.member(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sent == [4 * (2 + 1 + words) * n] * 2 == [4 * D.merge_words(2, num_classes, class_cols) * n] * 2
    for r in range(2):
        for other in range(2):  # every rank ends with the same state
            for a, b in zip(states[r], states[other]):
                assert torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                                   b.view(torch.int32) if b.is_floating_point() else b)
    f, v, cnt, cls = states[0]
    for i in range(n):
        by = [r for r in range(2) if touched[r][i]]
        if not by:
            assert torch.equal(f[:, i], base_f[:, i]) and v[i] == base_v[i] and torch.equal(cls[:, i], base_c[:, i])
            assert cnt[i] == base_v[i] - offset[i]
            continue
        want_v = max(int(before[r][1][i]) for r in by)
        assert v[i] == want_v and cnt[i] == want_v - offset[i]
        for k in range(2):
            assert f[k, i] == max(float(before[r][0][k, i]) for r in by)
        if len(by) == 1:
            assert torch.equal(cls[:, i], before[by[0]][3][:, i])


class _StubPruner:
    def __init__(self, order, rank, world, epoch=1):
        self.global_indices, self.rank, self.world_size, self.epoch = order, rank, world, epoch

    def shard(self, start=0):
        return D.shard(self.global_indices[start:], self.rank, self.world_size)


@pytest.mark.parametrize("old,new", [(2, 1), (2, 3), (3, 2), (4, 4)])
def test_cursor_resumes_an_epoch_under_another_world_size(old, new):
    order = torch.randperm(41)
    position = 6
    consumed = torch.cat([_StubPruner(order, r, old).shard()[:position] for r in range(old)])
    sd = EpochCursor(41, _StubPruner(order, 0, old)).state_dict() | {"epoch": 1, "position": position}
    rest = []
    for r in range(new):
        cur = EpochCursor(41, _StubPruner(order, r, new))
        cur.load_state_dict(sd)
        _, o = cur.begin()
        rest.append(o[cur.position:])
    rest = torch.cat(rest)
    assert set(consumed.tolist()) | set(rest.tolist()) == set(order.tolist())
    if old != new:
        assert not set(consumed.tolist()) & set(rest.tolist()), "nothing is trained twice"
        assert torch.equal(consumed.sort().values, order[:old * position].sort().values)


def test_cursor_without_pruner_shards_for_evaluation():
    parts = [EpochCursor(10, None, r, 3).begin()[1] for r in range(3)]
    assert [p.tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def test_process_group_given_without_torch_distributed_is_an_error():
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        W.make_pruner(process_group=object())


# ------------------------------------------------------------------ 2 and 3 ranks

@pytest.mark.parametrize("world,clip", [(2, "table"), (3, "table"), (3, "batch"), (2, "none")])
def test_ranks_agree_and_equal_a_single_process_run(world, clip):
    results = _ok(W.launch(W.run_epochs, world, 5, None, None, None, clip))
    single = _single(clip=clip)
    for r, res in enumerate(results):
        assert res["world"] == world
        _assert_same_snapshots(res["snaps"], single)  # same global state as one process, on every rank
        assert res["history"] == results[0]["history"]
        sd, sd0 = res["state"], results[0]["state"]
        flat, flat0 = _flat(sd), _flat(sd0)
        assert flat.keys() == flat0.keys()
        for key, value in flat.items():
            if isinstance(value, torch.Tensor):
                assert _same(value, flat0[key]), f"state_dict()[{key!r}] differs on rank {r}"
            else:
                assert value == flat0[key], f"state_dict()[{key!r}] differs on rank {r}"
    for e in range(len(single)):
        shards = [res["snaps"][e]["shard"] for res in results]
        sel = single[e]["global"]
        assert len({s.numel() for s in shards}) == 1, "equal shard sizes"
        assert set(torch.cat(shards).tolist()) == set(sel.tolist()), "the shards cover the selection"
        if sel.numel() % world == 0:
            assert torch.cat(shards).numel() == sel.numel(), "disjoint shards"
    pruned = [h for h in results[0]["history"] if h["policy"] == "infobatch"]
    assert pruned and all(h["kept"] < W.N for h in pruned), "the run pruned"
    # bytes, one int32 word a sample each: scores, the margin sum, visits, one word of classes (prediction
    # and label; with per-batch embeddings CLIP's class too, 3 bits each for 7 classes); the consistency
    # with CLIP, CLIP's margin with per-batch embeddings; in an epoch that decides, rank 0's per-class
    # mixtures (6 float64 a class for each source of evidence); the header
    sync = results[0]["last_sync"]
    words = {"none": 4, "table": 5, "batch": 6}[clip]
    assert sync["header_bytes"] == 8 * (6 + world)
    assert sync["decision_bytes"] == 8 * 6 * W.C * (1 if clip == "none" else 2)
    assert sync["bytes"] == 4 * words * W.N + sync["decision_bytes"] + sync["header_bytes"]
    assert results[0]["history"][-1]["sync_bytes"] == sync["bytes"]


def test_relabels_merge_like_a_single_process_run():
    """Relabeled samples restart their evidence: the merged margin count follows the merged visits from the
    restart on every rank."""
    results = _ok(W.launch(W.relabel_epochs, 3))
    single = W.relabel_epochs(0, 1, True)
    _, wrong, true, _, _ = W.relabel_data()
    relabeled = single["relabeled"] >= 0
    assert relabeled.any() and (single["relabeled"][relabeled] == true[relabeled]).all()
    assert (single["margin_count"][relabeled] < single["snaps"][-1]["visits"][relabeled]).all(), "restarted"
    for res in results:
        _assert_same_snapshots(res["snaps"], single["snaps"])
        assert torch.equal(res["relabeled"], single["relabeled"])
        assert torch.equal(res["margin_count"], single["margin_count"])


def test_resume_with_other_world_sizes(tmp_path):
    single = _single()
    # 2 ranks for 2 epochs, then 1 process; and 1 process, then 3 ranks
    ck = tmp_path / "two.pt"
    first = _ok(W.launch(W.run_epochs, 2, 5, None, 2, str(ck)))[0]
    rest = _single(state=torch.load(ck, weights_only=False))
    _assert_same_snapshots(first["snaps"] + rest[1:], single)

    ck1 = tmp_path / "one.pt"
    part = _single(stop_after=2)
    pruner = W.make_pruner(process_group=False)
    W.train_epoch(pruner, pruner.epoch_indices)
    pruner.next_epoch()
    W.train_epoch(pruner, pruner.epoch_indices)
    pruner.next_epoch()
    torch.save(pruner.state_dict(), ck1)
    after = _ok(W.launch(W.run_epochs, 3, 5, str(ck1)))
    for res in after:
        _assert_same_snapshots(part + res["snaps"][1:], single)


def test_mid_epoch_sync_and_resume_under_other_world_sizes(tmp_path):
    ck = tmp_path / "mid.pt"
    saved = _ok(W.launch(W.consume_and_save, 2, 9, str(ck)))
    consumed = torch.cat([s["consumed"] for s in saved])
    for s in saved:  # after sync() the ranks' states are the same: both halves' updates are in
        assert torch.equal(s["scores"], saved[0]["scores"])
    touched = torch.zeros(W.N, dtype=torch.bool)
    touched[consumed] = True
    assert (saved[0]["state"]["visits"][touched] == 2).all()  # epoch 0 + this epoch's part
    for world in (1, 3):
        rest = _ok(W.launch(W.resume_rest, world, str(ck)))
        left = torch.cat([r["rest"] for r in rest])
        sel = rest[0]["global"]
        assert set(consumed.tolist()) | set(left.tolist()) == set(sel.tolist())
        assert not set(consumed.tolist()) & set(left.tolist())


def test_state_dict_mid_epoch_without_sync_warns():
    results = _ok(W.launch(_warn_without_sync, 2))
    assert all(results)


def _warn_without_sync(rank, world):
    import warnings

    pruner = W.make_pruner()
    W.train_epoch(pruner, pruner.epoch_indices[:4])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.state_dict()
    pruner.sync()
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        pruner.state_dict()
    return any("call pruner.sync() on every rank first" in str(w.message) for w in caught) and not after


def test_merge_without_embeddings_sends_sixteen_bytes_a_sample():
    for sent in _ok(W.launch(W.sync_bytes_without_embeddings, 2)):
        assert sent == 4 * 4 * W.N + 8 * (6 + 2)


# ------------------------------------------------------------------ failures

def test_bad_label_on_one_rank_does_not_hang_the_other():
    r0, r1 = W.launch(W.bad_label_in_step, 2, collective_timeout=20)
    assert isinstance(r1, D.RankError) and r1.kind == "ValueError"
    assert "labels: value 10 is outside [0, 7)" in r1.message
    assert isinstance(r0, D.RankError) and r0.kind == "RankFailure"
    assert "another rank has probably stopped" in r0.message


def test_device_recorded_error_stops_every_rank():
    r0, r1 = W.launch(W.device_recorded_error, 2)
    assert isinstance(r1, D.RankError) and r1.kind == "ValueError" and "labels: value 10 is outside" in r1.message
    assert isinstance(r0, D.RankError) and r0.kind == "RankFailure"
    assert "rank 1 reported bad labels or indices" in r0.message


def test_mismatched_settings_raise_on_every_rank():
    for res in W.launch(W.mismatched_settings, 2):
        assert isinstance(res, D.RankError) and "the pruner's configuration differs between ranks" in res.message


def test_dali_loader_serves_each_rank_its_shard(tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from imagegen import make_tree

    make_tree(str(tmp_path / "data"), per_class=(5, 4, 4))
    ranks = _ok(W.launch(W.dali_epoch_indices, 2, str(tmp_path / "data")))
    for epoch in range(2):
        sel = ranks[0][epoch]["global"]
        for r in ranks:
            assert torch.equal(r[epoch]["yielded"], r[epoch]["shard"]), "a rank yields exactly its shard, in order"
            assert torch.equal(r[epoch]["global"], sel)
        assert set(torch.cat([r[epoch]["yielded"] for r in ranks]).tolist()) == set(sel.tolist())
    assert ranks[0][1]["global"].numel() < ranks[0][0]["global"].numel()  # epoch 1 was pruned


def _rank1_victims(root, n_victims):
    """JPEGs in rank 1's epoch-0 shard (2 ranks; the selection is the same in one process)."""
    import fastprune as fp
    from fastprune.data import ImageFolderIndex

    index = ImageFolderIndex(root, cache_dir=False)
    sel = fp.DynamicPruner(len(index), index.num_classes, epochs=3, keep_ratio=0.5, warmup=1, device="cpu",
                           process_group=False).global_indices
    shard1 = sel[1::2].tolist()
    jpegs = [i for i in shard1 if index.files[i].lower().endswith((".jpg", ".jpeg"))]
    victims = jpegs[1:1 + n_victims]
    for i in victims:
        with open(index.files[i], "wb") as f:
            f.write(b"definitely not an image " * 20)
    return victims, index


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_skip_on_two_ranks_keeps_the_step_counts_equal(tmp_path, kind):
    """A rank that skips unreadable files fills their places from its shard: DDP sees the same number of
    batches on every rank, and the ranks' positions stay aligned."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from imagegen import make_tree

    root = str(tmp_path / "data")
    make_tree(root, per_class=(5, 4, 4))  # 13 samples: shards of 7, the last batch partial
    victims, _ = _rank1_victims(root, 2)
    assert len(victims) == 2
    r0, r1 = _ok(W.launch(W.skip_epoch, 2, root, kind))
    assert r0["batches"] == r1["batches"] == 2 and r0["position"] == r1["position"] == 7
    assert torch.equal(r0["yielded"], r0["shard"]) and r0["skipped"] == []
    assert sorted(r1["skipped"]) == sorted(victims)
    shard, got = r1["shard"].tolist(), r1["yielded"].tolist()
    assert len(got) == len(shard) and not set(victims) & set(got)
    usable = [i for i in shard if i not in victims]
    for pos, i in enumerate(shard):
        assert got[pos] == i if i not in victims else got[pos] in usable  # substitutes come from the shard


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_train_skip_bad_files_on_two_ranks(tmp_path, kind):
    """`fastprune train --skip-bad-files` on 2 ranks finishes, and the checkpoint lists every rank's bad files."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from imagegen import make_tree

    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    make_tree(data, per_class=(5, 4, 4))
    victims, index = _rank1_victims(data, 1)
    ranks = _ok(W.launch(W.train_skipping, 2, data, out, kind))
    assert ranks[0]["epochs"] == 2
    ck = torch.load(Path(out) / "checkpoint.pt", weights_only=False)
    assert sorted(ck["loader"]["bad"]) == victims  # found by rank 1, saved by rank 0
    assert ck["loader"]["bad"][victims[0]][0] == index.files[victims[0]]
    assert ck["pruner"]["visits"][victims].sum() == 0


def test_run_local_bad_arguments():
    with pytest.raises(ValueError, match="world_size must be an integer >= 1, got 0"):
        D.run_local(W.sleep_long, 0)
    with pytest.raises(ValueError, match="fn must be a module-level function, got str"):
        D.run_local("sleep_long", 2)


def test_run_local_kills_ranks_that_do_not_finish():
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not finish within 3 s"):
        D.run_local(W.sleep_long, 2, timeout=3)


def test_ranks_out_of_step_raise_on_every_rank():
    for res in W.launch(W.out_of_step, 2):
        assert isinstance(res, D.RankError) and "the ranks are out of step" in res.message


def test_agree_tells_shared_values_from_differing_ones_in_one_collective():
    for shared, differing, maxima_only in _ok(W.launch(W.agreement, 3)):
        assert shared == (True, [2, 20], 8 * 6)  # words: 7, -7, -3, 3, rank, 10 * rank
        assert differing.same is False and differing.maxima == [] and differing.bytes == 8 * 4
        assert maxima_only == (True, [3], 8)


# ------------------------------------------------------------------ fastprune train under torchrun

def test_train_cli_with_two_processes(tmp_path):
    from imagegen import make_tree

    data = tmp_path / "data"
    make_tree(str(data), per_class=(8, 8, 6))
    from fastprune.data import ImageFolderIndex

    n = len(ImageFolderIndex(str(data)))
    assert n % 2 == 1  # uneven shards: one padded sample
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    common = [str(data), "--val", str(data), "--arch", "smallcnn", "--image-size", "16", "--batch-size", "4",
              "--loader", "torch", "--workers", "0", "--device", "cpu", "--keep-ratio", "0.5", "--warmup", "1",
              "--anneal", "0", "--lr", "0.05", "--out", str(out), "--no-progress"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "fastprune"]
    run = subprocess.run(launcher + ["train", *common, "--epochs", "2"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes (cpu, gloo)" in run.stdout
    assert run.stdout.count("epoch 1:") == 1, "only rank 0 logs"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["world_size"] == 2 for r in log)
    assert log[0]["samples_trained"] == n and log[1]["samples_trained"] < n
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["pruner"]["visits"].sum() == sum(r["samples_trained"] for r in log)  # both ranks' visits merged
    # resume on one process for a third epoch
    run = subprocess.run([sys.executable, "-m", "fastprune", "train", *common, "--epochs", "3", "--resume"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and log[2]["world_size"] == 1
    assert Path(out / "summary.json").exists()


def test_train_cut_mid_epoch_on_two_ranks_resumes_on_one(tmp_path):
    """Stopped inside epoch 1 on 2 ranks and resumed on 1 process, the run trains the rest of epoch 1's
    selection: every selected sample exactly once over the two runs."""
    import fastprune as fp
    import fastprune.train as T
    from fastprune.data import ImageFolderIndex
    from imagegen import make_tree

    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    make_tree(data, per_class=(8, 8, 8))
    n = len(ImageFolderIndex(data))
    cut = -(-(-(-n // 2)) // 4) + 1  # epoch 0 takes ceil(ceil(n / 2) / 4) steps per rank: one step into epoch 1
    ranks = W.launch(W.train_cut_mid_epoch, 2, data, out, cut, collective_timeout=20)
    assert isinstance(ranks[0], D.RankError) and ranks[0].kind == "Interrupted"
    assert isinstance(ranks[1], D.RankError)  # its next collective failed: it did not hang
    mid = torch.load(Path(out) / "checkpoint.pt", weights_only=False)
    assert mid["epoch"] == 1 and mid["loader"]["position"] == 4 and mid["loader"]["world_size"] == 2
    selected = mid["pruner"]["global_indices"]
    # n is odd: epoch 0 padded its first sample onto rank 1's last step; with a merge after every step the
    # second update built on the first (as in one process), so that sample has one visit more
    first = fp.DynamicPruner(n, 3, epochs=2, seed=0, device="cpu", process_group=False).global_indices[0]
    head = selected[:8]
    assert torch.equal(mid["pruner"]["visits"][head], 2 + (head == first).int()), \
        "both ranks' first batch is in the checkpoint"
    T.train(W.train_config(data, out, resume=True), progress=False, log=lambda *_: None)
    end = torch.load(Path(out) / "checkpoint.pt", weights_only=False)
    visits = end["pruner"]["visits"]
    expected = torch.ones(n, dtype=visits.dtype)
    expected[selected] += 1
    expected[first] += 1
    assert n % 2 == 1 and torch.equal(visits, expected), "every selected sample trained once in epoch 1"


def test_ddp_example_runs_under_torchrun(tmp_path):
    from imagegen import make_tree

    make_tree(str(tmp_path / "data"), per_class=(6, 5, 5))
    script = Path(__file__).parent.parent / "examples" / "ddp_torchrun.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "data"), "--epochs", "2", "--batch-size", "4",
                           "--image-size", "64", "--arch", "resnet18", "--workers", "0"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1: trained") == 1 and "on 2 ranks" in proc.stdout
    assert (tmp_path / "checkpoint.pt").exists()
