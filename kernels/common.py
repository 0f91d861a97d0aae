"""Constants shared by the Triton kernels and their PyTorch reference.

Both implementations must agree bit for bit on anything random or discrete
(error slots, random streams, sample classes), so those live here once.  No
Triton here (the CPU path runs without it): the kernels read these values as
``tl.constexpr`` globals from ``common_tl.py``.
"""

MAX_CLASSES = 1 << 18  # 262,144: the step kernel's int32 column offsets stay far from overflow

# --- step error buffer: int64[8], cumulative until the pruner reports them ---
# Each kind has a count and one example value (the bad label, the bad index,
# the batch row with non-finite logits, the duplicated index).  The example is
# the smallest offending value since the buffer was zeroed, so that it does not
# depend on which GPU program records first; it is stored as an unsigned
# maximum of ``example_key(value)``, for which a zeroed slot means "none yet".
ERR_LABEL_COUNT, ERR_LABEL_VALUE = 0, 1
ERR_INDEX_COUNT, ERR_INDEX_VALUE = 2, 3
ERR_NONFINITE_COUNT, ERR_NONFINITE_ROW = 4, 5
ERR_DUP_COUNT, ERR_DUP_VALUE = 6, 7
ERR_SLOTS = 8
EXAMPLE_KEY_XOR = (1 << 63) - 1  # example_key: the value's bits but the sign flipped, read as unsigned
_U64 = (1 << 64) - 1


def example_key(value: int) -> int:
    """The slot's bits (as an int64) for ``value``: smaller values give larger unsigned keys."""
    return _signed((int(value) ^ EXAMPLE_KEY_XOR) & _U64)


def merge_example(slot: int, value: int) -> int:
    """The slot after recording ``value``: the unsigned maximum of the two keys (the kernel's atomic)."""
    return _signed(max(int(slot) & _U64, example_key(value) & _U64))


def example_value(slot: int) -> int:
    """The smallest offending value recorded in ``slot``."""
    return _signed((int(slot) & _U64) ^ EXAMPLE_KEY_XOR)


def _signed(bits: int) -> int:
    return bits - (1 << 64) if bits >> 63 else bits


# --- consistency modes of the step ---
EMB_NONE = 0  # no CLIP embeddings: consistency is not touched
EMB_TABLE = 1  # fixed N x D table: cos(E[idx], T[y]) cached on a sample's first visit
EMB_BATCH = 2  # per-batch B x D embeddings: cos(e_i, T[y]) recomputed and EMA'd

# --- sample classes used by epoch selection ---
CLS_UNSEEN = 0  # never visited: always kept, weight 1
CLS_ELIGIBLE = 1  # seen and not filtered: subject to the policy
CLS_NOISY = 2  # filtered as likely mislabeled: never kept

# --- policies as kernel constants ---
POLICY_FULL = 0
POLICY_INFOBATCH = 1
POLICY_RANKED = 2  # topk and random: keep eligible samples whose rank < budget

# --- counter-based random streams: Philox-4x32-10 counter = (i_lo, i_hi, epoch, stream) ---
STREAM_DROP = 0  # infobatch drop decision
STREAM_SHUFFLE = 1  # the shuffle's round keys
STREAM_RANDOM = 2  # rank for the random policy

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

# The shuffle: a keyed bijection of [0, N) (a Feistel network on the bits of N - 1, cycle-walked into range);
# kept samples come in the order of their images under it, the dropped ones after them in the same order.
# Keys: Philox word 0 of counter (r, 0, epoch, STREAM_SHUFFLE), r = 0..SHUFFLE_ROUNDS (the last: the swap bit).
SHUFFLE_ROUNDS = 10  # 6 left small sets visibly non-uniform (tests/test_select_kernel.py)
SHUFFLE_MIX_A = 0x7FEB352D  # the round function's two odd multipliers (uint32 arithmetic)
SHUFFLE_MIX_B = 0x5BD1E995
SHUFFLE_MAX_N = 1 << 32  # positions are uint32


def seed_keys(seed: int) -> tuple[int, int]:
    """The two 32-bit Philox keys for a user seed (any Python int)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & 0xFFFFFFFF, seed >> 32


MAX_STEP_ID = 2**31 - 2  # stamps hold step ids >= 0; settle_kernel marks a stamp with -2 - row, which must not wrap


def check_step_id(step_id: int) -> None:
    """The fused step's step id must be in [0, MAX_STEP_ID] (the pruner wraps its step count into it)."""
    if not 0 <= step_id <= MAX_STEP_ID:
        raise ValueError(f"step_id must be in [0, {MAX_STEP_ID}], got {step_id}")
