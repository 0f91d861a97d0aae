"""Fused per-batch step: cross-entropy, its gradient, CLIP consistency, EMA score update.

One launch reads each row of logits once (twice when C is larger than one
tile) and writes, in the same pass: the per-sample loss, the model's margin
(label logit minus the largest other) and predicted class, the gradient of the
weighted batch loss with respect to the logits (optionally in place), and the
sample's state (``state.SampleState``): EMA score, visit count, consistency, the
margin's running sum and count (area under the margin), the latest prediction
and the label trained with.  Nothing here talks to the
host: bad labels, bad indices, non-finite rows and duplicate indices are
counted in a small device buffer that the pruner reads asynchronously.

Duplicate indices in one batch: the contract (``reference.step_reference``) is
that the first finite row of an index updates its state, on every device.
Rows claim their sample with an atomic exchange of its stamp; the row that
claims first (whichever program the GPU ran first) updates the state and
leaves the state it read in a per-row scratch buffer; the others count
themselves as duplicates.  A second, one-program launch (``settle_kernel``)
then rewrites each duplicated sample from its lowest row and the saved state,
so the result does not depend on scheduling; without duplicates it reads one
counter and exits.  The launch boundary orders every write of the first
kernel before the second reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import common as K
from .common_tl import (EMB_BATCH, EMB_NONE, EMB_TABLE, ERR_DUP_COUNT, ERR_DUP_VALUE, ERR_INDEX_COUNT, ERR_INDEX_VALUE,
                        ERR_LABEL_COUNT, ERR_LABEL_VALUE, ERR_NONFINITE_COUNT, ERR_NONFINITE_ROW, EXAMPLE_KEY_XOR)
from .reference import StepOutput
from .state import SampleState

# Tile shapes by number of classes: (max C, BLOCK_B, BLOCK_C, BLOCK_D, single pass, num_warps).
# C above the last single-pass size streams in 2048-wide chunks.
# Chosen so that no specialisation spills registers on sm_80/sm_90 (see kernels/aot.py).
TILES = (
    (128, 16, 128, 128, True, 8),
    (1024, 2, 1024, 512, True, 8),  # 8 warps since the label column: 4 spilled 4 bytes (table mode, fp32, sm_80)
    (4096, 1, 4096, 512, True, 8),
    (None, 1, 2048, 512, False, 8),  # H100: 2048 x 8 warps beat 4096 x 8, 1024 x 4 and single 16384-wide passes
)
MAX_CLASSES = K.MAX_CLASSES
LANE_GATHER = tl.constexpr(32)  # chunks whose label-lane column one gather reads (streaming margin)
SETTLE_BLOCK, SETTLE_WARPS = 256, 4  # rows per pass of settle_kernel's one program, and its warps

# The step's per-row scratch for settle_kernel: SCRATCH_SLOTS columns of B values in one 32-bit buffer, read as
# int32 (i) or float32 (f).  Every row leaves its loss, status and cosine; a claimant also leaves the state it
# read, which settle_kernel hands to its sample's lowest row.
SCRATCH_NLL = tl.constexpr(0)  # f: the row's loss (the score's update)
SCRATCH_SCORE = tl.constexpr(1)  # f: the score the claimant read
SCRATCH_CONSISTENCY = tl.constexpr(2)  # f: the consistency the claimant read (per-batch embeddings)
SCRATCH_COSINE = tl.constexpr(3)  # f: the row's cosine
SCRATCH_STATUS = tl.constexpr(4)  # i: ROW_IDLE, ROW_CLAIMED or ROW_DUPLICATE
SCRATCH_VISITS = tl.constexpr(5)  # i: the visit count the claimant read
SCRATCH_MARGIN_SUM = tl.constexpr(6)  # f: the margin sum the claimant read
SCRATCH_SLOTS = 7
ROW_IDLE = tl.constexpr(0)  # updates nothing (padding, bad or ignored row, non-finite loss)
ROW_CLAIMED = tl.constexpr(1)  # the first row to claim its sample: updated it
ROW_DUPLICATE = tl.constexpr(2)  # its sample was claimed by another row of the batch


@dataclass(frozen=True)
class StepConfig:
    """One compiled specialisation's constexprs and launch options."""

    BLOCK_B: int
    BLOCK_C: int
    BLOCK_D: int
    SINGLE: bool
    num_warps: int


def step_config(num_classes: int) -> StepConfig:
    for max_c, bb, bc, bd, single, warps in TILES:
        if max_c is None or num_classes <= max_c:
            return StepConfig(bb, bc, bd, single, warps)
    raise AssertionError("unreachable")


def vector_width(dtype: torch.dtype) -> int:
    """Elements per 16-byte vector load."""
    return 16 // torch.empty((), dtype=dtype).element_size()


@triton.jit
def _col_mask(cols, C, VEC: tl.constexpr):
    # Written in whole vectors so the compiler can prove 16-byte alignment.
    if VEC > 1:
        return (cols // VEC) < (C // VEC)
    else:
        return cols < C


@triton.jit
def _record_error(err_ptr, count_slot: tl.constexpr, value_slot: tl.constexpr, bad, values):
    """Count ``bad`` rows and keep the smallest offending value (order-independent: see common.example_key)."""
    cnt = tl.sum(bad.to(tl.int64), axis=0)
    if cnt > 0:
        tl.atomic_add(err_ptr + count_slot, cnt, sem="relaxed")
        key = (values.to(tl.int64) ^ EXAMPLE_KEY_XOR).to(tl.uint64, bitcast=True)
        tl.atomic_max(err_ptr.to(tl.pointer_type(tl.uint64)) + value_slot, tl.max(tl.where(bad, key, 0), axis=0),
                      sem="relaxed")


@triton.jit
def _cosine_rows(emb_ptr, text_ptr, e_rows, t_rows, need, D, BLOCK_D: tl.constexpr, length: tl.constexpr):
    """cos(emb row, text row) for each of ``length`` rows where ``need``; norms clamped at 1e-8."""
    dot = tl.zeros([length], tl.float32)
    ee = tl.zeros([length], tl.float32)
    tt = tl.zeros([length], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        dm = need[:, None] & (dcols < D)[None, :]
        ev = tl.load(emb_ptr + e_rows[:, None] + dcols[None, :], mask=dm, other=0.0).to(tl.float32)
        tv = tl.load(text_ptr + t_rows[:, None] + dcols[None, :], mask=dm, other=0.0).to(tl.float32)
        dot += tl.sum(ev * tv, axis=1)
        ee += tl.sum(ev * ev, axis=1)
        tt += tl.sum(tv * tv, axis=1)
    return dot / (tl.maximum(tl.sqrt(ee), 1e-8) * tl.maximum(tl.sqrt(tt), 1e-8))


@triton.jit(do_not_specialize=["B", "step_id"])
def settle_kernel(indices_ptr, labels_ptr, row_margin_ptr, row_pred_ptr,
                  scores_ptr, consistency_ptr, stamp_ptr, margin_sum_ptr, pred_ptr, label_ptr,
                  scratch_i_ptr, scratch_f_ptr, dups_ptr, B, step_id, ema, EMB_MODE: tl.constexpr, FIX: tl.constexpr):
    """One program, after ``fused_step_kernel``: when the batch had duplicates, each duplicated sample's state
    becomes the update of its lowest row from the state its first claimant read, as if only that row had run.

    O(B) in passes of FIX rows separated by barriers: the duplicated samples' stamps are marked, then hold
    the lowest updating row (an atomic max of -2 - row), the claimant's saved state goes to that row, which
    writes the update (also when it is the claimant: the value must come from one piece of compiled code, as the
    compiler may contract ``ema * s + (1 - ema) * nll`` differently in each kernel), and the stamps are
    restored.  Data that other threads change is read at L2 (``.cg``).
    """
    if tl.load(dups_ptr) > 0:
        _settle(indices_ptr, labels_ptr, row_margin_ptr, row_pred_ptr, scores_ptr, consistency_ptr, stamp_ptr,
                margin_sum_ptr, pred_ptr, label_ptr, scratch_i_ptr, scratch_f_ptr, B, step_id, ema, EMB_MODE, FIX)
        tl.debug_barrier()
        tl.store(dups_ptr, 0)  # zero again for the next step


@triton.jit
def _row_status(scratch_i_ptr, rr, B):
    """Rows ``rr``'s ROW_* status in the step's scratch (ROW_IDLE past the batch), read at L2."""
    return tl.load(scratch_i_ptr + SCRATCH_STATUS * B + rr, mask=rr < B, other=ROW_IDLE, cache_modifier=".cg")


@triton.jit
def _settle(indices_ptr, labels_ptr, row_margin_ptr, row_pred_ptr, scores_ptr, consistency_ptr, stamp_ptr,
            margin_sum_ptr, pred_ptr, label_ptr, scratch_i_ptr, scratch_f_ptr, B, step_id, ema,
            EMB_MODE: tl.constexpr, FIX: tl.constexpr):
    MARK = -2147483648
    for r0 in range(0, B, FIX):  # 1: mark every duplicated sample
        rr = r0 + tl.arange(0, FIX)
        dup = _row_status(scratch_i_ptr, rr, B) == ROW_DUPLICATE
        n = tl.load(indices_ptr + rr, mask=dup, other=0).to(tl.int64)
        tl.store(stamp_ptr + n, tl.full([FIX], MARK, tl.int32), mask=dup)
    tl.debug_barrier()
    for r0 in range(0, B, FIX):  # 2: a marked sample's stamp becomes -2 - (its lowest updating row)
        rr = r0 + tl.arange(0, FIX)
        upd = _row_status(scratch_i_ptr, rr, B) > ROW_IDLE  # claimed or duplicate
        n = tl.load(indices_ptr + rr, mask=upd, other=0).to(tl.int64)
        marked = upd & (tl.load(stamp_ptr + n, mask=upd, other=0, cache_modifier=".cg") < 0)
        tl.atomic_max(stamp_ptr + n, -2 - rr, mask=marked, sem="relaxed")
    tl.debug_barrier()
    for r0 in range(0, B, FIX):  # 3: a claimant that is not its sample's lowest row hands its saved state on
        rr = r0 + tl.arange(0, FIX)
        claimed = _row_status(scratch_i_ptr, rr, B) == ROW_CLAIMED
        n = tl.load(indices_ptr + rr, mask=claimed, other=0).to(tl.int64)
        held = tl.load(stamp_ptr + n, mask=claimed, other=0, cache_modifier=".cg")
        low = -2 - tl.where(held < 0, held, -2)  # a marked stamp holds -2 - row; test the sign before subtracting
        hand = claimed & (held < 0) & (low != rr)
        low = tl.where(hand, low, 0)
        score_read = scratch_f_ptr + SCRATCH_SCORE * B
        tl.store(score_read + low, tl.load(score_read + rr, mask=hand, cache_modifier=".cg"), mask=hand)
        cons_read = scratch_f_ptr + SCRATCH_CONSISTENCY * B
        tl.store(cons_read + low, tl.load(cons_read + rr, mask=hand, cache_modifier=".cg"), mask=hand)
        visits_read = scratch_i_ptr + SCRATCH_VISITS * B
        tl.store(visits_read + low, tl.load(visits_read + rr, mask=hand, cache_modifier=".cg"), mask=hand)
        msum_read = scratch_f_ptr + SCRATCH_MARGIN_SUM * B
        tl.store(msum_read + low, tl.load(msum_read + rr, mask=hand, cache_modifier=".cg"), mask=hand)
    tl.debug_barrier()
    for r0 in range(0, B, FIX):  # 4: each duplicated sample's lowest row writes its update, claimant or not:
        rr = r0 + tl.arange(0, FIX)  # this code computes every duplicated sample's value (FMA contraction may
        upd = _row_status(scratch_i_ptr, rr, B) > ROW_IDLE  # differ)
        n = tl.load(indices_ptr + rr, mask=upd, other=0).to(tl.int64)
        win = upd & (tl.load(stamp_ptr + n, mask=upd, other=0, cache_modifier=".cg") == -2 - rr)
        first = tl.load(scratch_i_ptr + SCRATCH_VISITS * B + rr, mask=win, other=1, cache_modifier=".cg") == 0
        s_pre = tl.load(scratch_f_ptr + SCRATCH_SCORE * B + rr, mask=win, other=0.0, cache_modifier=".cg")
        nll = tl.load(scratch_f_ptr + SCRATCH_NLL * B + rr, mask=win, other=0.0, cache_modifier=".cg")
        tl.store(scores_ptr + n, tl.where(first, nll, ema * s_pre + (1.0 - ema) * nll), mask=win)
        ms_pre = tl.load(scratch_f_ptr + SCRATCH_MARGIN_SUM * B + rr, mask=win, other=0.0, cache_modifier=".cg")
        tl.store(margin_sum_ptr + n, ms_pre + tl.load(row_margin_ptr + rr, mask=win, other=0.0), mask=win)
        tl.store(pred_ptr + n, tl.load(row_pred_ptr + rr, mask=win, other=-1), mask=win)
        tl.store(label_ptr + n, tl.load(labels_ptr + rr, mask=win, other=0).to(tl.int32), mask=win)
        if EMB_MODE != EMB_NONE:
            cos = tl.load(scratch_f_ptr + SCRATCH_COSINE * B + rr, mask=win, other=0.0, cache_modifier=".cg")
            if EMB_MODE == EMB_TABLE:
                need = win & first  # a fixed table's cosine is cached on the first visit only
            else:
                need = win
                c_pre = tl.load(scratch_f_ptr + SCRATCH_CONSISTENCY * B + rr, mask=win, other=0.0, cache_modifier=".cg")
                cos = tl.where(first, cos, ema * c_pre + (1.0 - ema) * cos)
            tl.store(consistency_ptr + n, cos, mask=need)
    tl.debug_barrier()
    for r0 in range(0, B, FIX):  # 5: the duplicated samples' stamps say "updated in this step" again
        rr = r0 + tl.arange(0, FIX)
        dup = _row_status(scratch_i_ptr, rr, B) == ROW_DUPLICATE
        n = tl.load(indices_ptr + rr, mask=dup, other=0).to(tl.int64)
        tl.store(stamp_ptr + n, tl.full([FIX], 0, tl.int32) + step_id, mask=dup)


# Integer arguments are never specialised on their values (B = 1, C % 16, ...): the launcher
# chooses every specialisation explicitly through the constexprs, which is what AOT builds.
@triton.jit(do_not_specialize=["B", "C", "N", "D", "stride_l", "stride_g", "stride_e", "stride_t",
                               "step_id", "write_grad", "ignore_index"])
def fused_step_kernel(
    logits_ptr, grad_ptr, labels_ptr, indices_ptr, emb_ptr, text_ptr,
    # the SampleState columns, in state.FIELDS order, then its error counters
    scores_ptr, visits_ptr, consistency_ptr, weights_ptr, stamp_ptr, margin_sum_ptr, margin_count_ptr, pred_ptr,
    label_ptr, err_ptr,
    ce_ptr, contrib_ptr, correct_ptr, row_margin_ptr, row_pred_ptr, scratch_i_ptr, scratch_f_ptr, dups_ptr,
    B, C, N, D, stride_l, stride_g, stride_e, stride_t,
    step_id, write_grad, ignore_index, ema, scale, smoothing,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr, VEC: tl.constexpr, EMB_MODE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_in = rows < B
    rows64 = rows.to(tl.int64)

    # Labels and indices in 64 bits whatever their stored type: they scale row strides below.
    y = tl.load(labels_ptr + rows64, mask=row_in, other=0).to(tl.int64)
    n = tl.load(indices_ptr + rows64, mask=row_in, other=0).to(tl.int64)
    ignored = y == ignore_index
    bad_label = row_in & (~ignored) & ((y < 0) | (y >= C))
    bad_index = row_in & ((n < 0) | (n >= N))
    _record_error(err_ptr, ERR_LABEL_COUNT, ERR_LABEL_VALUE, bad_label, y)
    _record_error(err_ptr, ERR_INDEX_COUNT, ERR_INDEX_VALUE, bad_index, n)
    ok = row_in & (~ignored) & (~bad_label) & (~bad_index)
    y = tl.where(ok, y, 0)
    n = tl.where(ok, n, 0)
    y32 = y.to(tl.int32)
    w = tl.load(weights_ptr + n, mask=ok, other=0.0)

    l_rows = tl.multiple_of(rows64 * stride_l, VEC)
    g_rows = tl.multiple_of(rows64 * stride_g, VEC)
    y2 = y32[:, None]
    inv_c = 1.0 / C
    gscale = w * scale
    NEG_INF = float("-inf")

    # ---- pass over the logits: logsumexp, target logit, row sum, argmax ----
    if SINGLE:
        cols = tl.arange(0, BLOCK_C)
        m2 = row_in[:, None] & _col_mask(cols, C, VEC)[None, :]
        x = tl.load(logits_ptr + l_rows[:, None] + cols[None, :], mask=m2, other=NEG_INF).to(tl.float32)
        is_y = cols[None, :] == y2
        mx, arg = tl.max(x, axis=1, return_indices=True, return_indices_tie_break_left=True)  # one reduction
        z_y = tl.sum(tl.where(is_y, x, 0.0), axis=1)  # from registers: the gradient may overwrite the logits
        z_other = tl.max(tl.where(is_y, NEG_INF, x), axis=1)  # the runner-up to the label
        mx_safe = tl.where(mx == NEG_INF, 0.0, mx)
        e = tl.exp(x - mx_safe[:, None])
        denom = tl.sum(e, axis=1)
        lse = mx_safe + tl.log(denom)
        z_sum = tl.sum(tl.where(m2, x, 0.0), axis=1)
        if write_grad:
            p = e / denom[:, None]
            g = (p - smoothing * inv_c - tl.where(is_y, 1.0 - smoothing, 0.0)) * gscale[:, None]
            g = tl.where(ok[:, None], g, 0.0)
            tl.store(grad_ptr + g_rows[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=m2)
    else:
        # Streaming: each lane keeps its own partial sum of exp, row sum and (max, first column), so a chunk
        # costs one block-wide reduction (the running maximum) instead of one per quantity; the target logit
        # is one load.
        z_y = tl.load(logits_ptr + l_rows + y, mask=ok, other=0.0).to(tl.float32)
        m = tl.full([BLOCK_B], NEG_INF, tl.float32)
        d_lane = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        s_lane = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
        best = tl.full([BLOCK_B, BLOCK_C], NEG_INF, tl.float32)
        at = tl.zeros([BLOCK_B, BLOCK_C], tl.int32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m2 = row_in[:, None] & _col_mask(cols, C, VEC)[None, :]
            x = tl.load(logits_ptr + l_rows[:, None] + cols[None, :], mask=m2, other=NEG_INF).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            d_lane = d_lane * tl.exp(m - m_safe)[:, None] + tl.exp(x - m_safe[:, None])
            m = m_new
            s_lane += tl.where(m2, x, 0.0)
            better = x > best  # strict: a lane keeps its first column of a tie
            best = tl.where(better, x, best)
            at = tl.where(better, cols[None, :], at)
        mx_safe = tl.where(m == NEG_INF, 0.0, m)
        lse = mx_safe + tl.log(tl.sum(d_lane, axis=1))
        z_sum = tl.sum(s_lane, axis=1)
        top = tl.max(best, axis=1)
        arg = tl.min(tl.where(best == top[:, None], at, 2147483647), axis=1)  # first column of the maximum
        # The runner-up to the label, from what the lanes already hold: every lane's maximum except where
        # that maximum is the label, plus the label's own lane without it (one strided gather, ~C / BLOCK_C
        # values), instead of a masked maximum over every logit.
        z_other = tl.max(tl.where(at == y2, NEG_INF, best), axis=1)
        y_lane = y % BLOCK_C
        for k0 in range(0, C, BLOCK_C * LANE_GATHER):
            g_cols = k0 + y_lane[:, None] + tl.arange(0, LANE_GATHER)[None, :] * BLOCK_C
            g_mask = ok[:, None] & (g_cols < C) & (g_cols != y[:, None])
            rest = tl.load(logits_ptr + l_rows[:, None] + g_cols, mask=g_mask, other=NEG_INF).to(tl.float32)
            z_other = tl.maximum(z_other, tl.max(rest, axis=1))
        if write_grad:
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                m2 = row_in[:, None] & _col_mask(cols, C, VEC)[None, :]
                x = tl.load(logits_ptr + l_rows[:, None] + cols[None, :], mask=m2, other=NEG_INF).to(tl.float32)
                p = tl.exp(x - lse[:, None])
                g = (p - smoothing * inv_c - tl.where(cols[None, :] == y2, 1.0 - smoothing, 0.0)) * gscale[:, None]
                g = tl.where(ok[:, None], g, 0.0)
                tl.store(grad_ptr + g_rows[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=m2)

    # ---- per-sample loss ----
    nll = lse - z_y
    ce = tl.where(smoothing > 0, lse - (1.0 - smoothing) * z_y - smoothing * (z_sum * inv_c), nll)
    finite = (ce == ce) & (tl.abs(ce) != float("inf"))
    _record_error(err_ptr, ERR_NONFINITE_COUNT, ERR_NONFINITE_ROW, ok & (~finite), rows64)
    tl.store(ce_ptr + rows64, tl.where(ok, ce, 0.0), mask=row_in)
    tl.store(contrib_ptr + rows64, tl.where(ok, w * ce * scale, 0.0), mask=row_in)
    correct = ok & finite & (arg == y32)
    tl.store(correct_ptr + rows64, correct.to(tl.int8), mask=row_in)
    margin = tl.where(ok & finite, z_y - z_other, 0.0)
    tl.store(row_margin_ptr + rows64, margin, mask=row_in)
    tl.store(row_pred_ptr + rows64, tl.where(ok & finite, arg, -1), mask=row_in)

    # ---- state update: the first row to claim a sample updates it; duplicates are settled last ----
    # Each row also leaves in scratch what settle_kernel needs for duplicates (see SCRATCH_NLL): its loss,
    # status and cosine, and the state its claimant read.
    upd = ok & finite
    old_stamp = tl.atomic_xchg(stamp_ptr + n, step_id, mask=upd, sem="relaxed")
    dup = upd & (old_stamp == step_id)
    _record_error(err_ptr, ERR_DUP_COUNT, ERR_DUP_VALUE, dup, n)
    claimed = upd & (~dup)
    status_at = scratch_i_ptr + SCRATCH_STATUS * B + rows64
    tl.store(status_at, tl.where(dup, ROW_DUPLICATE, tl.where(claimed, ROW_CLAIMED, ROW_IDLE)), mask=row_in)
    # the model's evidence: area under the margin (sum and count), latest prediction, label trained with
    ms_old = tl.load(margin_sum_ptr + n, mask=claimed, other=0.0)
    tl.store(scratch_f_ptr + SCRATCH_MARGIN_SUM * B + rows64, ms_old, mask=claimed)
    tl.store(margin_sum_ptr + n, ms_old + margin, mask=claimed)
    tl.store(margin_count_ptr + n, tl.load(margin_count_ptr + n, mask=claimed, other=0) + 1, mask=claimed)
    tl.store(pred_ptr + n, arg, mask=claimed)
    tl.store(label_ptr + n, y32, mask=claimed)
    tl.store(scratch_f_ptr + SCRATCH_NLL * B + rows64, nll, mask=row_in)
    v = tl.load(visits_ptr + n, mask=claimed, other=0)
    tl.store(scratch_i_ptr + SCRATCH_VISITS * B + rows64, v, mask=claimed)
    tl.store(visits_ptr + n, v + 1, mask=claimed)
    first = v == 0
    s_old = tl.load(scores_ptr + n, mask=claimed & (~first), other=0.0)
    tl.store(scratch_f_ptr + SCRATCH_SCORE * B + rows64, s_old, mask=claimed)
    tl.store(scores_ptr + n, tl.where(first, nll, ema * s_old + (1.0 - ema) * nll), mask=claimed)
    if EMB_MODE != EMB_NONE:
        if EMB_MODE == EMB_TABLE:
            need = claimed & first  # fixed table: computed once, on the first visit
            e_rows = n * stride_e
        else:
            need = claimed
            e_rows = rows64 * stride_e
        cos = _cosine_rows(emb_ptr, text_ptr, e_rows, y * stride_t, need | dup, D, BLOCK_D, BLOCK_B)
        tl.store(scratch_f_ptr + SCRATCH_COSINE * B + rows64, cos, mask=row_in)
        if EMB_MODE == EMB_BATCH:
            c_old = tl.load(consistency_ptr + n, mask=claimed & (~first), other=0.0)
            tl.store(scratch_f_ptr + SCRATCH_CONSISTENCY * B + rows64, c_old, mask=claimed)
            cos = tl.where(first, cos, ema * c_old + (1.0 - ema) * cos)
        tl.store(consistency_ptr + n, cos, mask=need)
    n_dup = tl.sum(dup.to(tl.int32), axis=0)
    if n_dup > 0:
        tl.atomic_add(dups_ptr, n_dup, sem="relaxed")


@triton.jit(do_not_specialize=["B", "C", "stride_g"])
def scale_grad_kernel(grad_ptr, go_ptr, B, C, stride_g, BLOCK: tl.constexpr):
    """grad *= grad_output, skipped on the device when grad_output == 1 (the usual case).

    A fixed number of programs walk the (row, chunk) tiles, so the skipped case costs microseconds, not one
    program per tile."""
    go = tl.load(go_ptr).to(tl.float32)
    if go != 1.0:
        n_chunks = tl.cdiv(C, BLOCK)
        for t in range(tl.program_id(0), B * n_chunks, tl.num_programs(0)):
            row = (t // n_chunks).to(tl.int64)
            cols = (t % n_chunks) * BLOCK + tl.arange(0, BLOCK)
            ptrs = grad_ptr + row * stride_g + cols
            g = tl.load(ptrs, mask=cols < C, other=0.0).to(tl.float32)
            tl.store(ptrs, (g * go).to(grad_ptr.dtype.element_ty), mask=cols < C)


SCALE_BLOCK = 1024
SCALE_PROGRAMS = 1024  # enough to stream at full bandwidth when scaling, few enough to exit in microseconds


def launch_scale_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    B, C = grad.shape
    tiles = B * triton.cdiv(C, SCALE_BLOCK)
    if tiles == 0:
        return grad
    scale_grad_kernel[(min(tiles, SCALE_PROGRAMS),)](grad, grad_output, B, C, grad.stride(0), BLOCK=SCALE_BLOCK,
                                                     num_warps=4)
    return grad


def _aligned(t: torch.Tensor, vec: int) -> bool:
    return t.data_ptr() % 16 == 0 and t.stride(0) % vec == 0


def launch_step(
    logits: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    *,
    state: SampleState,
    step_id: int,
    ema: float,
    scale: float,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    emb_mode: int = K.EMB_NONE,
    emb: torch.Tensor | None = None,
    text: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    ce: torch.Tensor | None = None,
    contrib: torch.Tensor | None = None,
    correct: torch.Tensor | None = None,
) -> StepOutput:
    """Launch the fused step; same contract as ``reference.step_reference``.

    ``logits`` must have unit column stride (any row stride); ``grad`` likewise
    and may alias ``logits``.  Steps that share a ``state`` must be
    stream-ordered (its ``dups`` counter carries between the step's two
    launches).  Inputs are assumed validated by the caller for shape, dtype and
    device; values are checked on the device.
    """
    K.check_step_id(step_id)
    B, C = logits.shape
    cfg = step_config(C)
    vec = vector_width(logits.dtype)
    write_grad = grad is not None
    g = grad if write_grad else logits  # never written when write_grad == 0
    if not (C % vec == 0 and _aligned(logits, vec) and _aligned(g, vec)):
        vec = 1
    dev = logits.device
    ce = torch.empty(B, dtype=torch.float32, device=dev) if ce is None else ce
    contrib = torch.empty(B, dtype=torch.float32, device=dev) if contrib is None else contrib
    correct = torch.empty(B, dtype=torch.int8, device=dev) if correct is None else correct
    margin = torch.empty(B, dtype=torch.float32, device=dev)
    pred = torch.empty(B, dtype=torch.int32, device=dev)
    scratch = torch.empty(SCRATCH_SLOTS * B, dtype=torch.int32, device=dev)  # per-row state for settle_kernel
    cols = state.columns()
    if emb_mode == K.EMB_NONE:
        emb = text = state.scores  # unused placeholders
        D, stride_e, stride_t = 1, 0, 0
    else:
        D, stride_e, stride_t = emb.shape[1], emb.stride(0), text.stride(0)
    scratch_f = scratch.view(torch.float32)
    grid = (triton.cdiv(B, cfg.BLOCK_B),)
    fused_step_kernel[grid](
        logits, g, labels, indices, emb, text,
        *cols.values(), state.errors,
        ce, contrib, correct, margin, pred, scratch, scratch_f, state.dups,
        B, C, state.num_samples, D, logits.stride(0), g.stride(0), stride_e, stride_t,
        step_id, int(write_grad), ignore_index, ema, scale, label_smoothing,
        BLOCK_B=cfg.BLOCK_B, BLOCK_C=cfg.BLOCK_C, BLOCK_D=cfg.BLOCK_D, SINGLE=cfg.SINGLE, VEC=vec,
        EMB_MODE=emb_mode, num_warps=cfg.num_warps,
    )
    settle_kernel[(1,)](indices, labels, margin, pred, state.scores, state.consistency, state.stamp,
                        state.margin_sum, state.pred, state.label, scratch, scratch_f, state.dups, B, step_id, ema,
                        EMB_MODE=emb_mode, FIX=SETTLE_BLOCK, num_warps=SETTLE_WARPS)
    return StepOutput(ce=ce, contrib=contrib, correct=correct.view(torch.bool), margin=margin, pred=pred, grad=grad)
