"""The activations x as the row kernels take them: float32 as it is, or rounded per 32-block
to integers times a float scale (`quantize_rows`), and which of these forms a weight of a
given format takes (`act_mode`, `rows_input`).

What an operator's `activations` kwarg asks for: x as it is (the float path of every
format), rounded to int16 per 32-block (formats.INT_TYPES; ~2e-5 relative error), or to
int8 (formats.INT8_TYPES; ~4e-3 of a block's largest value). A format without the
asked-for path takes the next one down. `auto` (the default) is int16, except for the
routed experts' integer panels (their prefill) on a CPU without VNNI, whose panels take
int8 x only (`panel_mode`): there int16 would leave the experts' prefill, most of a MoE
model's, to the float tiles at about half the speed, and int8 x is what llama.cpp's dots
take on every CPU. Dense weights keep int16 under `auto` on every CPU, so a dense model
(the built-in one) computes the same on every ISA.
"""

import numba
import numpy as np

from .formats import INT8_TYPES, INT_TYPES, PANEL_TYPES
from .intrinsics import FASTMATH, HAS_VNNI, _u2f
from .policy import GEMM_TOKENS, GEMV_EACH_TOKENS

ACT_FLOAT, ACT_INT16, ACT_INT8, ACT_AUTO = 0, 1, 2, 3
ACTIVATIONS = {"auto": ACT_AUTO, "int16": ACT_INT16, "int8": ACT_INT8, "float": ACT_FLOAT}
DEFAULT_ACTIVATIONS = "auto"

# x is rounded to at most 127 * 256 in magnitude, so that its high byte (the VNNI path's xh)
# stays within int8 however the low byte rounds; on the int8 path to at most 127.
X_MAX = 32512
X8_MAX = 127


def check_activations(op: str, activations: str) -> int:
    """The ACT_* code of an operator's `activations` kwarg."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"{op}: activations {activations!r} is not one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[activations]


@numba.njit(inline="always", fastmath=FASTMATH)
def _round_block(x, i, o, inv, out):
    """out[i, o + j] = floor(x[i, o + j] * inv + 0.5) for j < 32, in out's integer type;
    returns their sum."""
    s = np.float32(0)
    for j in range(32):
        q = np.floor(x[i, o + j] * inv + np.float32(0.5))
        out[i, o + j] = q  # float -> int16 or int8: the conversion np.int16(q) / np.int8(q) makes
        s += q
    return s


@numba.njit(nogil=True, fastmath=FASTMATH)
def quantize_rows(x, needed=True, split=HAS_VNNI, int8=False):
    """(x, xq, xs, xsum, xb, x8): each 32-block of each row of x (float32 [N, cols]) rounded
    to integers times a scale xs [N, cols // 32], with the block's sum xsum (of the rounded
    values times xs); the form `gemv_rows` takes. Rounded to int16, xq [N, cols], and with
    `split` (the VNNI path) also xq's bytes: int8 xb [N, 2 * cols], per block 32 high bytes
    xh then 32 low ones xl, xq = 256 * xh + xl. With `int8`, rounded to int8 instead: x8
    [N, cols] (xq and xb empty).
    A block holding NaN or Inf gets scale NaN or Inf and zeros, so its dots are NaN. Not
    `needed` (no row of a format on an integer path): only x, with empty integer arrays.
    A plain tuple, not a named one: numba's parallel loops failed to lower a namedtuple
    used inside them."""
    n, cols = x.shape
    nb = cols // 32 if needed else 0
    top_q = X8_MAX if int8 else X_MAX
    xq = np.empty((n, 0 if int8 else 32 * nb), np.int16)
    x8 = np.empty((n, 32 * nb if int8 else 0), np.int8)
    xs = np.empty((n, nb), np.float32)
    xsum = np.empty((n, nb), np.float32)
    xb = np.empty((n, 64 * nb if split and not int8 else 0), np.int8)
    for i in range(n):
        bits = x[i].view(np.uint32)
        for b in range(nb):
            # max |x| as the max of the bit patterns without sign (an integer max vectorizes,
            # a float one without NaN flags does not)
            top = np.uint32(0)
            for j in range(32):
                top = max(top, bits[32 * b + j] & np.uint32(0x7FFFFFFF))
            m = _u2f(top)
            # 0 for NaN and Inf; at most float32's largest where m is subnormal (its inverse
            # would be inf, and inf or NaN to integer is undefined): such a block rounds to 0
            inv = min(np.float32(top_q) / m, np.float32(3.4028235e38)) if m > 0 else np.float32(0)
            if int8:
                s = _round_block(x, i, 32 * b, inv, x8)
            else:
                s = _round_block(x, i, 32 * b, inv, xq)
            xs[i, b] = m / np.float32(top_q)
            # the sum of the rounded block: a min term (Q4_K) then cancels against the
            # integer dot exactly as in w . rounded x (with the sum of x itself, real Q4_K
            # rows were 9e-5 off, not 2e-5)
            xsum[i, b] = s * xs[i, b]
        if xb.shape[1]:
            for b in range(nb):
                for j in range(32):
                    q = np.int32(xq[i, 32 * b + j])
                    low = np.int8(q & 255)  # as signed: q - 256 * high
                    xb[i, 64 * b + 32 + j] = low
                    xb[i, 64 * b + j] = np.int8((q - np.int32(low)) >> 8)
    return x, xq, xs, xsum, xb, x8


@numba.njit(inline="always")
def act_mode(acts, t):
    """The activation form (ACT_FLOAT, ACT_INT16 or ACT_INT8) a weight of type code t takes
    under `acts` on the row paths (one token, a few: `rows_input`); `auto` takes int16. The
    integer panels have their own (`panel_mode`)."""
    if acts == ACT_INT8 and t in INT8_TYPES:
        return ACT_INT8
    if acts != ACT_FLOAT and t in INT_TYPES:
        return ACT_INT16
    return ACT_FLOAT


@numba.njit(inline="always")
def panel_mode(acts, t, experts):
    """The activation form weights of type code t take on the integer panels (panels.py:
    prefill) under `acts`: every panel format takes both integer forms, whatever its row
    paths have (Q5_0 has only the float row path); `auto` is int16, except for the routed
    experts (`experts`) on a CPU without VNNI, whose panels take int8."""
    if acts == ACT_FLOAT or t not in PANEL_TYPES:
        return ACT_FLOAT
    if acts == ACT_INT8 or (acts == ACT_AUTO and experts and not HAS_VNNI):
        return ACT_INT8
    return ACT_INT16


@numba.njit(inline="always", fastmath=FASTMATH)
def rows_input(x, mode):
    """x (float32 [B, cols]) as `gemv_rows` and `gemm_rows` take it for weights whose
    activation form is `mode` (`act_mode`): int8 for up to GEMM_TOKENS tokens; int16 for
    up to GEMV_EACH_TOKENS (a GEMV per token where the format has no `gemm_rows`), or up to
    GEMM_TOKENS with VNNI (`gemm_rows`); more tokens go through float tiles."""
    B = x.shape[0]
    if mode == ACT_INT8 and B <= GEMM_TOKENS:
        return quantize_rows(x, True, False, True)
    return quantize_rows(x, mode != ACT_FLOAT and (B <= GEMV_EACH_TOKENS or (HAS_VNNI and B <= GEMM_TOKENS)))
