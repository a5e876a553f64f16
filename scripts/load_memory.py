"""Peak resident memory that loading a model adds, against the size of its file(s).

    python scripts/load_memory.py MODEL [--rules R] [--json]

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
            for n in (1, 3, 32):
                kernels.matmul(q, w, np.ones((n, 256), np.float32))
            kernels.dequantize(q, w)
            for n in (1, 32):
                kernels.moe_forward(q, w[None], q, w[None], q, w[None], np.ones((n, 256), np.float32),
                                    np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rules", default=None)
    ap.add_argument("--tokens", type=int, default=64, help="tokens in the forward pass (default 64)")
    ap.add_argument("--chunk", type=int, default=16, help="prefill chunk (default 16: the small-batch kernels)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    import hybrid
    from hybrid.checkpoint import find_source
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
