"""Test setup: Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before ``triton`` is imported, so it is set here,
at collection time.  Tests pick fastprune's CPU dispatch with a fixture:
``reference_path`` (kernels/reference.py), ``kernel_path`` (the Triton kernels) or
``both_paths`` (the test runs on each).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastprune.kernels import SampleState  # noqa: E402
# The kernels are decorated once, when first imported: import them now, with the interpreter on, so that a
# test that switches it off for a while (``reference_path``) cannot be the first to import them.
from fastprune.kernels import select, step  # noqa: E402, F401


def make_state(n: int, seed: int = 0, device="cpu") -> SampleState:
    """A fresh step state, with random (never zero) weights."""
    g = torch.Generator().manual_seed(seed)
    state = SampleState.empty(n, device)
    state.weights.copy_(torch.rand(n, generator=g) + 0.5)
    return state


def clone_state(state: SampleState) -> SampleState:
    return state.clone()


@pytest.fixture
def reference_path(monkeypatch):
    """Route fastprune's CPU dispatch to kernels/reference.py for this test."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def kernel_path(monkeypatch):
    """Run the Triton kernels (under the interpreter) for this test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=["0", "1"], ids=["reference_path", "kernel_path"])
def both_paths(request, monkeypatch):
    """Run the test twice: on ``reference_path``, then on ``kernel_path``."""
    monkeypatch.setenv("TRITON_INTERPRET", request.param)


@pytest.fixture(scope="module")
def reference_path_module():
    """``reference_path`` for a whole module (``pytestmark = pytest.mark.usefixtures(...)``): for tests of the
    training loop around the pruner, whose kernels have their own tests under the interpreter."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield


@pytest.fixture
def index(tmp_path):
    """The default tree of ``imagegen.make_tree`` (13 images, 3 classes), indexed without a cache."""
    from imagegen import make_tree

    from fastprune.data import ImageFolderIndex

    make_tree(str(tmp_path / "data"))
    return ImageFolderIndex(tmp_path / "data", cache_dir=False)


def fake_bench(bench: str, calls: dict):
    """A benchmark module that measures nothing: one record numbered by ``calls``, section ``<bench>-x``."""
    class Module:
        @staticmethod
        def parse_args(argv):
            return argv

        @staticmethod
        def produce(args, info):
            calls["n"] += 1
            return [{"bench": bench, "method": "m", "run": calls["n"]}], f"table {bench}", f"{bench}-x"
    return Module

