"""The fused step kernel (Triton interpreter on CPU) against the fp64 PyTorch reference."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import clone_state, make_state
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastprune.kernels import common as K
from fastprune.kernels.reference import step_reference
from fastprune.kernels import step as step_module
from fastprune.kernels.step import launch_scale_grad, launch_step, step_config


@contextlib.contextmanager
def program_order(order):
    """Run the interpreter's programs in another order (``order(n)`` lists program ids), as a GPU may."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = type(builder).set_grid_idx

    def set_grid_idx(self, x, y, z):
        original(self, order(self.grid_dim[0])[x], y, z)

    type(builder).set_grid_idx = set_grid_idx
    try:
        yield
    finally:
        type(builder).set_grid_idx = original


def reversed_programs(n):
    return list(range(n))[::-1]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def random_batch(B, C, N, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, C, generator=g) * scale + 0.1).to(dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    indices = torch.randperm(N, generator=g)[:B]
    return logits, labels, indices


def run_both(logits, labels, indices, state, *, grad=True, **kw):
    """Run kernel and fp64 reference on copies of ``state``; returns both outputs and states."""
    s_k, s_r = clone_state(state), clone_state(state)
    g_k = torch.full_like(logits, float("nan")) if grad else None  # poisoned: every element must be written
    g_r = torch.empty(logits.shape, dtype=torch.float64) if grad else None
    B = logits.shape[0]
    ce = torch.full((B,), float("nan"))
    contrib = torch.full((B,), float("nan"))
    correct = torch.full((B,), 7, dtype=torch.int8)
    kw.setdefault("step_id", 0)
    kw.setdefault("ema", 0.9)
    kw.setdefault("scale", 1.0 / B)
    out_k = launch_step(logits, labels, indices, grad=g_k, ce=ce, contrib=contrib, correct=correct, state=s_k, **kw)
    out_r = step_reference(logits, labels, indices, grad=g_r, compute_dtype=torch.float64, state=s_r, **kw)
    return out_k, out_r, s_k, s_r


def assert_close_rel(a, b, tol, atol=1e-12):
    """|a - b| <= tol * max|b| + atol, with a fully written (finite) ``a``."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "kernel left non-finite values (unwritten poisoned output?)"
    err = (a - b).abs().max().item()
    ref = max(b.abs().max().item(), 1e-30)
    assert err <= tol * ref + atol, f"max abs err {err:.3g} vs max |ref| {ref:.3g}"


def loss_atol(logits):
    """fp32 rounding of the terms that cancel in the loss (lse - z_y): a few ulps of the logits' size."""
    return 1e-6 * (1.0 + logits.double().abs().max().item())


def grad_atol(grad):
    """fp32 rounding of softmax - onehot near 1 (a few ulps of 1), times the largest weight / B (< 1.5 / B)."""
    return 1e-6 * 1.5 / grad.shape[0]


def assert_step_matches(out_k, out_r, s_k, s_r, dtype, logits=None):
    atol = loss_atol(logits) if logits is not None else 1e-12
    assert_close_rel(out_k.ce, out_r.ce, 1e-5, atol)
    assert_close_rel(out_k.contrib, out_r.contrib, 1e-5, atol)
    assert torch.equal(out_k.correct, out_r.correct)
    assert_close_rel(out_k.margin, out_r.margin, 1e-6, atol)
    assert torch.equal(out_k.pred, out_r.pred)
    if out_r.grad is not None:
        assert_close_rel(out_k.grad, out_r.grad, GRAD_TOL[dtype], grad_atol(out_r.grad))
    assert_close_rel(s_k.scores, s_r.scores, 1e-5, atol)
    assert_close_rel(s_k.consistency, s_r.consistency, 1e-5)
    assert torch.equal(s_k.visits, s_r.visits)
    assert torch.equal(s_k.stamp, s_r.stamp)
    assert torch.equal(s_k.errors, s_r.errors)  # counts and examples
    finite = torch.isfinite(s_r.margin_sum)  # +inf with one class
    assert torch.equal(torch.isfinite(s_k.margin_sum), finite) and torch.equal(s_k.margin_sum[~finite],
                                                                             s_r.margin_sum[~finite])
    if finite.any():
        assert_close_rel(s_k.margin_sum[finite], s_r.margin_sum[finite], 1e-6, atol)
    for name in ("margin_count", "pred", "label"):
        assert torch.equal(getattr(s_k, name), getattr(s_r, name)), name


# Shapes: B=1, C not a power of two, C in each tile, C larger than one chunk (two passes), odd D.
SHAPES = [(1, 10), (7, 100), (5, 1000), (3, 1003), (2, 4096), (3, 4099), (2, 9000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C", SHAPES)
def test_step_matches_reference(B, C, dtype):
    N = 3 * B + 5
    logits, labels, indices = random_batch(B, C, N, dtype, seed=B * C)
    out_k, out_r, s_k, s_r = run_both(logits, labels, indices, make_state(N, seed=C))
    assert_step_matches(out_k, out_r, s_k, s_r, dtype, logits)
    assert (s_k.visits[indices] == 1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", [K.EMB_TABLE, K.EMB_BATCH], ids=["table", "batch"])
@pytest.mark.parametrize("B,C,D", [(1, 10, 7), (5, 300, 33), (3, 5000, 129)])
def test_step_consistency(B, C, D, mode, dtype):
    N = 2 * B + 3
    logits, labels, indices = random_batch(B, C, N, dtype, seed=D)
    g = torch.Generator().manual_seed(D)
    emb = torch.randn(N if mode == K.EMB_TABLE else B, D, generator=g).to(torch.float16)
    text = torch.randn(C, D, generator=g).to(torch.float16)
    out_k, out_r, s_k, s_r = run_both(logits, labels, indices, make_state(N), emb_mode=mode, emb=emb, text=text)
    assert_step_matches(out_k, out_r, s_k, s_r, dtype, logits)
    e = emb[indices] if mode == K.EMB_TABLE else emb
    expected = F.cosine_similarity(e.double(), text[labels].double(), dim=1)
    torch.testing.assert_close(s_k.consistency[indices].double(), expected, atol=1e-5, rtol=1e-5)


def test_largest_class_count():
    """C = 262,144 (64 chunks, two passes) with int64 offsets, in bf16."""
    B, C, N = 2, 1 << 18, 5
    logits, labels, indices = random_batch(B, C, N, torch.bfloat16)
    out_k, out_r, s_k, s_r = run_both(logits, labels, indices, make_state(N))
    assert_step_matches(out_k, out_r, s_k, s_r, torch.bfloat16, logits)


def test_table_consistency_cached_after_first_visit():
    B, C, D, N = 4, 12, 9, 10
    logits, labels, indices = random_batch(B, C, N, torch.float32)
    emb, text = torch.randn(N, D), torch.randn(C, D)
    state = make_state(N)
    launch_step(logits, labels, indices, state=state, step_id=0, ema=0.5, scale=0.25, emb_mode=K.EMB_TABLE, emb=emb,
                text=text)
    first = state.consistency.clone()
    emb.mul_(-1)  # a changed table is not re-read for samples already visited
    launch_step(logits, labels, indices, state=state, step_id=1, ema=0.5, scale=0.25, emb_mode=K.EMB_TABLE, emb=emb,
                text=text)
    assert torch.equal(state.consistency, first)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ema_over_several_steps(dtype):
    B, C, N = 6, 37, 9
    state_k, state_r = make_state(N), make_state(N)
    g = torch.Generator().manual_seed(5)
    for step in range(5):
        logits = torch.randn(B, C, generator=g).to(dtype) * 2
        labels = torch.randint(0, C, (B,), generator=g)
        indices = torch.randperm(N, generator=g)[:B]
        emb = torch.randn(B, 8, generator=g)
        text = torch.randn(C, 8, generator=g)
        kw = dict(step_id=step, ema=0.8, scale=1 / B, emb_mode=K.EMB_BATCH, emb=emb, text=text)
        launch_step(logits, labels, indices, state=state_k, **kw)
        step_reference(logits, labels, indices, state=state_r, compute_dtype=torch.float64, **kw)
    assert state_k.visits.max() > 1
    assert_close_rel(state_k.scores, state_r.scores, 1e-5)
    assert_close_rel(state_k.consistency, state_r.consistency, 1e-5)
    assert torch.equal(state_k.visits, state_r.visits)


def test_ema_formula():
    """s <- ce on the first visit, then s <- ema * s + (1 - ema) * ce."""
    C, N = 5, 3
    state = make_state(N)
    idx = torch.tensor([1])
    ces = []
    for step in range(3):
        logits = torch.randn(1, C)
        y = torch.tensor([step % C])
        launch_step(logits, y, idx, state=state, step_id=step, ema=0.75, scale=1.0)
        ces.append(F.cross_entropy(logits, y).item())
    expected = ces[0]
    for ce in ces[1:]:
        expected = 0.75 * expected + 0.25 * ce
    assert state.scores[1].item() == pytest.approx(expected, rel=1e-5)
    assert state.visits.tolist() == [0, 3, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("C", [10, 1000, 5001])
def test_gradient_matches_autograd(C, smoothing, dtype):
    """Gradient and loss equal autograd of sum_i w_i * CE_i / B with PyTorch's own cross_entropy."""
    B, N = 4, 11
    logits, labels, indices = random_batch(B, C, N, dtype, seed=C)
    labels[1] = -100  # ignored row
    state = make_state(N)
    grad = torch.empty_like(logits)
    out = launch_step(logits, labels, indices, state=state, step_id=0, ema=0.9, scale=1 / B,
                      label_smoothing=smoothing, grad=grad)
    x = logits.double().requires_grad_()
    per = F.cross_entropy(x, labels, reduction="none", label_smoothing=smoothing, ignore_index=-100)
    loss = (per * state.weights[indices].double()).sum() / B
    loss.backward()
    assert out.contrib.sum().item() == pytest.approx(loss.item(), rel=1e-5)
    assert_close_rel(grad, x.grad, GRAD_TOL[dtype], grad_atol(grad))
    assert (grad[1] == 0).all() and out.ce[1] == 0 and not out.correct[1]
    assert state.visits[indices[1]] == 0, "ignored rows leave the state alone"


def test_score_is_plain_ce_under_label_smoothing():
    logits, labels, indices = random_batch(3, 20, 5, torch.float32)
    state = make_state(5)
    out = launch_step(logits, labels, indices, state=state, step_id=0, ema=0.9, scale=1 / 3, label_smoothing=0.2)
    torch.testing.assert_close(state.scores[indices], F.cross_entropy(logits, labels, reduction="none"))
    torch.testing.assert_close(out.ce, F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.2))


def test_in_place_gradient_and_row_stride():
    """Logits with a row stride larger than C; gradient written over them."""
    B, C, N = 5, 96, 8
    big = torch.randn(B, C + 40).to(torch.bfloat16)
    logits = big[:, 8:8 + C]
    assert logits.stride(0) == C + 40
    labels = torch.randint(0, C, (B,))
    indices = torch.arange(B)
    expected_out, _, _, _ = run_both(logits.clone(), labels, indices, make_state(N))
    before = big.clone()
    launch_step(logits, labels, indices, state=make_state(N), step_id=0, ema=0.9, scale=1 / B, grad=logits)
    torch.testing.assert_close(logits, expected_out.grad)
    assert torch.equal(big[:, :8], before[:, :8]) and torch.equal(big[:, 8 + C:], before[:, 8 + C:])


def test_correct_flag_is_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 3.0, 0.0], [0.0, 0.0, 9.0]])
    labels = torch.tensor([1, 1, 0])
    out = launch_step(logits, labels, torch.arange(3), state=make_state(3), step_id=0, ema=0.9, scale=1 / 3)
    assert out.correct.tolist() == [True, False, False]  # ties go to the first index, like argmax


@pytest.mark.parametrize("C", [3, 4099])  # one pass; two streaming passes with the values in different chunks
def test_margin_and_prediction(C):
    """margin = z_y - max over the other classes; pred = the first maximal class; rows that update nothing
    report margin 0 and pred -1."""
    far = C - 1  # in the last chunk when C > one chunk
    logits = torch.zeros(6, C)
    logits[0, 1], logits[0, far] = 5.0, 2.0  # label holds the maximum: margin against the runner-up
    logits[1, 0], logits[1, far] = 3.0, 3.0  # a tie: pred is the first, margin 0 for either label
    logits[2, far] = 9.0  # label elsewhere: negative margin
    logits[3, 1] = 4.0  # ignored row
    logits[4, 0] = float("nan")  # non-finite row
    logits[5, 0], logits[5, 1] = -1.0, 7.0
    labels = torch.tensor([1, far, 0, -100, 0, 1])
    out = launch_step(logits, labels, torch.arange(6), state=make_state(6), step_id=0, ema=0.9, scale=1 / 6)
    ref = step_reference(logits, labels, torch.arange(6), state=make_state(6), step_id=0, ema=0.9, scale=1 / 6)
    expected_margin = [3.0, 0.0, -9.0, 0.0, 0.0, 7.0]
    assert out.margin.tolist() == ref.margin.tolist() == expected_margin
    assert out.pred.tolist() == ref.pred.tolist() == [1, 0, far, -1, -1, 1]


def test_margin_runner_up_in_the_label_lane():
    """Streaming: the runner-up found wherever it sits, in the label's own lane of another chunk (read by
    the lane gather, also in its second block of chunks), in another lane, or tied with the label."""
    C, y, lane = 2048 * 33 + 5, 3, 2048  # 34 chunks: the gather walks two blocks of 32
    g = torch.Generator().manual_seed(0)
    logits = -torch.rand(6, C, generator=g)
    logits[:, y] = 10.0
    logits[0, y + 33 * lane], logits[0, 100] = 8.0, 6.0  # same lane, second gather block
    logits[1, y + lane], logits[1, 200] = 7.0, 6.0  # same lane, next chunk
    logits[2, 4000] = 9.0  # another lane
    logits[3, y], logits[3, y + 2 * lane] = 1.0, 5.0  # the label's lane holds a larger logit
    logits[4, y + lane] = 10.0  # a tie in the label's lane
    logits[5, y + 33 * lane] = 12.0  # the maximum itself in the last chunk of the label's lane
    labels = torch.full((6,), y)
    out = launch_step(logits, labels, torch.arange(6), state=make_state(6), step_id=0, ema=0.9, scale=1 / 6)
    ref = step_reference(logits, labels, torch.arange(6), state=make_state(6), step_id=0, ema=0.9, scale=1 / 6)
    assert out.margin.tolist() == ref.margin.tolist() == [2.0, 3.0, 1.0, -4.0, 0.0, -2.0]
    assert out.pred.tolist() == ref.pred.tolist() == [y, y, y, y + 2 * lane, y, y + 33 * lane]


def test_margin_of_a_single_class_is_infinite():
    logits = torch.tensor([[2.0]])
    out = launch_step(logits, torch.tensor([0]), torch.tensor([0]), state=make_state(1), step_id=0, ema=0.9, scale=1.0)
    assert out.margin.item() == float("inf") and out.pred.item() == 0


def test_bad_labels_and_indices_are_recorded_and_left_out():
    B, C, N = 6, 10, 8
    logits, labels, indices = random_batch(B, C, N, torch.float32)
    labels[2], labels[4] = C, -3
    indices[3] = N + 5
    out_k, out_r, s_k, s_r = run_both(logits, labels, indices, make_state(N))
    assert_step_matches(out_k, out_r, s_k, s_r, torch.float32, logits)
    err = s_k.errors.tolist()
    assert err[K.ERR_LABEL_COUNT] == 2 and K.example_value(err[K.ERR_LABEL_VALUE]) == -3  # the smallest
    assert err[K.ERR_INDEX_COUNT] == 1 and K.example_value(err[K.ERR_INDEX_VALUE]) == N + 5
    for row in (2, 3, 4):
        assert (out_k.grad[row] == 0).all() and out_k.ce[row] == 0
    assert s_k.visits.sum() == 3


def test_nonfinite_rows_do_not_poison_scores():
    B, C, N = 4, 50, 6
    logits, labels, indices = random_batch(B, C, N, torch.float32)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    out_k, out_r, s_k, s_r = run_both(logits, labels, indices, make_state(N))
    assert s_k.errors[K.ERR_NONFINITE_COUNT] == 2 and K.example_value(s_k.errors[K.ERR_NONFINITE_ROW]) == 1
    assert torch.isfinite(s_k.scores).all()
    assert s_k.visits[indices[[1, 2]]].tolist() == [0, 0]
    assert s_k.visits[indices[[0, 3]]].tolist() == [1, 1]
    assert not torch.isfinite(out_k.contrib.sum())  # the loss shows the problem, like F.cross_entropy
    torch.testing.assert_close(s_k.scores, s_r.scores)


def test_duplicate_indices_update_once_first_row_wins():
    B, C, N = 6, 30, 10
    logits, labels, _ = random_batch(B, C, N, torch.float32)
    indices = torch.tensor([4, 1, 4, 7, 1, 4])
    out_k, out_r, s_k, s_r = run_both(logits, labels, indices, make_state(N))
    assert_step_matches(out_k, out_r, s_k, s_r, torch.float32, logits)
    assert s_k.errors[K.ERR_DUP_COUNT] == 3
    assert s_k.visits[[1, 4, 7]].tolist() == [1, 1, 1]
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert s_k.scores[4].item() == pytest.approx(ce[0].item(), rel=1e-6)
    assert s_k.scores[1].item() == pytest.approx(ce[1].item(), rel=1e-6)


@pytest.mark.parametrize("mode", [K.EMB_NONE, K.EMB_TABLE, K.EMB_BATCH], ids=["none", "table", "batch"])
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
@pytest.mark.parametrize("B,C", [(9, 1000), (40, 100), (5, 5000)])  # 1, 2 and 16 rows per program
def test_duplicates_do_not_depend_on_program_order(B, C, order, mode):
    """On a GPU any program may claim a duplicated sample first; its first row must still win, bitwise.

    The interpreter runs programs in order, so they are run here reversed or shuffled; with
    duplicates spread over several programs, the update must equal the in-order reference's.
    """
    N = 12
    logits, labels, _ = random_batch(B, C, N, torch.float32, seed=B)
    g = torch.Generator().manual_seed(C)
    indices = torch.randint(0, 6, (B,), generator=g)  # many repeats, across programs and within one
    indices[0] = indices[B - 1]  # the first and the last row share a sample
    labels[B - 1] = (labels[0] + 1) % C  # with another label: the winner's label matters for consistency
    state = make_state(N, seed=1)
    state.visits[indices[0]] = 2  # a sample seen before (EMA) and samples seen for the first time
    state.scores[indices[0]] = 1.25
    state.consistency[indices[0]] = 0.5
    state.margin_sum[indices[0]] = -3.0  # and its evidence so far
    state.margin_count[indices[0]] = 2
    state.pred[indices[0]] = C - 1
    emb = text = None
    if mode != K.EMB_NONE:
        emb = torch.randn(N if mode == K.EMB_TABLE else B, 24, generator=g)
        text = torch.randn(C, 24, generator=g)
    perm = torch.randperm(64, generator=g).tolist()

    def programs(n):
        return reversed_programs(n) if order == "reversed" else [p for p in perm if p < n]

    with program_order(programs):
        out_k, out_r, s_k, s_r = run_both(logits, labels, indices, state, emb_mode=mode, emb=emb, text=text)
    assert_step_matches(out_k, out_r, s_k, s_r, torch.float32, logits)
    assert s_k.errors[K.ERR_DUP_COUNT] == B - indices.unique().numel()
    assert s_k.dups.tolist() == [0], "the step must leave its duplicate counter at zero"


def test_step_state_is_bitwise_the_same_in_any_program_order():
    """The whole state after a few steps with duplicates: in-order and reversed launches agree bitwise."""
    B, C, N = 33, 100, 20
    g = torch.Generator().manual_seed(3)
    runs = []
    for order in (None, reversed_programs):
        state = make_state(N, seed=2)
        with program_order(order) if order else contextlib.nullcontext():
            for step in range(4):
                g.manual_seed(step)
                logits = torch.randn(B, C, generator=g) * 2
                labels = torch.randint(0, C, (B,), generator=g)
                indices = torch.randint(0, N, (B,), generator=g)
                emb = torch.randn(B, 16, generator=g)
                launch_step(logits, labels, indices, state=state, step_id=step, ema=0.7, scale=1 / B,
                            emb_mode=K.EMB_BATCH, emb=emb, text=torch.randn(C, 16, generator=g))
        runs.append(state)
    for key, col in runs[0].columns().items():
        assert torch.equal(col, getattr(runs[1], key)), key
    assert torch.equal(runs[0].errors, runs[1].errors)


def test_int32_labels_and_indices_address_beyond_2_to_the_31():
    """Row offsets (index x row stride) are 64-bit even when labels and indices come as int32.

    The image-embedding table spans more than 2**31 elements; one byte each keeps it at 2 GiB.
    """
    D, stride = 16, 1 << 12
    N = (1 << 31) // stride + 8
    table = torch.empty(N * stride, dtype=torch.uint8).as_strided((N, D), (stride, 1))
    far = torch.tensor([N - 2, 3], dtype=torch.int32)  # (N - 2) * stride > 2**31
    assert int(far[0]) * stride >= 1 << 31
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 200, (2, D), generator=g, dtype=torch.uint8)
    table[far.long()] = rows
    text = torch.randn(7, D, generator=g)
    labels = torch.tensor([5, 2], dtype=torch.int32)
    logits = torch.randn(2, 7, generator=g)
    state = make_state(N)
    launch_step(logits, labels, far, state=state, step_id=0, ema=0.9, scale=0.5, emb_mode=K.EMB_TABLE, emb=table,
                text=text)
    expected = F.cosine_similarity(rows.double(), text[labels.long()].double(), dim=1)
    torch.testing.assert_close(state.consistency[far.long()].double(), expected, rtol=1e-5, atol=1e-6)
    assert state.visits[far.long()].tolist() == [1, 1]


def test_no_grad_mode_writes_nothing():
    logits, labels, indices = random_batch(3, 17, 5, torch.float16)
    before = logits.clone()
    out = launch_step(logits, labels, indices, state=make_state(5), step_id=0, ema=0.9, scale=1 / 3)
    assert out.grad is None and torch.equal(logits, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("go", [1.0, 2.5])
@pytest.mark.parametrize("programs", [1, 4, 1024])  # fewer programs than tiles: each walks several
def test_scale_grad_kernel(go, dtype, programs, monkeypatch):
    monkeypatch.setattr(step_module, "SCALE_PROGRAMS", programs)
    grad = torch.randn(3, 2050).to(dtype)
    expected = (grad.float() * go).to(dtype)
    launch_scale_grad(grad, torch.tensor(go))
    torch.testing.assert_close(grad, expected)


def test_step_config_covers_all_class_counts():
    assert step_config(1).SINGLE and step_config(4096).SINGLE and not step_config(4097).SINGLE
    assert step_config(1 << 18).BLOCK_C == 2048


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(B=1, C=1, scale=1.0, dtype=torch.float32, smoothing=0.05, seed=0)  # exact loss 0: absolute error only
@example(B=1, C=99, scale=14.0, dtype=torch.float32, smoothing=0.0, seed=1)  # softmax ~1: cancellation in p - 1
@given(B=st.integers(1, 9), C=st.integers(1, 1500), scale=st.floats(0.01, 30.0),
       dtype=st.sampled_from(DTYPES), smoothing=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 2**16))
def test_step_hypothesis(B, C, scale, dtype, smoothing, seed):
    N = B + 4
    logits, labels, indices = random_batch(B, C, N, dtype, seed=seed, scale=scale)
    out_k, out_r, s_k, s_r = run_both(logits, labels, indices, make_state(N, seed), label_smoothing=smoothing)
    atol = loss_atol(logits)
    assert_close_rel(out_k.ce, out_r.ce, 1e-5, atol)
    assert_close_rel(out_k.grad, out_r.grad, GRAD_TOL[dtype], grad_atol(out_r.grad))
    assert_close_rel(s_k.scores, s_r.scores, 1e-5, atol)
    assert torch.equal(s_k.visits, s_r.visits)
    assert math.isfinite(out_k.contrib.sum().item())


def test_largest_step_id_settles_duplicates_in_bounds():
    """The largest accepted step id settles duplicates as the reference does (one above it, -2 - stamp wrapped
    in int32 and settle wrote far outside its scratch buffer; now refused, and settle tests the sign first)."""
    logits, labels, _ = random_batch(4, 10, 4, torch.float32)
    indices = torch.tensor([1, 1, 2, 3])
    out_k, out_r, s_k, s_r = run_both(logits, labels, indices, make_state(5), step_id=K.MAX_STEP_ID)
    assert_step_matches(out_k, out_r, s_k, s_r, torch.float32, logits)


@pytest.mark.parametrize("step_id", [-1, K.MAX_STEP_ID + 1])
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_step_id_out_of_range_is_refused(step_id, impl):
    logits, labels, indices = random_batch(2, 5, 4, torch.float32)
    fn = launch_step if impl == "kernel" else step_reference
    with pytest.raises(ValueError, match="step_id must be in"):
        fn(logits, labels, indices, state=make_state(4), step_id=step_id, ema=0.9, scale=0.5)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_state_accumulates_the_models_evidence(impl):
    """Each scored visit adds its margin to the sample's sum and count and leaves its prediction and label;
    rows that update nothing (ignored, non-finite) leave the evidence alone."""
    fn = launch_step if impl == "kernel" else step_reference
    state = make_state(4)
    first = torch.tensor([[4.0, 1.0, 0.0], [0.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
    fn(first, torch.tensor([0, 0, -100]), torch.tensor([0, 1, 2]), state=state, step_id=0, ema=0.9, scale=1.0)
    assert state.margin_sum.tolist() == [3.0, -2.0, 0.0, 0.0]
    assert state.margin_count.tolist() == [1, 1, 0, 0]
    assert state.pred.tolist() == [0, 2, -1, -1] and state.label.tolist() == [0, 0, -1, -1]
    second = torch.tensor([[0.0, 5.0, 1.0], [float("nan"), 0.0, 0.0]])
    fn(second, torch.tensor([1, 2]), torch.tensor([0, 1]), state=state, step_id=1, ema=0.9, scale=1.0)
    assert state.margin_sum.tolist() == [3.0 + 4.0, -2.0, 0.0, 0.0]  # sample 0 now trains with label 1
    assert state.margin_count.tolist() == [2, 1, 0, 0]
    assert state.pred.tolist() == [1, 2, -1, -1] and state.label.tolist() == [1, 0, -1, -1]


def test_sample_state_fields_are_the_kernels_arguments():
    """The bundle's columns are passed to the kernel in FIELDS order under their own names."""
    from fastprune.kernels.state import FIELD_NAMES

    names = list(step_module.fused_step_kernel.arg_names)
    at = names.index("scores_ptr")
    assert names[at:at + len(FIELD_NAMES)] == [f"{n}_ptr" for n in FIELD_NAMES]


def test_sample_state_check_names_the_bad_field():
    state = make_state(3)
    state.check()
    state.pred = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="SampleState.pred must be a contiguous torch.int32"):
        state.check()
