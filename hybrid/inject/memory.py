"""Resident memory: what this process holds now (for /metrics), and what a plan is
expected to hold once loaded (for `hybrid rules`)."""

from __future__ import annotations

# Python, torch, numba and hybrid imported, the kernels a model uses loaded from numba's
# cache, the tokenizer: `hybrid serve` with the built-in model, less its mapped weights
# and KV cache (docs/performance.md, "Memory").
RUNTIME_BYTES = 420 << 20

# GPU memory a plan keeps free of weights and KV cache: activations of a step, torch's
# caching allocator's slack, cuBLAS workspaces. An estimate (not yet measured here); change
# it with --gpu-reserve.
GPU_RESERVE_BYTES = 512 << 20


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (default: this one), in bytes; 0 where /proc is absent."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def kv_bytes_per_token(module, placement) -> int:
    """Bytes of KV cache one token takes across all layers: placement(path) -> (device,
    dtype) as `Model.placement`; an attention with a `kv_dtype` of its own keeps that. A
    layer without attention (a recurrent one) keeps a state that does not grow with tokens."""
    total = 0
    for i, layer in enumerate(module.model.layers):
        if not hasattr(layer, "self_attn"):
            continue
        _, dtype = placement(f"model.layers.{i}.self_attn")
        dtype = getattr(layer.self_attn, "kv_dtype", dtype)
        kv_heads, k_dim, v_dim = layer.self_attn.cache_shape()
        total += kv_heads * (k_dim + v_dim) * dtype.itemsize
    return total


def expected_rss(cpu_weight_bytes: int, kv_per_token: int, slots: int, ctx: int, prefix_cache: int = 0,
                 state_per_slot: int = 0) -> dict:
    """RSS a server is expected to reach: the runtime, the weights it keeps on the CPU
    (mapped once, resident as they are read) and the KV cache, which becomes resident as
    tokens are written (none at start, `slots` x `ctx` tokens when every slot is full; a
    recurrent layer's state, `state_per_slot`, whole once its slot is used), plus the prefix
    cache's budget once it has filled (CPU caches; a GPU's stays on the GPU)."""
    start = RUNTIME_BYTES + cpu_weight_bytes
    return {"runtime_bytes": RUNTIME_BYTES, "cpu_weight_bytes": cpu_weight_bytes, "kv_bytes_per_token": kv_per_token,
            "state_bytes_per_slot": state_per_slot, "slots": slots, "ctx": ctx, "at_start_bytes": start,
            "prefix_cache_bytes": prefix_cache,
            "kv_full_bytes": start + (kv_per_token * ctx + state_per_slot) * slots + prefix_cache}
