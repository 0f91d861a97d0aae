"""A checkout on PYTHONPATH, not installed, imports fastprune.kernels and fastprune.benchmarks as an install
does (how a machine where nothing can be installed runs the tests and the benchmarks)."""

import os
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_checkout_on_pythonpath_maps_kernels_and_benchmarks(tmp_path):
    # python -S skips site's .pth files, so an editable install is invisible; site-packages stays reachable.
    path = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    code = ("import sys, fastprune.kernels as k, fastprune.benchmarks as b, fastprune.kernels.reference as r; "
            "assert not any('editable' in repr(f) for f in sys.meta_path); "
            "print(k.__file__, b.__file__, r.__name__, sep='|')")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels, benchmarks, name = proc.stdout.strip().split("|")
    assert Path(kernels) == ROOT / "kernels" / "__init__.py"
    assert Path(benchmarks) == ROOT / "benchmarks" / "__init__.py"
    assert name == "fastprune.kernels.reference"
