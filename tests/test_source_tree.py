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


def test_checkout_wins_over_another_installs_kernels(tmp_path):
    """With another fastprune installed (an editable install of a different checkout maps fastprune.kernels to
    its own folder), a checkout on PYTHONPATH still imports its own kernels, never a mix of two trees."""
    other = tmp_path / "other" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("raise ImportError('the other checkout kernels were imported')\n")
    code = ("import importlib.abc, importlib.util, sys\n"
            "class Other(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'fastprune.kernels':\n"
            f"            init = {str(other / '__init__.py')!r}\n"
            "            return importlib.util.spec_from_file_location(name, init,\n"
            "                submodule_search_locations=[init.rsplit('/', 1)[0]])\n"
            "sys.meta_path.insert(0, Other())\n"
            "import fastprune.kernels as k\n"
            "print(k.__file__)\n")
    path = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()) == ROOT / "kernels" / "__init__.py"
