"""Peak resident memory that loading a model adds, against the size of its file(s).

    python scripts/load_memory.py MODEL [--rules R] [--json]
    python scripts/load_memory.py --serve [MODEL] [--json]

With --serve: the resident memory of a `hybrid serve` process (default options: 4 slots,
context up to 4096) once /health says ready, and after one chat request of 16 tokens.

Measured in this process: VmRSS after imports, after building a one-layer model on the
meta device and after running every kernel once on tiny arrays (torch's one-time lazy
initialisation and numba's compiled code, ~80 MB and ~100 MB, are code, not the loader's
data), then VmHWM (peak) after `hybrid.load` and a forward pass over `--tokens` tokens
(enough that every expert is used, so every weight page is read once). Memory-mapped
weight pages count as resident once touched, as they do for the operating system."""

from __future__ import annotations

import argparse
import json
import os


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _warm_kernels() -> None:
    import numpy as np

    from hybrid.operators import kernels
    from hybrid.operators.quantize import QUANTIZABLE, quantize

    square = np.zeros((256, 256), np.float32)
    for q in kernels.SUPPORTED_TYPES:  # K-quants have no quantizer: compiled on first use
        if q.name == "F32" or q.name in QUANTIZABLE:
            w = square if q.name == "F32" else quantize(q, square)
            frozen = w.copy()  # memory-mapped weights are read-only arrays: numba compiles them apart
            frozen.setflags(write=False)
            for w in (w, frozen):
                for n in (1, 3, 32):
                    kernels.matmul(q, w, np.ones((n, 256), np.float32))
                kernels.dequantize(q, w)
                for n in (1, 32):
                    kernels.moe_forward(q, w[None], q, w[None], q, w[None], np.ones((n, 256), np.float32),
                                        np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32))


def serve_rss(model: str | None) -> dict:
    """RSS of `hybrid serve` when ready and after one request (read from /proc/PID/status)."""
    import re
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from hybrid.inject.memory import rss_bytes

    cmd = [sys.executable, "-m", "hybrid", "serve", "--port", "0"] + (["--model", model] if model else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "HYBRID_API_KEY": ""})
    try:
        url = re.search(r"listening on (http://\S+),", proc.stdout.readline()).group(1)
        t0 = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except urllib.error.HTTPError:
                time.sleep(0.2)
        ready_s, ready = time.perf_counter() - t0, rss_bytes(proc.pid)
        body = json.dumps({"model": "default", "max_tokens": 16, "temperature": 0,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=600).read()
        return {"ready_s": round(ready_s, 1), "rss_ready_bytes": ready, "rss_after_request_bytes": rss_bytes(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="model path (with --serve, default: the built-in model)")
    ap.add_argument("--serve", action="store_true", help="measure a `hybrid serve` process instead")
    ap.add_argument("--rules", default=None)
    ap.add_argument("--tokens", type=int, default=64, help="tokens in the forward pass (default 64)")
    ap.add_argument("--chunk", type=int, default=16, help="prefill chunk (default 16: the small-batch kernels)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.serve:
        report = serve_rss(args.model)
        print(json.dumps(report) if args.json else "\n".join(f"{k:>24}: {v}" for k, v in report.items()))
        return
    if args.model is None:
        ap.error("a model path is needed (or --serve)")

    import torch

    import hybrid
    from hybrid.files.checkpoint import find_source
    from hybrid.models import llama

    with torch.device("meta"):
        llama.Model(llama.Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))
    _warm_kernels()

    src = find_source(args.model)
    files = src.gguf_files or src.safetensors_files
    file_bytes = sum(os.path.getsize(f) for f in files)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    baseline = _status("VmRSS")
    model = hybrid.load(args.model, rules=args.rules)
    model.logits(list(range(1, args.tokens + 1)), chunk=args.chunk)
    peak = _status("VmHWM")
    report = {
        "model": str(args.model),
        "rules": model.ruleset.source,
        "file_bytes": file_bytes,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_added_bytes": peak - baseline,
        "ratio_to_file": round((peak - baseline) / file_bytes, 3),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
