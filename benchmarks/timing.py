"""Timing that is honest on both devices: medians and IQRs, CUDA events or ``do_bench`` on GPUs."""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable

import torch


SLOW_US = 100_000.0  # from here on, do_bench would time a single call (its 100 ms budget): ...
SLOW_REPS = 3  # ... so such calls are timed this many times with the host clock instead


def measure(fn: Callable[[], object], device: torch.device, reps: int = 20, warmup: int = 3) -> dict:
    """Median and interquartile range of ``fn()`` in microseconds.

    On CUDA: ``do_bench`` for what takes under ``SLOW_US`` (after one warm-up call); slower calls (host-side
    baselines at 100M samples, say) ``SLOW_REPS`` times with the host clock and a synchronisation, which gives
    more samples in less time than ``do_bench``'s estimate-then-repeat does there.
    """
    if device.type == "cuda":
        import triton.testing

        fn()
        probe = _host_timed_us(fn, device)
        if probe > SLOW_US:
            return _median_iqr([probe] + [_host_timed_us(fn, device) for _ in range(SLOW_REPS - 1)])
        q25, q50, q75 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.25, 0.5, 0.75])
        return {"median_us": q50 * 1e3, "iqr_us": (q75 - q25) * 1e3}
    for _ in range(warmup):
        fn()
    return _median_iqr([_host_timed_us(fn, device) for _ in range(reps)])


def _host_timed_us(fn: Callable[[], object], device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e6


def _median_iqr(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_us": statistics.median(times), "iqr_us": q[2] - q[0]}


def measure_graphed(fn: Callable[[], object], device: torch.device) -> dict | None:
    """Median and IQR of ``fn()`` replayed from a CUDA graph, in microseconds: the few-microsecond cases,
    where the host's launch cost would otherwise be measured instead of the device's work.

    None on a CPU, or where ``fn`` cannot be captured (it synchronises with the host, say).
    """
    if device.type != "cuda":
        return None
    import triton.testing

    try:
        q25, q50, q75 = triton.testing.do_bench_cudagraph(fn, rep=25, quantiles=[0.25, 0.5, 0.75])
    except (RuntimeError, AssertionError) as exc:  # capture refused; the device is usable again after it
        torch.cuda.synchronize()
        warnings.warn(f"no CUDA-graph timing: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                      RuntimeWarning, stacklevel=2)
        return None
    return {"median_us": q50 * 1e3, "iqr_us": (q75 - q25) * 1e3}


def host_enqueue_us(fn: Callable[[], object], calls: int = 20) -> float:
    """Median host time of one ``fn()`` call without waiting for the device (CUDA): what the call costs the
    host's side of a training step, which runs ahead of the GPU while the GPU has work queued."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


SYNC_WARNING = "called a synchronizing CUDA operation"  # what PyTorch's sync debug mode warns, per sync


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Synchronisations PyTorch reports while ``fn()`` runs (CUDA only; None elsewhere).

    Only PyTorch's per-sync warning counts: the debug mode's one-time "prototype feature" notice, which the
    first call in a process also emits, is not a synchronisation."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum(SYNC_WARNING in str(w.message) for w in caught)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _host_peak_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Resident memory ``fn()`` adds at its peak (Linux: the process's high-water mark, reset before the call),
    after handing the allocator's free pages back so that they are not reused unseen; None where unsupported."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _proc_status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except (OSError, KeyError, AttributeError):
        return None
    fn()
    return max(0, _proc_status("VmHWM:") - base)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Memory ``fn()`` takes at its peak beyond what was allocated before it: the device's allocator on CUDA,
    the process's resident memory on the CPU (Linux; None where it cannot be read)."""
    if device.type == "cpu":
        return _host_peak_extra_bytes(fn)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth in GB/s (read + write), measured now, as the roofline for the tables."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, reps=10)
    return 2 * src.numel() * 4 / (t["median_us"] * 1e-6) / 1e9
