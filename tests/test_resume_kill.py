"""A training process killed with SIGKILL after a checkpoint resumes to the same selections."""

import os
import signal
import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    import fastprune as fp

    N, C = 900, 9
    margin = torch.linspace(-2, 6, N)[torch.randperm(N, generator=torch.Generator().manual_seed(0))]

    def feed(pr, idx):
        logits = torch.zeros(idx.numel(), C)
        logits[torch.arange(idx.numel()), idx % C] = margin[idx]
        pr.step(logits.requires_grad_(), idx % C, idx).backward()

    def run(pr, start_epoch, start_batch, ckpt=None, stop_at=None):
        orders = []
        for epoch in range(start_epoch, 4):
            order = pr.epoch_indices
            for b, i in enumerate(range(0, order.numel(), 100)):
                if epoch == start_epoch and b < start_batch:
                    continue
                if (epoch, b) == stop_at:
                    tmp = ckpt + ".tmp"
                    torch.save({"pruner": pr.state_dict(), "epoch": epoch, "batch": b}, tmp)
                    os.replace(tmp, ckpt)  # atomic
                    print("saved", flush=True)
                    time.sleep(600)  # killed here
                feed(pr, order[i:i + 100])
            orders.append(pr.next_epoch())
        return orders

    mode, ckpt = sys.argv[1], sys.argv[2]
    pr = fp.DynamicPruner(N, C, epochs=4, keep_ratio=0.5, seed=3, device="cpu")
    if mode == "train":
        orders = run(pr, 0, 0, ckpt, stop_at=(1, 3))
    elif mode == "resume":
        sd = torch.load(ckpt)
        pr.load_state_dict(sd["pruner"])
        orders = run(pr, sd["epoch"], sd["batch"])
    else:
        orders = run(pr, 0, 0)
    torch.save(orders[-3:], ckpt + "." + mode)
""")


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ckpt = str(tmp_path / "ckpt.pt")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.Popen([sys.executable, str(script), "train", ckpt], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "saved"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    for mode in ("resume", "straight"):
        subprocess.run([sys.executable, str(script), mode, ckpt], check=True, env=env, timeout=300)
    resumed, straight = torch.load(ckpt + ".resume"), torch.load(ckpt + ".straight")
    assert len(resumed) == len(straight) == 3
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b)
