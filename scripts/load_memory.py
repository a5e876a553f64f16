"""Peak resident memory that loading a model adds, against the size of its file(s).

    python scripts/load_memory.py MODEL [--rules R] [--json]

Measured in this process: VmRSS after imports and after building a one-layer model on the
meta device (torch's one-time lazy initialisation, ~80 MB, is not the loader's), then
VmHWM (peak) after `hybrid.load` and one forward pass of 8 tokens. Memory-mapped weight
pages that are touched count as resident, as they do for the operating system."""

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rules", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    import hybrid
    from hybrid.checkpoint import find_source
    from hybrid.models import llama

    with torch.device("meta"):
        llama.Model(llama.Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))

    src = find_source(args.model)
    files = src.gguf_files or src.safetensors_files
    file_bytes = sum(os.path.getsize(f) for f in files)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    baseline = _status("VmRSS")
    model = hybrid.load(args.model, rules=args.rules)
    model.logits(list(range(1, 9)))
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
