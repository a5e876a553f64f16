"""hybrid against llama.cpp (llama-cpp-python) on the same GGUF files: decode and prefill
speed, 1 and 2 threads, runs interleaved, the ratio hybrid / llama.cpp per cell.

    python scripts/bench_vs_llamacpp.py [--model F.gguf ...] [--threads 1,2] [--rounds 3] [--json]
    python scripts/bench_vs_llamacpp.py --isa avx2 --llama-path /opt/llama-avx2 --model F.gguf
    python scripts/bench_vs_llamacpp.py --model F.gguf --threads 2 --long-context 2000

Each file is loaded once by a hybrid worker process and once by a llama.cpp worker process,
both kept alive; the parent alternates between them (hybrid, llama.cpp, hybrid, ...) and
keeps the best of --rounds runs of each measurement. Both decode the same fixed token
stream (teacher-forced, --decode-tokens steps after a prompt of --decode-after tokens, so
at the same context lengths) and prefill the same --prompt-tokens prompt; each computes
the full vocabulary's logits for every decoded token and for the prompt's last one.
--long-context N decodes the same stream again after N tokens of context and prints what
the context costs each side (1 - the speed after N / the speed after --decode-after).

--isa avx2 measures the AVX2-only case on a machine with AVX-512: hybrid's kernels are
compiled for Haswell (NUMBA_CPU_NAME=haswell) and llama.cpp must come from an AVX2-only
build, given with --llama-path (a directory that holds the llama_cpp package). Build it once
(--no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS, so after a native build it
would install that wheel again):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF" \\
        pip install --no-cache-dir --no-deps --target /opt/llama-avx2 llama-cpp-python

(the native build: CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" pip install llama-cpp-python;
where its AMX kernels fault, as in some VMs, build the CPU's other features explicitly with
-DGGML_NATIVE=OFF ... -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_INT8=OFF
into a --target directory, which keeps llama.cpp's repacked weights, rather than
--llama-plain-buffers).
llama-cpp-python is a benchmark dependency only, not one of hybrid's."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

# The environment before anything here imports hybrid, whose defaults (hybrid.threads) would
# otherwise reach llama.cpp's OpenMP too: each engine runs with its own defaults.
BASE_ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_NUM_THREADS")}

WORKER_OPS = ("hybrid", "llama")


# ----------------------------------------------------------------------------- workers


class HybridWorker:
    """hybrid's Python API, as the engine decodes: one cache slot, forward per token."""

    def __init__(self, path: str, ctx: int, rules: str | None):
        import hybrid  # first, as the CLI does: its thread defaults reach numba's and torch's OpenMP

        import numba
        import torch
        from hybrid.cli import measure as bench
        from hybrid.operators.kernels.intrinsics import HAS_VNNI

        self.torch, self.numba = torch, numba
        self.model = hybrid.load(path, rules=rules)
        self.cache = self.model.new_cache(1, ctx)
        self.info = {
            "rules": self.model.ruleset.source if self.model.ruleset else None,
            "numba_cpu_name": numba.config.CPU_NAME or "host",
            "vnni_kernels": bool(HAS_VNNI),
            "decode_bytes_per_token": bench.decode_bytes_per_token(self.model),
            "vocab": self.model.config.vocab_size,
        }

    def threads(self, n: int) -> None:
        self.numba.set_num_threads(n)
        self.torch.set_num_threads(n)

    def prefill(self, tokens: list[int]) -> None:
        ids = self.torch.tensor([tokens])
        self.model.forward(ids, [0], [0], self.cache, keep=[len(tokens) - 1])

    def decode(self, start: int, tokens: list[int]) -> None:
        for i, tok in enumerate(tokens):
            self.model.forward(self.torch.tensor([[tok]]), [start + i], [0], self.cache)


class LlamaWorker:
    """llama-cpp-python's Llama: eval of a prompt, then one eval per token."""

    def __init__(self, path: str, ctx: int, extra_buffers: bool):
        import llama_cpp

        if not extra_buffers:  # plain CPU buffers (no repacking, no AMX)
            defaults = llama_cpp.llama_model_default_params

            def params():
                p = defaults()
                p.use_extra_bufts = False
                return p

            llama_cpp.llama_cpp.llama_model_default_params = params
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(path, n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=1, n_threads_batch=1,
                                   logits_all=False, verbose=False)
        self.info = {
            "llama_cpp": f"{llama_cpp.__version__} at {os.path.dirname(llama_cpp.__file__)}",
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "extra_buffers": extra_buffers,
            "vocab": self.llm.n_vocab(),
        }

    def threads(self, n: int) -> None:
        self.lib.llama_set_n_threads(self.llm.ctx, n, n)

    def prefill(self, tokens: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(tokens)

    def decode(self, start: int, tokens: list[int]) -> None:
        self.llm.n_tokens = start  # the prompt of `start` tokens stays in the cache
        for tok in tokens:
            self.llm.eval([tok])


def worker_main(args) -> None:
    """Answer one JSON command per stdin line on the protocol stream (the original stdout;
    fd 1 then points at stderr, so library prints cannot corrupt it)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    if args.worker == "hybrid":
        w = HybridWorker(args.model[0], args.ctx, args.rules)
    else:
        w = LlamaWorker(args.model[0], args.ctx, not args.llama_plain_buffers)
    proto.write(json.dumps({"ready": True, "info": w.info}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        w.threads(cmd["threads"])
        t = time.perf_counter()
        if cmd["op"] == "prefill":
            w.prefill(cmd["tokens"])
        else:
            w.decode(cmd["start"], cmd["tokens"])
        proto.write(json.dumps({"seconds": time.perf_counter() - t}) + "\n")


# ----------------------------------------------------------------------------- parent


class Worker:
    def __init__(self, kind: str, model: str, args, env: dict):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--model", model, "--ctx", str(args.ctx)]
        if args.rules:
            cmd += ["--rules", args.rules]
        if args.llama_plain_buffers:
            cmd += ["--llama-plain-buffers"]
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()["info"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            why = f"signal {-code}" + (" (illegal instruction: the library uses an instruction this CPU or VM "
                                       "does not run; for llama.cpp with AMX_INT8 in its system info, build it "
                                       "without AMX or pass --llama-plain-buffers)" if code == -4 else "")
            raise SystemExit(f"the {self.kind} worker died ({why if code < 0 else f'exit {code}'}); see its stderr above")
        return json.loads(line)

    def run(self, **cmd) -> float:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def cpu_features() -> list[str]:
    wanted = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [w for w in wanted if w in flags]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def bench_file(path: str, args, hyb_env: dict, llama_env: dict) -> dict:
    hyb = Worker("hybrid", path, args, hyb_env)
    llama = Worker("llama", path, args, llama_env)
    try:
        if args.isa == "avx2" and "AVX512 = 1" in llama.info["system_info"]:
            raise SystemExit(f"--isa avx2 but llama.cpp at {llama.info['llama_cpp']} was built with AVX-512 "
                             f"({llama.info['system_info']}); build the AVX2-only variant (see --help) and pass --llama-path")
        if hyb.info["vocab"] != llama.info["vocab"]:
            raise SystemExit(f"{path}: hybrid sees {hyb.info['vocab']} tokens, llama.cpp {llama.info['vocab']}")
        rng = np.random.default_rng(0)
        vocab = hyb.info["vocab"]
        prompt = rng.integers(0, vocab, args.prompt_tokens).tolist()
        before = rng.integers(0, vocab, args.decode_after).tolist()
        stream = rng.integers(0, vocab, args.decode_tokens).tolist()
        long_before = rng.integers(0, vocab, args.long_context).tolist() if args.long_context else []
        ops = ("decode", "prefill") + (("decode_long",) if long_before else ())
        cells = []
        for t in args.threads:
            times = {(w.kind, op): [] for w in (hyb, llama) for op in ops}
            for r in range(args.rounds + 1):  # round 0 warms up (compiles, faults pages in) and is dropped
                for w in (hyb, llama):
                    w.run(op="prefill", threads=t, tokens=before)
                    s = w.run(op="decode", threads=t, start=len(before), tokens=stream)
                    if r:
                        times[(w.kind, "decode")].append(s)
                for w in (hyb, llama):
                    s = w.run(op="prefill", threads=t, tokens=prompt)
                    if r:
                        times[(w.kind, "prefill")].append(s)
                for w in (hyb, llama) if long_before else ():  # the same stream after a long context
                    w.run(op="prefill", threads=t, tokens=long_before)
                    s = w.run(op="decode", threads=t, start=len(long_before), tokens=stream)
                    if r:
                        times[(w.kind, "decode_long")].append(s)
            cell = {"threads": t}
            for (kind, op), secs in times.items():
                n = args.prompt_tokens if op == "prefill" else args.decode_tokens
                cell[f"{kind}_{op}_tok_s"] = n / min(secs)
                cell[f"{kind}_{op}_tok_s_median"] = n / statistics.median(secs)
            cell["decode_ratio"] = cell["hybrid_decode_tok_s"] / cell["llama_decode_tok_s"]
            cell["prefill_ratio"] = cell["hybrid_prefill_tok_s"] / cell["llama_prefill_tok_s"]
            if long_before:  # what the long context costs each side: 1 - long-context speed / short's
                for kind in ("hybrid", "llama"):
                    cell[f"{kind}_context_cost"] = 1 - cell[f"{kind}_decode_long_tok_s"] / cell[f"{kind}_decode_tok_s"]
                cell["decode_long_ratio"] = cell["hybrid_decode_long_tok_s"] / cell["llama_decode_long_tok_s"]
            cell["hybrid_decode_gb_s"] = hyb.info["decode_bytes_per_token"] * cell["hybrid_decode_tok_s"] / 1e9
            cells.append(cell)
            print(f"  {os.path.basename(path)} {t} thread(s): decode {cell['hybrid_decode_tok_s']:.1f} / "
                  f"{cell['llama_decode_tok_s']:.1f} tok/s = {cell['decode_ratio']:.2f}x, prefill "
                  f"{cell['hybrid_prefill_tok_s']:.1f} / {cell['llama_prefill_tok_s']:.1f} = {cell['prefill_ratio']:.2f}x",
                  file=sys.stderr)
            if long_before:
                print(f"  after {args.long_context} tokens: decode {cell['hybrid_decode_long_tok_s']:.1f} / "
                      f"{cell['llama_decode_long_tok_s']:.1f} tok/s = {cell['decode_long_ratio']:.2f}x; the context "
                      f"costs hybrid {cell['hybrid_context_cost']:.0%}, llama.cpp {cell['llama_context_cost']:.0%}",
                      file=sys.stderr)
        return {"model": path, "file_bytes": os.path.getsize(path), "hybrid": hyb.info, "llama": llama.info, "cells": cells}
    finally:
        hyb.close()
        llama.close()


def format_table(report: dict) -> str:
    lines = [
        f"CPU: {report['cpu']}; features: {' '.join(report['cpu_features'])}; ISA: {report['isa']}",
        f"decode: {report['decode_tokens']} tokens after {report['decode_after']}; prefill: {report['prompt_tokens']} "
        f"tokens; best of {report['rounds']} interleaved rounds",
    ]
    for f in report["files"]:
        lines += ["", f"{os.path.basename(f['model'])} ({f['file_bytes'] / 1e9:.2f} GB); hybrid rules: "
                      f"{os.path.basename(f['hybrid']['rules'] or '-')}, numba CPU: {f['hybrid']['numba_cpu_name']}, "
                      f"VNNI kernels: {f['hybrid']['vnni_kernels']}; llama.cpp {f['llama']['llama_cpp']}",
                  f"  llama.cpp extra CPU buffers (repacking, AMX): {'on' if f['llama']['extra_buffers'] else 'off'}; "
                  f"system info: {f['llama']['system_info']}"]
    lines += ["", "| file | threads | hybrid decode tok/s | llama.cpp decode tok/s | ratio | hybrid prefill tok/s "
                  "| llama.cpp prefill tok/s | ratio | hybrid decode GB/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for f in report["files"]:
        for c in f["cells"]:
            lines.append(f"| {os.path.basename(f['model'])} | {c['threads']} | {c['hybrid_decode_tok_s']:.1f} | "
                         f"{c['llama_decode_tok_s']:.1f} | {c['decode_ratio']:.2f}x | {c['hybrid_prefill_tok_s']:.1f} | "
                         f"{c['llama_prefill_tok_s']:.1f} | {c['prefill_ratio']:.2f}x | {c['hybrid_decode_gb_s']:.1f} |")
    if report["long_context"]:
        lines += ["", f"| file | threads | hybrid decode after {report['long_context']} tok/s | llama.cpp | ratio "
                      "| hybrid context cost | llama.cpp context cost |", "|---|---|---|---|---|---|---|"]
        for f in report["files"]:
            for c in f["cells"]:
                lines.append(f"| {os.path.basename(f['model'])} | {c['threads']} | {c['hybrid_decode_long_tok_s']:.1f} | "
                             f"{c['llama_decode_long_tok_s']:.1f} | {c['decode_long_ratio']:.2f}x | "
                             f"{c['hybrid_context_cost']:.0%} | {c['llama_context_cost']:.0%} |")
    return "\n".join(lines)


def parse_threads(text: str) -> list[int]:
    try:
        threads = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2, got {text!r}") from None
    if not threads or min(threads) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "-m", action="append", metavar="GGUF",
                    help="a GGUF file both can read; repeatable (default: the built-in model)")
    ap.add_argument("--threads", type=parse_threads, default=[1, 2], help="thread counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept (default 3)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prefill prompt length (default 512)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="decoded tokens per run (default 64)")
    ap.add_argument("--decode-after", type=int, default=16, help="context before the decoded tokens (default 16)")
    ap.add_argument("--long-context", type=int, default=0, metavar="N",
                    help="also decode the same tokens after N tokens of context, and print what the context "
                         "costs each side (the issue's 2,000; default: off)")
    ap.add_argument("--rules", help="hybrid's rules: a rule file, a built-in name or YAML text (default: the family's)")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: hybrid compiled for Haswell, llama.cpp from --llama-path (must be AVX2-only)")
    ap.add_argument("--llama-path", metavar="DIR", help="a directory holding the llama_cpp package to use")
    ap.add_argument("--llama-plain-buffers", action="store_true",
                    help="llama.cpp without its extra CPU buffers (repacked weights, AMX): only where those fault")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--worker", choices=WORKER_OPS, help=argparse.SUPPRESS)
    ap.add_argument("--ctx", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)

    from hybrid.cli.defaults import default_model_path

    models = args.model or [default_model_path()]
    for m in models:
        if not os.path.isfile(m):
            ap.error(f"--model {m}: no such file (a GGUF file both hybrid and llama.cpp read)")
    for name in ("rounds", "prompt_tokens", "decode_tokens", "decode_after"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.isa == "avx2" and not args.llama_path:
        ap.error("--isa avx2 needs --llama-path: a directory with an AVX2-only llama-cpp-python (see --help)")
    if args.long_context < 0:
        ap.error(f"--long-context must be 0 (off) or a token count, got {args.long_context}")
    args.ctx = max(args.prompt_tokens, max(args.decode_after, args.long_context) + args.decode_tokens) + 16
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = [p for p in (os.environ.get("PYTHONPATH"), repo) if p]
    hyb_env = {**BASE_ENV, "PYTHONPATH": os.pathsep.join(pythonpath)}
    if args.isa == "avx2":
        hyb_env["NUMBA_CPU_NAME"] = "haswell"
    llama_env = {**BASE_ENV, "PYTHONPATH": os.pathsep.join(([args.llama_path] if args.llama_path else []) + pythonpath)}
    llama_env.pop("NUMBA_CPU_NAME", None)
    report = {
        "command": " ".join(sys.argv),
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "isa": args.isa,
        "rounds": args.rounds,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "decode_after": args.decode_after,
        "long_context": args.long_context,
        "files": [bench_file(m, args, hyb_env, llama_env) for m in models],
    }
    print(json.dumps(report, indent=1) if args.json else format_table(report))


if __name__ == "__main__":
    main()
