"""Turning what a user wrote for a device into a ``torch.device``, or into a one-line error; the default
number of decoding workers for this machine."""

from __future__ import annotations

import os

import torch

_TYPES = ("cpu", "cuda")


def resolve_device(spec: str | torch.device | None = None, what: str = "device") -> torch.device:
    """The device ``spec`` names (``None``: CUDA when available, else the CPU), checked against this machine.

    ``what`` names the argument in the error (``"--device"``, ``"device"``).  A bare ``cuda`` stays
    without an index: callers that need one pick the current device (or the local rank's).
    """
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what} must be cpu, cuda or cuda:N, got {str(spec)!r}") from None
    if dev.type not in _TYPES:
        raise ValueError(f"{what} must be cpu, cuda or cuda:N, got {str(spec)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={str(spec)!r} but CUDA is not available here (no GPU, or a CPU-only torch); "
                             "use cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{what}={str(spec)!r} but this machine has {count} GPU{'s' if count != 1 else ''} "
                             f"(cuda:0 to cuda:{count - 1})")
    return dev


def default_workers() -> int:
    """Decoding workers when none are given: one per CPU core, at most 8."""
    return min(8, os.cpu_count() or 1)
