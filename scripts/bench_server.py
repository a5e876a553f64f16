#!/usr/bin/env python
"""Benchmark `hybrid serve`: aggregate generated tokens/s and time to first token with 1, 4
and 8 concurrent streaming clients (OpenAI /v1/chat/completions, stream + include_usage).

    python scripts/bench_server.py                       # starts `hybrid serve` on the default model
    python scripts/bench_server.py --model some-moe.gguf # another model
    python scripts/bench_server.py --url http://127.0.0.1:8000 --api-key KEY   # a running server

Each level runs `--rounds` waves of N simultaneous requests with distinct prompts (greedy,
`--max-tokens` each); tokens are counted from the usage chunk, so early stops are counted
as they are. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

import requests

TOPICS = ["the sea", "a mountain", "a city at night", "an old library", "a forest", "a desert", "the moon",
          "a train journey", "a lighthouse", "a garden", "a storm", "a market", "a river", "a castle",
          "a spaceship", "a snowy village"]


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "hybrid", "serve", "--port", "0", "--slots", str(args.slots),
           "--ctx", str(args.ctx), "--max-queue", "256"]
    if args.model:
        cmd += ["--model", args.model]
    if args.rules:
        cmd += ["--rules", args.rules]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "HYBRID_API_KEY": ""})
    url = re.search(r"listening on (http://\S+),", proc.stdout.readline()).group(1)
    while requests.get(url + "/health", timeout=5).status_code != 200:
        if proc.poll() is not None:
            sys.exit("the server exited while loading")
        time.sleep(0.5)
    return proc, url


def one_request(url, headers, prompt, max_tokens, out: list) -> None:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    with requests.post(url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    out.append((first if first is not None else time.perf_counter() - t0, tokens))


def level(url, headers, clients: int, rounds: int, max_tokens: int) -> dict:
    results, wall = [], 0.0
    for r in range(rounds):
        threads = [threading.Thread(target=one_request,
                                    args=(url, headers, f"Write a long story about {TOPICS[(r * clients + i) % 16]}.",
                                          max_tokens, results))
                   for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall += time.perf_counter() - t0
    ttft = [t for t, _ in results]
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall": wall,
            "tps": tokens / wall, "ttft_mean": statistics.mean(ttft), "ttft_max": max(ttft)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--url", help="benchmark this running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("HYBRID_API_KEY"))
    p.add_argument("--model", help="model for the started server (default: the built-in one)")
    p.add_argument("--rules")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--clients", default="1,4,8", help="comma-separated concurrency levels")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    proc, url = (None, args.url) if args.url else start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = requests.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        one_request(url, headers, "Hello", 4, [])  # warm-up: compiles the kernels
        rows = [level(url, headers, int(c), args.rounds, args.max_tokens) for c in args.clients.split(",")]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    base = rows[0]["tps"]
    print(f"model {model}, {args.slots} slots, max_tokens {args.max_tokens}, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs\n")
    print("| clients | requests | generated tokens | wall s | aggregate tok/s | vs 1 client "
          "| TTFT mean s | TTFT max s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall']:.1f} | {r['tps']:.1f} | "
              f"{r['tps'] / base:.2f}x | {r['ttft_mean']:.2f} | {r['ttft_max']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
