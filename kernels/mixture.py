"""The noise decisions' per-class mixture fit on the device: every EM iteration of every class in one launch.

``fastprune.noise`` fits, per class and source of evidence, a two-component Gaussian mixture to a histogram
of ``BINS`` bins.  In PyTorch that is a dozen small operations per iteration (~500 launches for 40 iterations),
whatever the number of samples; here one program holds a class's histogram in registers and runs all the
iterations.  ``fastprune.noise._em`` is the reference (the sums run in another order: agreement to float64
rounding, and ranks adopt rank 0's fit in any case).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _log_odds_coefficients(mu_lo, mu_hi, var_lo, var_hi, pi_lo):
    """``fastprune.noise.log_odds_coefficients``."""
    pi = tl.minimum(tl.maximum(pi_lo, 1e-12), 1 - 1e-12)
    a = -0.5 * (1.0 / var_lo - 1.0 / var_hi)
    b = mu_lo / var_lo - mu_hi / var_hi
    c = (tl.log(pi) - tl.log(1 - pi) - 0.5 * (mu_lo * mu_lo / var_lo - mu_hi * mu_hi / var_hi)
         - 0.5 * tl.log(var_lo / var_hi))
    return a, b, c


@triton.jit
def _moments(count, total, squares, floor):
    """``fastprune.noise._moments``."""
    n = tl.maximum(count, 1e-12)
    mu = total / n
    var = (squares - 2 * mu * total + mu * mu * count) / n
    return mu, tl.maximum(var, 0.0) + floor


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
        a, b, c = _log_odds_coefficients(mu_lo, mu_hi, var_lo, var_hi, pi_lo)
        r = w / (1 + tl.exp(-((a * v + b) * v + c)))  # the lower component's share of each bin
        q = w - r
        n_lo = tl.sum(r, axis=0)
        mu_lo, var_lo = _moments(n_lo, tl.sum(r * v, axis=0), tl.sum(r * v * v, axis=0), floor)
        mu_hi, var_hi = _moments(tl.sum(q, axis=0), tl.sum(q * v, axis=0), tl.sum(q * v * v, axis=0), floor)
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
