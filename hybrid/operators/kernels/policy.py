"""Where the kernels switch from one way of computing to another: every dispatch threshold,
each with the measurement that set it. Numbers read inside numba kernels are compiled in
(a change means a fresh compile, which the source-keyed cache gives); the ones read from
Python are read at each call.

Tokens per call, from one up, for a weight matrix (`linear.matmul`, the decode kernels):
1 a GEMV; up to GEMM_TOKENS `gemm_rows` where it takes the format (else a GEMV per token
over L2 slices where the format has an integer row path, else L1 tiles); up to
TILE_MAX_TOKENS L1 tiles; above, dequantized tiles of BLAS_TILE_BYTES and BLAS.
"""

# Up to this many tokens, formats `gemm_rows` takes (formats.MULTI_TYPES, MULTI8_TYPES) go
# each row against all tokens at once, else L1 tiles. One core, 512 x 1024 in L2, G
# weight-tokens/s, Q8_0 at 2, 4, 8 tokens: `gemm_rows` 24, 33, 32, tiles 14, 22, 28 (Q4_0
# at 8: 30 against 32); below 8 `gemm_rows` is up to 1.5x faster, at 8 the tiles come close
# or ahead and gain with every further token (docs/performance.md, "Several tokens per row").
GEMM_TOKENS = 8

# Up to this many tokens, a format with an integer row path but no `gemm_rows` (Q4_K,
# Q6_K; without VNNI also Q8_0, Q4_0, MXFP4) takes a GEMV per token over slices of
# GEMV_SLICE_BYTES of rows (`rows.token_rows`), read from DRAM once and from L2 for the
# other tokens, instead of L1 tiles, whose float decode is slower than the integer dots.
# 2 threads, weights from DRAM, ms for 2 / 4 / 8 tokens, tiles -> GEMVs: Q4_K 14336 x
# 4096 5.5 / 6.9 / 10.3 -> 2.5 / 4.5 / 8.8; Q6_K 4096 x 14336 16.5 / 18.4 / 23.2 -> 5.0 /
# 10.1 / 20.3; Q4_K 768 x 2048 0.124 / 0.184 / 0.280 -> 0.071 / 0.133 / 0.258. At 16
# tokens the tiles win (Q4_K 14336 x 4096: 15.5 ms against ~17.6).
GEMV_EACH_TOKENS = 8
GEMV_SLICE_BYTES = 256 << 10

# From this many tokens on, a weight (`linear.matmul`) or an expert in the fused MoE
# (`moe._moe_panels`) whose format and activation form have integer panels (panels.py)
# takes them: one core, Q4_K 768 x 2048, G multiply-adds/s at 16, 32, 64, 128 tokens,
# panels 44, 55, 62, 65 against tiles 35, 38, 40, 41 (scripts/bench_panels.py).
PANEL_MIN_TOKENS = GEMM_TOKENS + 1

# Up to this many tokens, decode each group of 4 weight rows once into L1 and multiply it
# there with every token (batch.py); above, decode a tile of rows and hand it to BLAS.
# The L1 path measured 2-3.5x faster than BLAS (torch, one thread beside numba's) at every
# size tried, 32..2048 tokens (docs/performance.md, "Server").
TILE_MAX_TOKENS = 4096

# fp32 rows dequantized per BLAS call above TILE_MAX_TOKENS. Large on purpose: switching
# between numba's and BLAS's thread pools costs milliseconds (both spin), far more than
# the cache misses.
BLAS_TILE_BYTES = 256 << 20

# Activations read per pass of an L1 tile (batch.py) stay within this: half the 1 MB L2
# of this machine's cores, so the tokens are read from L2 for every tile.
TILE_X_BYTES = 512 << 10

# The row loops of one token (GEMV) and of a few (`gemm_rows`) ask the CPU for the weight
# bytes this far ahead of the block they decode (prefetcht0). The hardware prefetchers
# alone kept too few lines in flight where a block costs many instructions: one core, Q4_0
# GEMV from DRAM, 2048 columns 4.5 -> 10.4 GB/s, 16384 columns 6.9 -> 12.9; the fused MoE
# decode of 128 experts 768 x 2048, top-8, two cores: Q4_0 7.0 -> 17.2 GB/s, Q4_K 15.8 ->
# 18.6, Q8_0 16.7 -> 22.6. 512 and 2048 bytes measured within 10% of 1024.
PREFETCH_BYTES = 1024

# Up to this many tokens the fused MoE kernel runs (measured 3x faster than going expert by
# expert through BLAS from 128 to 2048 tokens, top-4 of 32 experts); above, expert by
# expert, which keeps the [N*K, I] buffer of the fused kernel bounded. The fused decoder
# layer (kernels/layer.py) runs this kernel, so it takes no more tokens either.
MOE_FUSED_MAX_TOKENS = 2048

# In the fused MoE, an expert with up to this many tokens runs a GEMV per token (the
# integer path, its rows re-read from L2 for the next token); more, a decoded tile. A
# batch-8 decode step of the synthetic Q8_0 MoE, 1 -> 4: 40-42.5 ms -> 33-35 ms (5-8 tokens
# measured the same as 4). With `gemm_rows` for the format, an expert with 2 to
# GEMM_TOKENS tokens takes it instead: each row against all of them.
EXPERT_GEMV_TOKENS = 4

# Up to this many tokens (decode of a batch of sequences) a CPU MLP is one numba call
# (decode.mlp_step): one token takes the integer GEMV, two or more what `rows.token_rows`
# picks for the format (`gemm_rows`, GEMVs over L2 slices, or decoded L1 tiles), each weight
# row read from DRAM once for every token. Longer calls (prefill) go
# projection by projection through `linear.matmul`, whose BLAS path wins there.
MLP_FUSED_MAX_TOKENS = 16

# fp32 weight bytes per copy to a prefill device (operators/offload.py): bounds the host
# and device memory a call adds.
OFFLOAD_TILE_BYTES = 64 << 20
