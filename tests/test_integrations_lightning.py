"""fastprune.integrations.lightning under a real lightning.Trainer on the CPU: the sampler, the epoch ends,
logging, resume from every kind of Lightning checkpoint, misuse, and DDP with 2 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

import lightning_programs as P  # noqa: E402

from fastprune import distributed as D  # noqa: E402

from fastprune.integrations.lightning import METRICS, PruningCallback, ShardSampler  # noqa: E402

pytestmark = [pytest.mark.filterwarnings(
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",  # few workers, few batches: tiny on purpose
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated",  # Lightning's own use of torch's pytree
    "ignore:Checkpoint directory .* exists and is not empty",  # the resumed run saves where the interrupted one did
), pytest.mark.usefixtures("reference_path_module")]  # the training loop around the pruner is under test


def _fit(tmp_path, **kw):
    return P.fit(str(tmp_path), **kw)


def test_every_epoch_trains_the_pruners_selection_and_logs_it(tmp_path):
    run = _fit(tmp_path, epochs=4)
    pruner = run.callback.pruner
    assert run.model.pruner is pruner
    assert [h["epoch"] for h in pruner.history] == [0, 1, 2, 3, 4]  # next_epoch() after each of the 4 epochs
    kept = [h["kept"] for h in pruner.history]
    assert kept[0] == P.N and kept[1] < P.N and kept[2] < P.N, "epochs 1 and 2 are pruned"
    for epoch in range(4):
        trained = [i for e, idx in run.model.seen if e == epoch for i in idx]
        assert len(trained) == kept[epoch] and len(set(trained)) == kept[epoch], f"epoch {epoch}: each kept sample once"
        assert len([1 for e, _ in run.model.seen if e == epoch]) == -(-kept[epoch] // P.BATCH), "one step a batch"
    assert run.trainer.global_step == sum(-(-k // P.BATCH) for k in kept[:4])
    assert torch.equal(pruner.visits, torch.bincount(torch.tensor(
        [i for _, idx in run.model.seen for i in idx]), minlength=P.N).to(pruner.visits.dtype))
    logged = [m for m in run.logger.metrics if METRICS[0] in m]
    assert [m["epoch"] for m in logged] == [0, 1, 2, 3]
    assert [m[METRICS[0]] for m in logged] == pytest.approx([k / P.N for k in kept[:4]])
    assert all(m[METRICS[1]] == 0 for m in logged)  # noise handling is off here
    assert logged[-1][METRICS[2]] == pytest.approx(1 - sum(kept[:4]) / (4 * P.N))
    # the learning rate followed the pruned run to its end (ProgressScheduler, see test_integrations_schedule)
    assert run.model.scheduler.scheduler.last_epoch == run.model.scheduler.length - 1


def test_suspected_noisy_count_is_logged(tmp_path):
    run = _fit(tmp_path, epochs=4, noise_ratio=0.3, noise_start=2, flip=0.25)
    logged = [m[METRICS[1]] for m in run.logger.metrics if METRICS[1] in m]
    history = run.callback.pruner.history
    expected = [h["relabeled"] + h["excluded"] + h["down_weighted"] for h in history[:4]]
    assert logged == expected and expected[2] > 0 and expected[:2] == [0, 0]


def test_callback_leaves_the_users_hook_as_it_was(tmp_path):
    run = _fit(tmp_path, epochs=1)
    assert "train_dataloader" not in vars(run.model)
    loader = run.model.train_dataloader()
    assert not isinstance(loader.sampler, ShardSampler)


def test_datamodule_loader_gets_the_sampler(tmp_path):
    run = _fit(tmp_path, epochs=2, datamodule=True)
    kept = [h["kept"] for h in run.callback.pruner.history]
    assert sum(len(idx) for _, idx in run.model.seen) == sum(kept[:2])


# ------------------------------------------------------------------ resume

# checkpoint settings, where the first run stops (epoch, batch), whether it validates, and where in its epoch
# the checkpoint finds the pruner: "start" (next_epoch() done), "inside", or "end" (all batches, no next_epoch())
RESUME_CASES = {
    # saved by ModelCheckpoint at the end of every epoch, after the callback's next_epoch()
    "epoch_end": (dict(every_n_epochs=1), (2, 1), False, "start"),
    # saved after validation, which runs after the last batch but before the epoch-end hooks
    "after_validation": (dict(every_n_epochs=1, save_on_train_epoch_end=False), (2, 1), True, "end"),
    # saved every 4 steps, inside an epoch: the loader goes on where it was
    "mid_epoch": (dict(every_n_train_steps=4), (2, 2), False, "inside"),
    # saved every 6 steps = after epoch 0's last batch; resumed, Lightning skips that epoch's end hooks
    "last_batch": (dict(every_n_train_steps=6), (1, 1), False, "end"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, case):
    ckpt, stop, validate, where = RESUME_CASES[case]
    whole = _fit(tmp_path / "whole", epochs=4, checkpoint=ckpt, validate=validate)
    with pytest.raises(P.Interrupted):
        _fit(tmp_path / "cut", epochs=4, checkpoint=ckpt, validate=validate, stop_at=stop)
    last = max((tmp_path / "cut" / "ckpt").glob("*.ckpt"), key=os.path.getmtime)
    saved = torch.load(last, weights_only=False)
    first = list(P.last_run_seen)  # what the interrupted run trained
    resumed = _fit(tmp_path / "cut", epochs=4, checkpoint=ckpt, validate=validate, ckpt_path=str(last))
    steps, state = saved["global_step"], saved["callbacks"]["PruningCallback"]
    epoch_steps = -(-whole.callback.pruner.history[state["pruner"]["epoch"]]["kept"] // P.BATCH)
    assert {"start": state["batches"] == 0, "inside": 0 < state["batches"] < epoch_steps,
            "end": state["batches"] == epoch_steps}[where], f"the checkpoint is not at the {where} of an epoch"
    assert first[:steps] + resumed.model.seen == whole.model.seen, "the same batches, in the same order"
    assert P.differences(resumed.callback.pruner.state_dict(), whole.callback.pruner.state_dict()) == []
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), f"weights {name} differ"
    assert resumed.model.scheduler.scheduler.last_epoch == whole.model.scheduler.scheduler.last_epoch


class _StubPruner:
    """What ShardSampler reads from a pruner on rank ``rank`` of ``world``."""

    def __init__(self, order, rank, world, epoch=1):
        self.global_indices, self.rank, self.world_size, self.epoch = order, rank, world, epoch
        self.num_samples = 41
        self.epoch_indices = self.shard()

    def shard(self, start=0):
        return D.shard(self.global_indices[start:], self.rank, self.world_size)


@pytest.mark.parametrize("old,new", [(2, 2), (2, 3), (3, 1)])
def test_shard_sampler_finishes_an_epoch_under_another_world_size(old, new):
    """Resumed inside an epoch, each rank serves its part of what no rank trained, and reports the epoch's
    length as Lightning counts it: the batches it already ran, plus the rest."""
    order = torch.randperm(41)
    served = 6  # samples each of the ``old`` ranks trained before the checkpoint
    consumed = torch.cat([_StubPruner(order, r, old).shard()[:served] for r in range(old)])
    rest = []
    for r in range(new):
        pruner = _StubPruner(order, r, new)
        sampler = ShardSampler(pruner)
        sampler.resume(1, served, old)
        part = list(sampler)
        assert len(sampler) == served + len(part)
        if old == new:
            assert part == pruner.epoch_indices[served:].tolist(), "the same shard, where it stopped"
        rest += part
        pruner.epoch = 2  # the next epoch: the whole shard again
        assert list(sampler) == pruner.epoch_indices.tolist() and len(sampler) == len(pruner.epoch_indices)
    assert set(consumed.tolist()) | set(rest) == set(order.tolist()), "the epoch's selection is covered"
    twice = set(consumed.tolist()) & set(rest)
    assert not twice if old != new else twice <= set(order[:new].tolist()), "twice: only the shard's pad"


# ------------------------------------------------------------------ misuse

def test_module_that_does_not_step_the_pruner_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="scored no sample in epoch 0"):
        _fit(tmp_path, epochs=2, plain_loss=True)


def test_loader_with_its_own_sampler_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="already has its own sampler"):
        _fit(tmp_path, epochs=1, loader="own_sampler")


def test_loader_subclass_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="can give the pruner's sampler only to a torch.utils.data.DataLoader"):
        _fit(tmp_path, epochs=1, loader="subclass")


def test_loader_subclass_with_the_pruners_own_sampler_is_kept(tmp_path):
    run = _fit(tmp_path, epochs=3, loader="subclass_with_pruner_sampler")
    kept = [h["kept"] for h in run.callback.pruner.history]
    assert [sum(len(idx) for e, idx in run.model.seen if e == epoch) for epoch in range(3)] == kept[:3]


def test_dataset_of_another_size_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="the dataset has 47 samples but the pruner was built with num_samples=48"):
        _fit(tmp_path, epochs=1, loader="short")


def test_loaders_passed_to_fit_are_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"a loader passed to Trainer.fit\(train_dataloaders=...\) cannot be given it"):
        _fit(tmp_path, epochs=1, loader="to_fit")


def test_epochs_are_needed_without_max_epochs(tmp_path):
    with pytest.raises(ValueError, match="needs epochs="):
        _fit(tmp_path, epochs=None, max_steps=3)


def test_module_holding_another_pruner_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="pruner is already set to another object"):
        _fit(tmp_path, epochs=1, own_pruner=True)


def test_core_does_not_import_the_frameworks():
    code = ("import sys, fastprune, fastprune.integrations; "
            "print(sorted(m for m in ('lightning', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ DDP

def test_ddp_two_processes_on_gloo(tmp_path):
    """Lightning's DDP strategy on 2 CPU processes (started by torchrun, as on a cluster): every rank trains
    its shard of each selection (not a shard of it), the ranks agree, and a resumed run equals an
    uninterrupted one."""
    script = Path(__file__).parent / "lightning_programs.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["global"] == ranks[1]["global"]
    kept = [h["kept"] for h in ranks[0]["history"]]
    assert kept[0] == P.N and kept[1] < P.N
    for epoch in range(4):
        mine = [sorted(i for e, idx in r["seen"] for i in idx if e == epoch) for r in ranks]
        order = ranks[0]["globals"][epoch]
        assert len(order) == kept[epoch]
        expected = [sorted(order[r::2] + (order[:1] if kept[epoch] % 2 and r == 1 else [])) for r in range(2)]
        assert mine == expected, f"epoch {epoch}: each rank trains its shard of the selection"
    # the merge counts a padded sample trained on both ranks once: one visit per selected sample and epoch
    assert ranks[0]["visits_total"] == sum(kept[:4])
    assert ranks[0]["logged"] == pytest.approx([k / P.N for k in kept[:4]])
    for r in ranks:
        assert r["resumed_equal"], "resumed under DDP: the same pruner state and weights as uninterrupted"
