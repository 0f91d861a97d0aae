"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (regressions show in the usual tooling).

Sizes follow the device: GPU-sized on CUDA, small on a CPU.  These are not part of the test-suite.
"""

import pytest
import torch

from .bench_select import make_pruner
from .bench_step import Setup

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("B,C", [(1024, 1000), (4096, 32000)] if GPU else [(256, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32] if GPU else [torch.float32], ids=str)
def test_fused_step(benchmark, B, C, dtype):
    s = Setup(B, C, dtype, 512, DEVICE)

    def step():
        s.pruner.step(s.logits, s.labels, s.idx).backward()
        s.logits.grad = None
        _sync()

    benchmark(step)


@pytest.mark.parametrize("B,C", [(1024, 1000), (4096, 32000)] if GPU else [(256, 1000)])
def test_cross_entropy_baseline(benchmark, B, C):
    s = Setup(B, C, torch.bfloat16 if GPU else torch.float32, 512, DEVICE)

    def step():
        torch.nn.functional.cross_entropy(s.logits, s.labels).backward()
        s.logits.grad = None
        _sync()

    benchmark(step)


@pytest.mark.parametrize("n", [1_281_167, 10_000_000] if GPU else [100_000])
def test_next_epoch(benchmark, n):
    pruner = make_pruner(n, DEVICE)

    def select():
        pruner.epoch = 1
        pruner.history = pruner.history[:1]
        pruner.next_epoch()

    benchmark(select)
