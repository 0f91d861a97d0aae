"""The CUDA code path, run on a CPU-only machine under a simulated CUDA device (tests/simcuda.py).

On a real GPU a host tensor that meets a device tensor fails ("Expected all tensors to be on the same
device"), and a host tensor handed to a Triton kernel is read at a host address.  On the CPU the reference
path runs instead, so plain CPU tests never see either.  Here the pruner, its step and ``next_epoch()``,
the selection pipeline, the distributed merge, the loaders' index hand-over, the static influence solver
and the embedding tables run with ``device="cuda"`` against PyTorch's own device rules, on real values: the
results must equal a CPU run's bit for bit, and the training step must not synchronise with the host.

What this cannot catch (see simcuda.py): anything about real GPU execution (races, memory ordering,
compiled-kernel numerics, speed), and device mix-ups inside DALI's GPU pipeline, NCCL or a model's
backward pass (autograd's engine needs a real device; backward nodes are called directly here).
"""

import numpy as np
import pytest
import torch
from simcuda import SimCudaTensor, grad_of, simulated_cuda, to_host

import fastprune as fp
from fastprune import distributed as dist
from fastprune.kernels import reference as R
from fastprune.kernels import select_epoch

N, C, D, B = 240, 7, 16, 64


def _tables(device):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(N, D, generator=g).half()
    text = torch.randn(C, D, generator=g).half()
    return image.to(device), text.to(device)


def _batches(epochs, seed=1):
    """The same logits and labels for every run: per epoch, a (B x C) logits block per batch position."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(B, C, generator=g) * 2 for _ in range(-(-N // B))] for _ in range(epochs)]


def _run(device, policy, emb, epochs=3, subset=None, group=None, batch_emb=None):
    """Train ``epochs`` epochs on fixed logits; returns the pruner and, per epoch, (order, scores, visits)."""
    kw = dict(keep_ratio=0.5, policy=policy, warmup=1, anneal=0.0, seed=5, device=device, initial_subset=subset)
    if emb == "table":
        image, text = _tables(device)
        kw.update(image_emb=image, text_emb=text, noise_ratio=0.1)
    elif emb == "batch":
        kw.update(text_emb=_tables(device)[1], noise_ratio=0.1)
    pruner = fp.DynamicPruner(N, C, epochs=epochs + 1, process_group=False, **kw)
    if group is not None:
        pruner._group = group
    history = []
    for blocks in _batches(epochs):
        order = pruner.epoch_indices
        for pos, lo in enumerate(range(0, order.numel(), B)):
            idx = order[lo:lo + B].to(device)
            logits = blocks[pos][:idx.numel()].to(device).requires_grad_()
            labels = (idx * 3 + 1) % C
            extra = {}
            if emb == "batch":
                extra["image_emb"] = (torch.arange(idx.numel() * D, dtype=torch.float32).reshape(-1, D) % 5 - 2
                                      ).half().to(device)
            grad_of(pruner.step(logits, labels, idx, **extra))
        pruner.next_epoch()
        history.append((pruner.epoch_indices.clone(), to_host(pruner.scores).clone(),
                        to_host(pruner.visits).clone(), to_host(pruner.weights).clone()))
    return pruner, history


def _assert_same_history(a, b):
    for (oa, sa, va, wa), (ob, sb, vb, wb) in zip(a, b):
        assert torch.equal(oa, ob)
        assert torch.equal(sa, sb) and torch.equal(va, vb) and torch.equal(wa, wb)


# ----------------------------------------------------------------------------- the guard itself


def test_the_guard_rejects_what_a_gpu_rejects():
    with simulated_cuda() as sim:
        x = torch.arange(6, device="cuda")
        assert isinstance(x, SimCudaTensor) and x.is_cuda and x.device == torch.device("cuda", 0)
        assert (x + torch.tensor(2)).tolist() == [2, 3, 4, 5, 6, 7]  # a CPU scalar is allowed, as on a GPU
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.arange(6)
        with pytest.raises(RuntimeError, match="same device"):
            torch.where(x > 2, x, torch.zeros(6, dtype=torch.int64))
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        before = sum(sim.syncs.values())
        int(x.sum())
        x.cpu()
        assert sum(sim.syncs.values()) == before + 2  # .item() and the copy to the host both wait for the GPU
        from fastprune.kernels.select import priority_triton

        cpu = torch.zeros(6)
        with pytest.raises(RuntimeError, match="CUDA path"):  # a host tensor handed to a device kernel
            priority_triton(x.float(), x.int(), x.float(), cpu.bool(), 0.0, 1.0, 1.0, True)


def test_random_words_live_on_the_selections_device():
    """Defect: the Philox counters were host tensors, so policy="random" failed on CUDA."""
    r0, r1 = R.random_words(11, 50, 3, 2, "meta")
    assert r0.device.type == r1.device.type == "meta"
    with simulated_cuda():
        d0, d1 = R.random_words(11, 50, 3, 2, "cuda")
        assert d0.is_cuda
        c0, c1 = R.random_words(11, 50, 3, 2, "cpu")
        assert torch.equal(to_host(d0), c0) and torch.equal(to_host(d1), c1)


# ------------------------------------------------------------------------------ the pruner


@pytest.mark.parametrize("emb", ["table", "batch", "none"])
@pytest.mark.parametrize("policy", ["infobatch", "topk", "random", "full"])
def test_pruner_on_cuda_equals_the_cpu_run(policy, emb):
    _, cpu = _run("cpu", policy, emb)
    with simulated_cuda():
        pruner, cuda = _run("cuda", policy, emb)
        assert pruner.scores.is_cuda and pruner.visits.is_cuda
    _assert_same_history(cpu, cuda)
    assert cuda[-1][0].numel() < N or policy == "full"


def test_training_steps_never_wait_for_the_device():
    with simulated_cuda() as sim:
        image, text = _tables("cuda")
        pruner = fp.DynamicPruner(N, C, epochs=3, image_emb=image, text_emb=text, noise_ratio=0.1, device="cuda",
                                  process_group=False)
        order = pruner.epoch_indices.to("cuda")
        sim.syncs.clear()
        for lo in range(0, N, B):
            idx = order[lo:lo + B]
            logits = torch.randn(idx.numel(), C, device="cuda", requires_grad=True)
            grad_of(pruner.step(logits, idx % C, idx))
        assert not sim.syncs, f"the step synchronised with the host: {dict(sim.syncs)}"
        pruner.next_epoch()
        # the step's errors (checked before anything changes), the CLIP table's new rows, the epoch's counts and
        # its index list
        assert 0 < sum(sim.syncs.values()) <= 4, dict(sim.syncs)


def test_static_subset_state_dict_and_resume_on_cuda():
    subset = torch.arange(0, N, 2)
    _, cpu = _run("cpu", "infobatch", "table", subset=subset)
    with simulated_cuda():
        pruner, cuda = _run("cuda", "infobatch", "table", subset=subset)
        sd = pruner.state_dict()
        image, text = _tables("cuda")
        again = fp.DynamicPruner(N, C, epochs=4, keep_ratio=0.5, warmup=1, anneal=0.0, seed=5, image_emb=image,
                                 text_emb=text, noise_ratio=0.1, initial_subset=subset, device="cuda",
                                 process_group=False)
        again.load_state_dict(sd)
        assert torch.equal(again.epoch_indices, pruner.epoch_indices)
        assert torch.equal(to_host(again.scores), to_host(pruner.scores))
        assert set(again.epoch_indices.tolist()) <= set(subset.tolist())
        assert again.suspected_noisy().device.type == "cpu"
        assert len(list(again.sampler())) == again.epoch_indices.numel()
    _assert_same_history(cpu, cuda)


@pytest.mark.parametrize("policy", ["infobatch", "topk", "random", "full"])
def test_selection_pipeline_on_cuda(policy):
    g = torch.Generator().manual_seed(3)
    scores, visits = torch.rand(1001, generator=g) * 4, (torch.rand(1001, generator=g) > 0.2).int()
    cons, exclude = torch.randn(1001, generator=g) * 0.1, torch.rand(1001, generator=g) > 0.9
    kw = dict(use_consistency=True, policy=policy, keep_ratio=0.6, noise_ratio=0.1, semantic_weight=1.0,
              max_drop=0.9, seed=4, epoch=2, population=int((~exclude).sum()))
    ref = select_epoch(scores, visits, cons, exclude=exclude, **kw)
    with simulated_cuda():
        sel = select_epoch(scores.cuda(), visits.cuda(), cons.cuda(), exclude=exclude.cuda(), **kw)
        assert sel.order.is_cuda and sel.weights.is_cuda
        for name in ("keep", "weights", "noisy", "n_keep"):
            assert torch.equal(to_host(getattr(sel, name)), getattr(ref, name)), name
        k = int(ref.n_keep)  # the kept samples come first (the GPU's passes also write the rest after them)
        assert torch.equal(to_host(sel.order)[:k], ref.order[:k])


# ----------------------------------------------------------------------------- distributed


class _OneRank(dist.Group):
    """A one-rank group whose collectives check that they get device tensors (the merge runs for real)."""

    def __init__(self):
        super().__init__(group=None, rank=0, world_size=1, backend="nccl")
        self.calls = 0

    def _check(self, values):
        assert values.is_cuda, f"a collective got a {values.device} tensor from a CUDA pruner"
        self.calls += 1
        return values

    all_max = all_sum = _check


def test_epoch_end_merge_runs_on_the_device():
    _, alone = _run("cpu", "infobatch", "table")
    with simulated_cuda():
        group = _OneRank()
        pruner, merged = _run("cuda", "infobatch", "table", group=group)
        assert group.calls >= 3 * 2  # a header and the state, every epoch
        pruner.sync()
        assert pruner.last_sync["bytes"] > 0
    _assert_same_history(alone, merged)


# ---------------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def jpeg_index(tmp_path_factory):
    from imagegen import make_tree

    root = tmp_path_factory.mktemp("jpegs")
    make_tree(root, per_class=(6, 5, 5))
    return fp.data.ImageFolderIndex(root)


def _hand_over(loader, pruner):
    """Iterate one epoch: batches arrive on the device, in the pruner's order, and the step takes them."""
    seen = []
    for images, labels, idx in loader:
        assert images.is_cuda and labels.is_cuda and idx.is_cuda
        seen += idx.tolist()
        logits = images.float().mean(dim=(2, 3))[:, :1].repeat(1, 3).requires_grad_()
        grad_of(pruner.step(logits, labels, idx))
    assert seen == pruner.epoch_indices.tolist()
    return seen


def test_torch_loader_hands_the_selection_to_the_device(jpeg_index):
    with simulated_cuda():
        pruner = fp.DynamicPruner(len(jpeg_index), 3, epochs=3, keep_ratio=0.5, warmup=0, policy="random", device="cuda",
                                  process_group=False)
        loader = fp.data.TorchLoader(jpeg_index, pruner, batch_size=4, num_workers=0, image_size=16)
        _hand_over(loader, pruner)
        pruner.next_epoch()
        assert len(_hand_over(loader, pruner)) < len(jpeg_index)


def test_dali_loader_hands_the_selection_to_the_device(jpeg_index):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")

    class HostDecoding(fp.data.DaliLoader):
        """A CPU pipeline (no GPU decoder here) feeding a CUDA pruner: everything after DALI is the CUDA path."""

        def _build(self):
            device, self.device = self.device, torch.device("cpu")
            try:
                super()._build()
            finally:
                self.device = device

    with simulated_cuda():
        pruner = fp.DynamicPruner(len(jpeg_index), 3, epochs=3, keep_ratio=0.5, warmup=0, policy="random", device="cuda",
                                  process_group=False)
        loader = HostDecoding(jpeg_index, pruner, batch_size=4, image_size=16, num_threads=1)
        assert loader.device.type == "cuda"
        _hand_over(loader, pruner)
        pruner.next_epoch()
        assert len(_hand_over(loader, pruner)) < len(jpeg_index)


# ------------------------------------------------------------------------- static, embeddings


def test_influence_pruning_on_cuda_equals_the_cpu_run():
    from fastprune.static.influence import LinearHead, fit_head, influence_prune

    g = torch.Generator().manual_seed(2)
    feats = torch.randn(120, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (120,), generator=g)
    head = fit_head(feats, labels)  # fitted on the host: LBFGS needs autograd's engine
    keep = influence_prune(feats, labels, prune_ratio=0.3, head=head)
    with simulated_cuda():
        on_cuda = influence_prune(feats.cuda(), labels.cuda(), prune_ratio=0.3,
                                  head=LinearHead(head.weight.cuda(), head.l2))
    assert torch.equal(to_host(on_cuda), keep)


def test_embedding_tables_load_onto_the_device(tmp_path):
    image = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    text = np.random.default_rng(1).standard_normal((C, D)).astype(np.float32)
    fp.Embeddings.from_arrays(image, text).save(tmp_path / "emb")
    with simulated_cuda():
        emb = fp.Embeddings.load(tmp_path / "emb", device="cuda")
        assert emb.image.is_cuda and emb.text.is_cuda
        pruner = fp.DynamicPruner(N, C, epochs=2, image_emb=emb.image, text_emb=emb.text, process_group=False)
        assert pruner.device.type == "cuda"
        idx = pruner.epoch_indices[:B].cuda()
        grad_of(pruner.step(torch.randn(B, C, device="cuda", requires_grad=True), idx % C, idx))
        emb.save(tmp_path / "again")
    assert np.allclose(fp.Embeddings.load(tmp_path / "again").image.float().numpy(),
                       fp.Embeddings.load(tmp_path / "emb").image.float().numpy())


def test_epoch_end_report_keeps_counts_and_values_exact():
    """The epoch-end transfer carries counts and the step's error examples as int64 (a float64 on the way
    rounded a bad label of 2**62 + 1 to 2**62)."""
    with simulated_cuda():
        pruner = fp.DynamicPruner(N, C, epochs=2, device="cuda", validate="none", process_group=False)
        labels = torch.full((4,), 2**62 + 1, device="cuda")
        pruner.step(torch.randn(4, C, device="cuda"), labels, torch.arange(4, device="cuda"))
        with pytest.raises(ValueError, match=r"labels: value 4611686018427387905 is outside \[0, 7\)"):
            pruner.next_epoch()
