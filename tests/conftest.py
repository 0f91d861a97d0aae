"""Test setup: Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before ``triton`` is imported, so it is set here,
at collection time.  Tests that want the pure-PyTorch reference path switch
fastprune's dispatch with the ``reference_path`` fixture.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastprune.kernels import common as K  # noqa: E402
# The kernels are decorated once, when first imported: import them now, with the interpreter on, so that a
# test that switches it off for a while (``reference_path``) cannot be the first to import them.
from fastprune.kernels import select, step  # noqa: E402, F401


def make_state(n: int, seed: int = 0) -> dict:
    """Fresh pruner state buffers, with random (never zero) weights."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        scores=torch.zeros(n),
        visits=torch.zeros(n, dtype=torch.int32),
        consistency=torch.zeros(n),
        weights=torch.rand(n, generator=g) + 0.5,
        stamp=torch.full((n,), -1, dtype=torch.int32),
        errors=torch.zeros(K.ERR_SLOTS, dtype=torch.int64),
    )


def clone_state(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


@pytest.fixture
def reference_path(monkeypatch):
    """Route fastprune's CPU dispatch to kernels/reference.py for this test."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def kernel_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
