"""``common.py``'s values as ``tl.constexpr`` globals, for the Triton kernels.

A jit function may only read globals that are ``tl.constexpr``; ``common.py``
itself must stay importable without Triton (the CPU path), so the kernel
modules import these names instead.
"""

import triton.language as tl

from . import common as K

# the step's error buffer (see common.py)
ERR_LABEL_COUNT = tl.constexpr(K.ERR_LABEL_COUNT)
ERR_LABEL_VALUE = tl.constexpr(K.ERR_LABEL_VALUE)
ERR_INDEX_COUNT = tl.constexpr(K.ERR_INDEX_COUNT)
ERR_INDEX_VALUE = tl.constexpr(K.ERR_INDEX_VALUE)
ERR_NONFINITE_COUNT = tl.constexpr(K.ERR_NONFINITE_COUNT)
ERR_NONFINITE_ROW = tl.constexpr(K.ERR_NONFINITE_ROW)
ERR_DUP_COUNT = tl.constexpr(K.ERR_DUP_COUNT)
ERR_DUP_VALUE = tl.constexpr(K.ERR_DUP_VALUE)
EXAMPLE_KEY_XOR = tl.constexpr(K.EXAMPLE_KEY_XOR)

# the step's consistency modes
EMB_NONE = tl.constexpr(K.EMB_NONE)
EMB_TABLE = tl.constexpr(K.EMB_TABLE)
EMB_BATCH = tl.constexpr(K.EMB_BATCH)

# epoch selection: sample classes, policies, random streams
CLS_UNSEEN = tl.constexpr(K.CLS_UNSEEN)
CLS_ELIGIBLE = tl.constexpr(K.CLS_ELIGIBLE)
CLS_NOISY = tl.constexpr(K.CLS_NOISY)
POLICY_FULL = tl.constexpr(K.POLICY_FULL)
POLICY_INFOBATCH = tl.constexpr(K.POLICY_INFOBATCH)
POLICY_RANKED = tl.constexpr(K.POLICY_RANKED)
STREAM_DROP = tl.constexpr(K.STREAM_DROP)
STREAM_SHUFFLE = tl.constexpr(K.STREAM_SHUFFLE)
STREAM_RANDOM = tl.constexpr(K.STREAM_RANDOM)

# Philox-4x32-10 and the shuffle's round function
PHILOX_ROUND_A = tl.constexpr(K.PHILOX_ROUND_A)
PHILOX_ROUND_B = tl.constexpr(K.PHILOX_ROUND_B)
PHILOX_KEY_A = tl.constexpr(K.PHILOX_KEY_A)
PHILOX_KEY_B = tl.constexpr(K.PHILOX_KEY_B)
PHILOX_ROUNDS = tl.constexpr(K.PHILOX_ROUNDS)
SHUFFLE_MIX_A = tl.constexpr(K.SHUFFLE_MIX_A)
SHUFFLE_MIX_B = tl.constexpr(K.SHUFFLE_MIX_B)
