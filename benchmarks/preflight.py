"""What this machine offers the GPU suite: device, versions, optional packages, and where fastprune comes from.

    python -m benchmarks.preflight [--json PATH]

Prints one line per finding and writes them as JSON for ``benchmarks.gpu_suite``, which skips the GPU parts
when there is no CUDA device and notes what each part measured without an optional package.
Exit status: 0 ready, 1 a problem (each named on a ``problem:`` line), 3 no CUDA device.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import sys
from pathlib import Path

NO_CUDA = 3
MIN_TRITON = (3, 6)
OPTIONAL = {  # import name -> what it is for
    "nvidia.dali": "DaliLoader (bench_loader, bench_epoch)",
    "open_clip": "CLIP embeddings (fastprune embed)",
    "liger_kernel": "Liger-Kernel baseline (bench_step)",
    "timm": "timm models",
}
TOOLS = ("pytest", "pytest_timeout", "xdist")  # what the suite's test part can use


def version_tuple(text: str) -> tuple[int, ...]:
    """(3, 6, 0) from "3.6.0+git1234"; () when it starts with no number."""
    m = re.match(r"(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def _version(name: str) -> str | None:
    """The module's version if it imports, else None."""
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken optional package counts as absent (DALI without its libraries)
        return None
    return str(getattr(module, "__version__", "present"))


def findings() -> tuple[dict, list[str]]:
    """(what was found, the problems that stop a GPU run from working)."""
    found: dict = {"python": platform.python_version(), "executable": sys.executable,
                   "site": "disabled (-S)" if sys.flags.no_site else "enabled",
                   "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "")}
    problems = []
    import numpy
    import torch

    found.update(numpy=numpy.__version__, torch=torch.__version__, torch_cuda=torch.version.cuda)
    found["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    found["devices"] = [torch.cuda.get_device_name(i) for i in range(found["cuda_devices"])]
    found["device"] = found["devices"][0] if found["devices"] else None
    if found["device"]:
        major, minor = torch.cuda.get_device_capability(0)
        found["capability"] = f"sm_{major}{minor}"
        found["memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    found["triton"] = _version("triton")
    if found["triton"] is None:
        problems.append("triton is not installed: fastprune's kernels need triton >= 3.6 on a GPU")
    elif version_tuple(found["triton"]) < MIN_TRITON:
        problems.append(f"triton {found['triton']} is too old: fastprune needs triton >= 3.6 on a GPU "
                        "(pyproject.toml asks for >= 3.8 only because Triton 3.6's CPU interpreter fails with "
                        "numpy >= 2.4; the compiled kernels work with 3.6)")
    found["optional"] = {name: _version(name) for name in OPTIONAL}
    found["tools"] = {name: _version(name) for name in TOOLS}
    try:
        import fastprune
        import fastprune.kernels
        from fastprune._source_tree import SourceTreeFinder

        via_source = any(isinstance(f, SourceTreeFinder) for f in sys.meta_path)
        found["fastprune"] = (f"{Path(fastprune.__file__).parent} (kernels: {Path(fastprune.kernels.__file__).parent}"
                              f"; {'source tree on PYTHONPATH' if via_source else 'installed'})")
    except Exception as e:  # noqa: BLE001 - reported, not raised: the rest of the report still helps
        found["fastprune"] = None
        problems.append(f"fastprune does not import from {Path.cwd()}: {type(e).__name__}: {e}")
    return found, problems


def report(found: dict, problems: list[str]) -> str:
    lines = [f"python {found['python']} ({found['executable']}, site {found['site']})",
             f"torch {found['torch']} (CUDA {found['torch_cuda']}), triton {found['triton']}, numpy {found['numpy']}"]
    if found["device"]:
        lines.append(f"device: {', '.join(found['devices'])} ({found['capability']}, {found['memory_GiB']} GiB)")
    else:
        lines.append("device: no CUDA device")
    for name, purpose in OPTIONAL.items():
        version = found["optional"][name]
        lines.append(f"{name}: {version if version else 'absent'} - {purpose}")
    lines.append("test tools: " + ", ".join(f"{k} {v or 'absent'}" for k, v in found["tools"].items()))
    lines.append(f"fastprune: {found['fastprune']}")
    if found["TRITON_INTERPRET"] not in ("", "0"):
        lines.append(f"note: TRITON_INTERPRET={found['TRITON_INTERPRET']} here (the suite sets 0 for its parts)")
    lines += [f"problem: {p}" for p in problems]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the findings here")
    args = ap.parse_args(argv)
    found, problems = findings()
    print(report(found, problems), flush=True)
    if args.json:
        args.json.write_text(json.dumps({**found, "problems": problems}, indent=1))
    if problems:
        return 1
    if not found["device"]:
        print("no CUDA device: the GPU suite's measurements need one (its --dry-run checks the plan without)")
        return NO_CUDA
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
