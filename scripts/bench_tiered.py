"""Decode speed after a tiered start's swap against a start straight on the kernels.

    python scripts/bench_tiered.py [--model M.gguf] [--tokens 64] [--rounds 3]

One process: engine A starts on torch (`load_tiered(..., tiered=True)`; its compiler finds the
kernels cached, or compiles them first) and is timed on torch, then again once the kernels are
swapped in; engine B runs the kernel model from the start. Greedy generations of --tokens
tokens from the same prompt, alternating A and B, best of --rounds; decode tok/s from the
engine's own timings (eval_ns).
"""

from __future__ import annotations

import argparse
import time


def decode_speed(engine, ids, tokens: int) -> tuple[float, list[int]]:
    from hybrid.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens)
    out, last = [], None
    for last in engine.submit(ids, params):
        if last.token is not None:
            out.append(last.token)
    n = last.usage["completion_tokens"] - 1  # the first token came out of the prompt pass
    return n / (last.timings["eval_ns"] / 1e9), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF file (default: the built-in model)")
    ap.add_argument("--rules", help="the kernel rules (default: the family's)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import hybrid
    from hybrid.cli.defaults import default_model_path
    from hybrid.engine.generate import chat_prompt_ids
    from hybrid.engine.scheduler import Engine
    from hybrid.inject.tiered import load_tiered

    path = args.model or default_model_path()
    model, tiers = load_tiered(path, args.rules, tiered=True)
    ids = chat_prompt_ids(model.tokenizer, [{"role": "user", "content": "Write a short story about a lighthouse."}])
    tiered = Engine(model, slots=1, ctx=1024).start()
    del model
    on_torch, _ = decode_speed(tiered, ids, args.tokens)
    tiers.attach(tiered)
    t0 = time.monotonic()
    tiers.done.wait()
    if tiers.state != "ready":
        raise SystemExit(f"the kernels did not come: {tiers.snapshot()}")
    waited = time.monotonic() - t0
    direct = Engine(hybrid.load(path, tiers.rules), slots=1, ctx=1024).start()
    direct.model.warm_up()
    best = {"after swap": 0.0, "direct": 0.0}
    outputs = {}
    for _ in range(args.rounds):
        for name, engine in (("after swap", tiered), ("direct", direct)):
            speed, out = decode_speed(engine, ids, args.tokens)
            best[name] = max(best[name], speed)
            outputs[name] = out
    tiered.stop()
    direct.stop()
    print(f"kernels swapped in {waited:.1f} s after the torch run; same greedy tokens: "
          f"{outputs['after swap'] == outputs['direct']}")
    print(f"{'engine':<26} {'decode tok/s':>12}")
    print(f"{'tiered, on torch':<26} {on_torch:>12.1f}")
    for name, speed in best.items():
        print(f"{'tiered, ' + name if name == 'after swap' else 'kernels from the start':<26} {speed:>12.1f}")


if __name__ == "__main__":
    main()
