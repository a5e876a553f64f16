"""Cold and warm start: how long a fresh process takes from `import hybrid` to a model that
has run every kernel path once, without and with numba's on-disk kernel cache.

    python scripts/bench_startup.py [--model M.gguf] [--json FILE]

Each start is a new Python process with NUMBA_CACHE_DIR pointed at one temporary directory:
the first (cold) finds it empty and compiles every kernel; the second and third (warm) load
the compiled kernels from it. With no --model it times the built-in model and a small
synthetic MoE GGUF (the fused-experts kernels) made in the temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, time
t0 = time.perf_counter()
import hybrid
t1 = time.perf_counter()
m = hybrid.load({path!r})
t2 = time.perf_counter()
m.warm_up()
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "warm_up_s": t3 - t2, "total_s": t3 - t0}}))
"""


def start(path: str, cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", CHILD.format(path=path)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(path: str, tmp: str, name: str) -> dict:
    cache_dir = os.path.join(tmp, f"numba-{name}")
    cold = start(path, cache_dir)
    warm = min((start(path, cache_dir) for _ in range(2)), key=lambda r: r["total_s"])
    return {"model": name, "cold": cold, "warm": warm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model path (default: the built-in model and a small synthetic MoE)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            models = [(os.path.basename(args.model), args.model)]
        else:
            from hybrid.cli.defaults import default_model_path
            from hybrid.writers.synthetic import write_moe_gguf

            moe = os.path.join(tmp, "moe.gguf")
            write_moe_gguf(moe, layers=4, hidden=512, experts=8, expert_width=256, top_k=2, heads=8, kv_heads=2)
            models = [("SmolLM2-135M Q4_1 (built-in)", str(default_model_path())), ("synthetic MoE Q8_0 (4 layers)", moe)]
        for name, path in models:
            results.append(measure(path, tmp, str(len(results))) | {"model": name})
    print(f"{'model':<32} {'start':<5} {'import s':>8} {'load s':>7} {'warm-up s':>9} {'total s':>8}")
    for r in results:
        for kind in ("cold", "warm"):
            t = r[kind]
            print(f"{r['model']:<32} {kind:<5} {t['import_s']:>8.2f} {t['load_s']:>7.2f} {t['warm_up_s']:>9.2f} {t['total_s']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
