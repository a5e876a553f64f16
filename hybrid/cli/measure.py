"""`hybrid bench`: prefill and decode speed of a model under its rules, set against the
memory bandwidth measured in the same run (the roofline a decode step cannot beat)."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from hybrid.models.common import Experts

def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the best of `repeats` GEMVs over `nbytes` of weights
    with all threads, in two formats, F16 and Q8_0, each costing about one instruction per
    byte, so that memory bounds at least one of them: on 2 cores of a Xeon both read at the
    same speed; on 2 cores of an EPYC Zen 4 the F16 conversion is compute-bound (24 GB/s)
    where Q8_0 reads 34 GB/s. A plain parallel sum is compute-bound on these cores and
    reads slower."""
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(0)
    # random finite halves (uniform data could flatter the memory system)
    w = rng.integers(0, 0x3C00, (nbytes // 8192, 4096), dtype=np.uint16).view(np.float16)
    best = _best_gemv(Q.F16, w, np.ones(4096, np.float32), repeats)
    del w
    # Q8_0: 4096 columns are 128 blocks of a float16 scale and 32 signed bytes
    w = rng.integers(0, 256, (nbytes // 4352, 128, 34), dtype=np.uint8)
    w[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return max(best, _best_gemv(Q.Q8_0, w.reshape(len(w), -1), np.ones(4096, np.float32), repeats))


def _best_gemv(qtype, w, x, repeats) -> float:
    """Bytes/s of the fastest of `repeats` GEMVs, after one that compiles and faults the pages in."""
    from hybrid.operators import kernels

    kernels.gemv(qtype, w, x)
    return w.nbytes / min(_timed(lambda: kernels.gemv(qtype, w, x)) for _ in range(repeats))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads with batch 1, from the actual placement and
    formats: every weight once, an embedding table one row, routed experts K of E."""
    top_k = getattr(model.config, "num_experts_per_tok", 1)
    total = 0
    for p in model.placements:
        m = p.module
        if hasattr(m, "decode_bytes"):
            total += m.decode_bytes(top_k)
        elif p.operator is None:
            own = list(m.parameters(recurse=False))
            size = sum(t.numel() * t.element_size() for t in own)
            if isinstance(m, nn.Embedding):
                size = m.embedding_dim * m.weight.element_size()
            elif isinstance(m, Experts):
                size = size * top_k // m.num_experts
            total += size
    return total


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@torch.inference_mode()
def run(model, prompt_tokens: int = 512, gen_tokens: int = 128, batches=(1,), bandwidth: float | None = None) -> dict:
    """Prefill `prompt_tokens` tokens, then decode `gen_tokens` greedy steps for each batch
    size (every sequence has its own cache slot and prompt). Stop tokens are ignored."""
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    bandwidth = bandwidth or measure_bandwidth()
    per_token = decode_bytes_per_token(model)
    result = {
        "model": model.name,
        "rules": model.ruleset.source if model.ruleset else None,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "bandwidth_gbps": bandwidth / 1e9,
        "decode_bytes_per_token": per_token,
        "batches": [],
    }
    for batch in batches:
        cache = model.new_cache(batch, prompt_tokens + gen_tokens + 1)
        prompts = torch.from_numpy(rng.integers(0, vocab, (batch, prompt_tokens)))
        # warm-up: compile kernels, touch weights
        model.forward(prompts[:1, :8], [0], [0], cache)
        model.forward(prompts[:1, :1], [8], [0], cache)
        t0 = time.perf_counter()
        last = []
        for b in range(batch):
            logits = None
            for s in range(0, prompt_tokens, 512):
                chunk = prompts[b : b + 1, s : s + 512]
                logits = model.forward(chunk, [s], [b], cache, keep=[chunk.shape[1] - 1])  # as the engine prefills
            last.append(int(logits[0, -1].argmax()))
            if b == 0:
                ttft = time.perf_counter() - t0
        prefill = time.perf_counter() - t0
        tokens = torch.tensor(last)[:, None]
        t1 = time.perf_counter()
        for step in range(gen_tokens):
            logits = model.forward(tokens, [prompt_tokens + step] * batch, list(range(batch)), cache)
            tokens = logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t1
        decode_tps = batch * gen_tokens / decode
        entry = {
            "batch": batch,
            "prefill_tokens_per_s": batch * prompt_tokens / prefill,
            "time_to_first_token_s": ttft,
            "decode_tokens_per_s": decode_tps,
        }
        if batch == 1:
            entry["roofline_fraction"] = per_token * decode_tps / bandwidth
        result["batches"].append(entry)
    result["peak_rss_bytes"] = _peak_rss()
    return result


def format_result(r: dict) -> str:
    lines = [
        f"model: {r['model']}  rules: {r['rules']}",
        f"memory read bandwidth: {r['bandwidth_gbps']:.1f} GB/s; weights read per decoded token: {r['decode_bytes_per_token'] / 1e6:.1f} MB",
        f"peak RSS: {r['peak_rss_bytes'] / 2**20:.0f} MiB",
        "",
        f"batch  prefill tok/s  TTFT s  decode tok/s  roofline   (prompt {r['prompt_tokens']}, generate {r['gen_tokens']})",
    ]
    for b in r["batches"]:
        roof = f"{b['roofline_fraction']:.0%}" if "roofline_fraction" in b else "-"
        lines.append(f"{b['batch']:>5}  {b['prefill_tokens_per_s']:>13.1f}  {b['time_to_first_token_s']:>6.2f}  {b['decode_tokens_per_s']:>12.1f}  {roof:>8}")
    return "\n".join(lines)
