"""Run from a source checkout without installing: ``PYTHONPATH=. python -m ...``.

An install maps the checkout's top-level ``kernels/`` and ``benchmarks/`` to ``fastprune.kernels`` and
``fastprune.benchmarks`` (setuptools' ``package-dir``).  A checkout that is only on ``PYTHONPATH`` has no
such mapping, so this finder provides it; machines where nothing can be installed (a lent GPU machine with
its own torch and triton) run the test-suite and the benchmarks that way.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_ROOT = _PACKAGE.parent
SUBPACKAGES = {"fastprune.kernels": "kernels", "fastprune.benchmarks": "benchmarks"}


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``fastprune.kernels`` / ``fastprune.benchmarks`` in the checkout's top-level folders."""

    def find_spec(self, name, path=None, target=None):  # noqa: D102 - importlib protocol
        folder = SUBPACKAGES.get(name)
        if folder is None:
            return None
        init = _ROOT / folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


def install() -> None:
    """Add the finder when this package is a checkout's ``fastprune/`` (not an installed copy)."""
    if (_PACKAGE / "kernels").is_dir() or not (_ROOT / "kernels" / "__init__.py").is_file():
        return  # an installed package carries its own fastprune/kernels
    if not any(isinstance(f, SourceTreeFinder) for f in sys.meta_path):
        # first: another install's finder (an editable install of a different checkout, say) must not hand
        # this checkout's fastprune someone else's kernels
        sys.meta_path.insert(0, SourceTreeFinder())
