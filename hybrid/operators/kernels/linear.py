"""y = W @ x on GGUF blocks: GEMV for one token, rows against a few tokens at once
(`rows.token_rows`: `gemm_rows` where it takes the format, else GEMVs over L2 slices or
decoded L1 tiles) up to
GEMM_TOKENS, integer panels (panels.py) where they take the format and activation form, else
decoded L1 tiles (batch.py), up to TILE_MAX_TOKENS tokens, and tile dequantization + BLAS
above (weights are read once per batch in every case; the thresholds are policy.py's)."""

from contextlib import contextmanager

import numba
import numpy as np
import torch
from numba import prange

from . import policy
from .activations import ACT_INT16, act_mode, panel_mode, rows_input
from .batch import decode_row, matmul_small
from .formats import as_blocks
from .intrinsics import FASTMATH
from .panels import NO_FORM, matmul_panels, panel_form
from .policy import GEMM_TOKENS, TILE_X_BYTES
from .rows import gemv_rows, token_rows


@contextmanager
def num_threads(threads):
    """numba's thread count for this call only (numba's setting is per calling thread)."""
    if threads is None:
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _gemv(t, w, x, y, chunks, acts):
    """w: uint8 [rows, row_bytes]; x: float32 [cols]; y: float32 [rows]; rows split in
    chunks (one per thread: more, shorter streams read slower); acts: the activation form
    asked for (activations.ACT_*)."""
    rows = w.shape[0]
    xa = rows_input(x.reshape(1, x.size), act_mode(acts, t))
    for c in prange(chunks):
        lo = c * rows // chunks
        hi = (c + 1) * rows // chunks
        gemv_rows(t, w, xa, 0, lo, hi, y)


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _few(t, w, x, y, chunks, acts):
    """As `_gemv` for 2..GEMM_TOKENS tokens: x float32 [N, cols], y float32 [N, rows]; each
    row read once for all tokens (`token_rows`: `gemm_rows` where it takes the format in the
    activation form `acts` asks for, else GEMVs over L2 slices or a decoded tile)."""
    rows = w.shape[0]
    xa = rows_input(x, act_mode(acts, t))
    for c in prange(chunks):
        lo = c * rows // chunks
        hi = (c + 1) * rows // chunks
        token_rows(t, w, xa, y, lo, hi)


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _dequantize(t, w, out):
    """w: uint8 [rows, row_bytes]; out: float32 [rows, cols]."""
    for r in prange(w.shape[0]):
        decode_row(t, w[r], out[r])


def gemv_chunks(rows):
    """Row chunks for a GEMV: one per numba thread (call inside `num_threads`)."""
    return row_chunks.py_func(rows, numba.get_num_threads())


@numba.njit(inline="always")
def row_chunks(rows, threads):
    """`gemv_chunks` for `threads` threads, inside a kernel."""
    return max(1, min(threads, rows // 2))


class Prepared:
    """A weight checked and viewed once, for the one-token path that runs hundreds of times
    per decoded token: `gemv` skips the per-call checks of `matmul` (about 20 us each)."""

    def __init__(self, qtype, w: np.ndarray, acts: int = ACT_INT16):
        self.qtype, self.acts = qtype, acts
        self.t, self.w, self.cols = as_blocks(qtype, w)
        self.rows = self.w.shape[0]

    def gemv(self, x: np.ndarray, y: np.ndarray) -> None:
        """x: float32 [cols] contiguous; y: float32 [rows], written."""
        _gemv(self.t, self.w, x, y, gemv_chunks(self.rows), self.acts)


def dequantize(qtype, w: np.ndarray, threads: int | None = None) -> np.ndarray:
    """float32 [..., rows, cols] of a weight in the kernels' form (blocks, or float arrays)."""
    t, w, cols = as_blocks(qtype, w)
    flat = w.reshape(-1, w.shape[-1])
    out = np.empty((flat.shape[0], cols), np.float32)
    with num_threads(threads):
        _dequantize(t, flat, out)
    return out.reshape(*w.shape[:-1], cols)


def gemv(qtype, w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None, threads: int | None = None,
         acts: int = ACT_INT16) -> np.ndarray:
    """y = W @ x.

    w: [rows, row_bytes] uint8 GGUF blocks (or [rows, cols] float32/float16/uint16-bf16);
    x: float32 [cols]; out: optional float32 [rows]; acts: the activation form (activations.ACT_*):
    by default, Q8_0, Q4_0, Q4_K and Q6_K weights take x rounded to int16 per 32 values
    (`activations.quantize_rows`: ~2e-5 relative error).
    """
    t, w, cols = as_blocks(qtype, w)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape != (cols,):
        raise ValueError(f"x has shape {x.shape}, the weight wants ({cols},)")
    y = np.empty(w.shape[0], np.float32) if out is None else out
    with num_threads(threads):
        _gemv(t, w, x, y, gemv_chunks(w.shape[0]), acts)
    return y


def matmul(qtype, w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None, threads: int | None = None,
           acts: int = ACT_INT16) -> np.ndarray:
    """Y = X @ W.T for a batch of tokens.

    w: as for gemv; x: float32 [N, cols]; returns float32 [N, rows]; acts as for gemv (above
    GEMM_TOKENS tokens, formats without an integer panel for the form take float x).
    """
    t, w, cols = as_blocks(qtype, w)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != cols:
        raise ValueError(f"x has shape {x.shape}, the weight wants (N, {cols})")
    n, rows = x.shape[0], w.shape[0]
    y = np.empty((n, rows), np.float32) if out is None else out
    with num_threads(threads):
        if n == 1:
            _gemv(t, w, x[0], y[0], gemv_chunks(rows), acts)
        elif n <= GEMM_TOKENS:
            _few(t, w, x, y, gemv_chunks(rows), acts)
        elif n <= policy.TILE_MAX_TOKENS:
            form = panel_form.py_func(t, panel_mode.py_func(acts, t, False))
            if form != NO_FORM:
                matmul_panels(t, w, x, y, gemv_chunks(rows), form, TILE_X_BYTES)
            else:
                matmul_small(t, w, x, y, gemv_chunks(rows))
        else:
            # yT[r0:r1] = tile @ x.T keeps every BLAS output contiguous.
            tile_rows = max(16, policy.BLAS_TILE_BYTES // (4 * cols))
            tile = np.empty((min(tile_rows, rows), cols), np.float32)
            yt = np.empty((rows, n), np.float32)
            xt = torch.from_numpy(x).T
            for r0 in range(0, rows, tile_rows):
                r1 = min(rows, r0 + tile_rows)
                _dequantize(t, w[r0:r1], tile[: r1 - r0])
                with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf inputs propagate
                    # torch's GEMM, not numpy's: OpenBLAS keeps a spinning thread pool of its
                    # own that fights numba's for the same cores (10x slower prefill).
                    torch.matmul(torch.from_numpy(tile[: r1 - r0]), xt, out=torch.from_numpy(yt[r0:r1]))
            y[...] = yt.T
    return y
