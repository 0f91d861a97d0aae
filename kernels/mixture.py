"""The noise decisions' per-class mixture fit on the device: every EM iteration of every class in one launch.

``fastprune.noise`` fits, per class and source of evidence, a two-component Gaussian mixture to a histogram
of ``BINS`` bins.  In PyTorch that is ~35 small operations per iteration (1,400 launches for 40 iterations),
whatever the number of samples; here one program holds a class's histogram in registers and runs all the
iterations.  ``fastprune.noise._em`` is the reference (the sums run in another order: agreement to float64
rounding, and ranks adopt rank 0's fit in any case).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG_2PI = tl.constexpr(math.log(2 * math.pi))


@triton.jit
def _log_normal(v, mu, var):
    return -0.5 * ((v - mu) * (v - mu) / var + (_LOG_2PI + tl.log(var)))


@triton.jit(do_not_specialize=["ROWS", "ITERATIONS"])
def em_kernel(centres_ptr, w_ptr, n1_ptr, out_ptr, ROWS, ITERATIONS, BINS: tl.constexpr):
    """Row ``program_id``: (mu_lo, mu_hi, var_lo, var_hi, pi_lo) into ``out[k * ROWS + row]``."""
    row = tl.program_id(0).to(tl.int64)
    offs = row * BINS + tl.arange(0, BINS)
    v = tl.load(centres_ptr + offs)
    w = tl.load(w_ptr + offs)
    n1 = tl.load(n1_ptr + row)
    mean = tl.sum(w * v, axis=0) / n1
    var = tl.sum(w * (v - mean) * (v - mean), axis=0) / n1
    floor = 1e-4 * tl.maximum(var, 1e-12) + 1e-8
    sd = tl.sqrt(var)
    mu_lo = mean - sd
    mu_hi = mean + sd
    var_lo = var + floor
    var_hi = var + floor
    pi_lo = tl.full([], 0.5, tl.float64)
    for _ in range(ITERATIONS):
        a = tl.log(tl.maximum(pi_lo, 1e-12)) + _log_normal(v, mu_lo, var_lo)
        b = tl.log(tl.maximum(1 - pi_lo, 1e-12)) + _log_normal(v, mu_hi, var_hi)
        r = w / (1 + tl.exp(b - a))  # the lower component's share of each bin
        n_lo = tl.sum(r, axis=0)
        n_hi = n1 - n_lo
        mu_lo = tl.sum(r * v, axis=0) / tl.maximum(n_lo, 1e-12)
        mu_hi = tl.sum((w - r) * v, axis=0) / tl.maximum(n_hi, 1e-12)
        var_lo = tl.sum(r * (v - mu_lo) * (v - mu_lo), axis=0) / tl.maximum(n_lo, 1e-12) + floor
        var_hi = tl.sum((w - r) * (v - mu_hi) * (v - mu_hi), axis=0) / tl.maximum(n_hi, 1e-12) + floor
        pi_lo = n_lo / n1
        swap = mu_lo > mu_hi  # keep "lower" the lower one
        mu_lo, mu_hi = tl.where(swap, mu_hi, mu_lo), tl.where(swap, mu_lo, mu_hi)
        var_lo, var_hi = tl.where(swap, var_hi, var_lo), tl.where(swap, var_lo, var_hi)
        pi_lo = tl.where(swap, 1 - pi_lo, pi_lo)
    tl.store(out_ptr + row, mu_lo)
    tl.store(out_ptr + ROWS + row, mu_hi)
    tl.store(out_ptr + 2 * ROWS + row, var_lo)
    tl.store(out_ptr + 3 * ROWS + row, var_hi)
    tl.store(out_ptr + 4 * ROWS + row, pi_lo)


def em_triton(centres: torch.Tensor, w: torch.Tensor, n1: torch.Tensor, iterations: int):
    """Drop-in for ``fastprune.noise._em`` (float64 rows of a power-of-two number of bins)."""
    rows, bins = w.shape
    if bins & (bins - 1):
        raise ValueError(f"the mixture kernel needs a power-of-two number of bins, got {bins}")
    out = torch.empty(5, rows, dtype=torch.float64, device=w.device)
    if rows:
        em_kernel[(rows,)](centres.contiguous(), w.contiguous(), n1.contiguous(), out, rows, iterations, BINS=bins,
                           num_warps=4)
    return tuple(out)
