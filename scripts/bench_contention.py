"""Decode speed of a model alone and beside one busy competing process, and the ratio.

    python scripts/bench_contention.py [--model M.gguf] [--tokens 64] [--repeats 3]
                                       [--layer default,omp,omp-passive,workqueue] [--llama-cpp]
                                       [--json FILE]

Each configuration runs in a fresh process (numba's threading layer and OpenMP's wait
policy are fixed when the first parallel kernel starts its pool). That process loads the
model (default: the built-in one), warms it up, then alternates: decode `--tokens` greedy
tokens alone, then the same with a competitor running (a Python busy loop in another
process, one core's worth of work), `--repeats` times; the best of each is kept. The
ratio busy / idle is what a user sees beside a browser or a second model.

Layers: `default` is what `import hybrid` chooses (hybrid/threads.py); `omp` is numba's
OpenMP layer with libgomp's default wait (spin 300,000 rounds, then sleep), `omp-active`
spins without end, `omp-spinN` (`omp-spin20k`, `omp-spin500`) spins N rounds, `omp-passive` sleeps at once
(OMP_WAIT_POLICY=PASSIVE); `workqueue` is numba's portable pool, `tbb` needs the tbb
package. `--llama-cpp` also measures llama.cpp (llama-cpp-python, if installed) on the
same GGUF, same thread count, same competitor, in its own default environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# The environment as it was before `import hybrid` set its defaults (hybrid.threads).
BASE_ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_NUM_THREADS")}
LAYERS = {
    "default": {},
    "omp": {"NUMBA_THREADING_LAYER": "omp", "GOMP_SPINCOUNT": "300000"},  # libgomp's own default
    "omp-active": {"NUMBA_THREADING_LAYER": "omp", "OMP_WAIT_POLICY": "ACTIVE"},
    "omp-spin20k": {"NUMBA_THREADING_LAYER": "omp", "GOMP_SPINCOUNT": "20000"},
    "omp-passive": {"NUMBA_THREADING_LAYER": "omp", "OMP_WAIT_POLICY": "PASSIVE"},
    "workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
    "tbb": {"NUMBA_THREADING_LAYER": "tbb"},
}
BUSY = "while True: pass"


class Competitor:
    """One busy process for the duration of a `with` block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY])
        time.sleep(0.3)  # let the scheduler see it as a running task
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def alternate(decode, repeats: int) -> dict:
    """Best tokens/s of `decode()` alone and beside a competitor, `repeats` of each, interleaved
    so that a change in the machine's load hits both."""
    idle, busy = [], []
    for _ in range(repeats):
        idle.append(decode())
        with Competitor():
            busy.append(decode())
    return {"idle_tok_s": max(idle), "busy_tok_s": max(busy), "ratio": max(busy) / max(idle),
            "idle_all": idle, "busy_all": busy}


def child_hybrid(model_path: str, tokens: int, repeats: int) -> dict:
    import hybrid  # first, as the CLI does: its defaults reach numba's and torch's OpenMP

    import numba
    import torch

    model = hybrid.load(model_path)
    model.warm_up()
    cache = model.new_cache(1, tokens + 8)

    @torch.inference_mode()
    def decode() -> float:
        tok = torch.tensor([[1]])
        t0 = time.perf_counter()
        for pos in range(tokens):
            tok = model.forward(tok, [pos], [0], cache)[:, -1].argmax(-1, keepdim=True)
        return tokens / (time.perf_counter() - t0)

    decode()
    out = alternate(decode, repeats)
    out.update(threading_layer=numba.threading_layer(), threads=numba.get_num_threads(),
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    return out


def child_llama_cpp(model_path: str, tokens: int, repeats: int) -> dict:
    from llama_cpp import Llama

    from hybrid.threads import default_threads

    threads = default_threads()
    llm = Llama(model_path=model_path, n_ctx=tokens + 16, n_threads=threads, n_threads_batch=threads, verbose=False)

    def decode() -> float:
        llm.reset()
        llm.eval([1])
        t0 = time.perf_counter()
        tok = 1
        for _ in range(tokens):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
        return tokens / (time.perf_counter() - t0)

    decode()
    out = alternate(decode, repeats)
    out.update(threads=threads)
    return out


def run_child(kind: str, env: dict, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model", args.model, "--tokens", str(args.tokens),
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env={**BASE_ENV, **env}, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {env} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF file (default: the built-in model)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per measurement (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="idle/busy measurements, best kept (default 3)")
    ap.add_argument("--layer", default="default", help=f"comma-separated, of {', '.join(LAYERS)} (default: default)")
    ap.add_argument("--llama-cpp", action="store_true", help="also measure llama-cpp-python on the same file")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from hybrid.cli.defaults import default_model_path

        args.model = default_model_path()
    for name in args.layer.split(","):  # omp-spinN: libgomp spins N rounds, then sleeps
        if name.startswith("omp-spin") and name[8:].rstrip("k").isdigit():
            LAYERS.setdefault(name, {"NUMBA_THREADING_LAYER": "omp",
                                     "GOMP_SPINCOUNT": str(int(name[8:].rstrip("k")) * (1000 if name.endswith("k") else 1))})
    unknown = set(args.layer.split(",")) - set(LAYERS)
    if unknown:
        ap.error(f"unknown layer(s) {sorted(unknown)}; choose from {', '.join(LAYERS)}")
    if args.child:
        fn = child_llama_cpp if args.child == "llama.cpp" else child_hybrid
        print(json.dumps(fn(args.model, args.tokens, args.repeats)))
        return

    print(f"model: {os.path.basename(args.model)}, {args.tokens} tokens decoded, best of {args.repeats}, "
          f"competitor: one Python busy loop; cores usable: {len(os.sched_getaffinity(0))}")
    print(f"{'engine':<24} {'layer':<10} {'threads':>7} {'idle tok/s':>10} {'busy tok/s':>10} {'ratio':>6}", flush=True)
    jobs = [(f"hybrid ({name})", "hybrid", LAYERS[name]) for name in args.layer.split(",")]
    if args.llama_cpp:
        jobs.append(("llama.cpp", "llama.cpp", {}))
    runs = []
    for label, kind, env in jobs:
        r = {"engine": label, **run_child(kind, env, args)}
        runs.append(r)
        print(f"{r['engine']:<24} {r.get('threading_layer', '-'):<10} {r['threads']:>7} {r['idle_tok_s']:>10.1f} "
              f"{r['busy_tok_s']:>10.1f} {r['ratio']:>6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
