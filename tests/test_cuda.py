"""Runs tests/cuda/ with compiled kernels (TRITON_INTERPRET=0) when a CUDA device is present."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_suite_with_compiled_kernels():
    env = dict(os.environ, TRITON_INTERPRET="0")
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "cuda")],
                          env=env, capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
