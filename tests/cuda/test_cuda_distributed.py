"""The distributed pruner on CUDA: compiled kernels, state on the GPU, the merge over CUDA tensors.

Two processes share the machine's first GPU through gloo (which reduces CUDA tensors); with two or more
GPUs the same run goes over NCCL, one GPU per rank.
"""

import os

import pytest
import torch

import dist_workers as W
from test_distributed import _assert_same_snapshots, _ok, _single

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and compiled kernels (TRITON_INTERPRET=0)")


@pytest.fixture(autouse=True)
def on_cuda(monkeypatch):
    monkeypatch.setenv("FASTPRUNE_TEST_DEVICE", "cuda")  # here and in the ranks, which inherit it


def test_two_ranks_on_cuda_equal_a_single_process_run():
    results = _ok(W.launch(W.run_epochs, 2))
    single = _single()
    for res in results:
        _assert_same_snapshots(res["snaps"], single)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between ranks needs two GPUs")
def test_two_ranks_over_nccl():
    results = _ok(W.launch(W.run_epochs, 2, backend="nccl"))
    single = _single()
    for res in results:
        _assert_same_snapshots(res["snaps"], single)
