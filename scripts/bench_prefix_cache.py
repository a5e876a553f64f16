"""Time to first token of a repeated ~1,500-token prefix, cold against cached (prefix cache).

    python scripts/bench_prefix_cache.py [--model PATH] [--rules NAME] [--prefix-tokens 1500] [--rounds 3]

Each round sends a chat whose system prompt is the same long text and whose question
differs. Cold: an engine without a prefix cache (every request prefills all of it);
cached: an engine with the default 256 MB cache, after one request has filled it. Times
are submission to the first generated token, the median of `--rounds` requests each, as
a markdown table (docs/performance.md, "Prefix cache").
"""

from __future__ import annotations

import argparse
import statistics
import time

import hybrid
from hybrid.cli.defaults import PREFIX_CACHE_MB, default_model_path
from hybrid.engine.scheduler import Engine
from hybrid.engine.generate import chat_prompt_ids
from hybrid.engine.sampling import SamplingParams

SENTENCE = ("Rule {i}: when a customer asks about order {i}, look it up, confirm the delivery date, "
            "and answer politely in one short paragraph. ")
QUESTIONS = ["Where is my order?", "Can I change the address?", "When does it arrive?", "Can I cancel it?",
             "Is it paid?", "Who is the courier?", "Can I add an item?"]


def system_prompt(tokenizer, tokens: int) -> str:
    text, i = "", 0
    while len(tokenizer.encode(text)) < tokens:
        text += SENTENCE.format(i=i)
        i += 1
    return text


def ttft(engine: Engine, prompt: list[int]) -> float:
    t = time.perf_counter()
    stream = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=1))
    for ev in stream:
        if ev.token is not None:
            return time.perf_counter() - t
    raise RuntimeError(f"no token generated: {ev.finish_reason} {ev.error}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: the built-in one)")
    ap.add_argument("--rules", default=None, help="rule file (default: the family's)")
    ap.add_argument("--prefix-tokens", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = hybrid.load(args.model or default_model_path(), rules=args.rules)
    model.warm_up()
    system = system_prompt(model.tokenizer, args.prefix_tokens)
    prompts = [chat_prompt_ids(model.tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": q}])
               for q in QUESTIONS[: args.rounds + 1]]
    ctx = max(map(len, prompts)) + 16
    cold_engine = Engine(model, slots=1, ctx=ctx)
    cached_engine = Engine(model, slots=1, ctx=ctx, prefix_cache=PREFIX_CACHE_MB << 20)
    ttft(cold_engine, prompts[-1])                    # warm: kernels and allocator at this length
    ttft(cached_engine, prompts[-1])                  # fills the prefix cache
    cold = [ttft(cold_engine, p) for p in prompts[:-1]]
    cached = [ttft(cached_engine, p) for p in prompts[:-1]]
    reused = cached_engine.stats()["prefix_cache"]["tokens_reused"] // args.rounds
    c, w = statistics.median(cold), statistics.median(cached)
    print(f"model {model.name}, prompt {len(prompts[0])} tokens (system prompt {args.prefix_tokens}), "
          f"median of {args.rounds}")
    print("| | time to first token | prompt tokens prefilled |")
    print("|---|---|---|")
    print(f"| cold (no prefix cache) | {c * 1000:.0f} ms | {len(prompts[0])} |")
    print(f"| cached | {w * 1000:.0f} ms | {len(prompts[0]) - reused} |")
    print(f"| cached / cold | {w / c:.3f} | |")


if __name__ == "__main__":
    main()
