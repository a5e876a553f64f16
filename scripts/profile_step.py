#!/usr/bin/env python
"""Time one decode step (`Model.forward`, batch 1) of a model under a rule file, at several
numba thread counts, and show where it goes: the CPU experts (copies and the numba call,
timed between synchronisations) and, with --profile, torch's profiler table.

    python scripts/profile_step.py MODEL.gguf --rules mixtral-gpu --threads 15,8 --profile
    python scripts/profile_step.py MODEL.gguf --threads 1 --steps 50 --python
    python scripts/profile_step.py MODEL.gguf --threads 1 --prefill 512

--python splits a step between the numba kernels and the Python around them (cProfile);
--prefill N times a prefill of N tokens per operator (forward hooks).
Used for the "GPU hybrid" and "Python in a decode step" figures in docs/performance.md."""

from __future__ import annotations

import argparse
import time

import numba
import torch

import hybrid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rules", help="rule file or built-in name (default: chosen by family and CUDA)")
    ap.add_argument("--threads", default="", help="comma-separated numba thread counts (default: all cores)")
    ap.add_argument("--prompt", type=int, default=100, help="prompt tokens before the timed steps")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's table for 5 steps")
    ap.add_argument("--prefill", type=int, default=0, metavar="N",
                    help="also time a prefill of N tokens per operator class and module name (forward hooks)")
    ap.add_argument("--python", action="store_true",
                    help="split a step's time between the numba kernels and Python (cProfile)")
    a = ap.parse_args()

    m = hybrid.load(a.model, rules=a.rules)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cache = m.new_cache(1, a.prompt + 3 * a.steps + 64)
    m.forward(torch.randint(0, m.config.vocab_size, (1, a.prompt)), [0], [0], cache)
    token, pos = torch.tensor([[5]]), [a.prompt]

    def timed(n: int) -> float:
        sync()
        t = time.perf_counter()
        for _ in range(n):
            m.forward(token, pos, [0], cache)
            pos[0] += 1
        sync()
        return (time.perf_counter() - t) / n * 1e3

    experts = [mod for mod in m.module.modules() if type(mod).__name__ == "CPUExperts"]
    counts = [int(t) for t in a.threads.split(",") if t] or [numba.config.NUMBA_NUM_THREADS]
    for th in counts:
        for e in experts:  # the operators' own setting wins over numba's thread-local one
            e.threads = th
        numba.set_num_threads(min(th, numba.config.NUMBA_NUM_THREADS))
        torch.set_num_threads(th)
        timed(3)
        print(f"threads {th}: {timed(a.steps):.2f} ms/step", flush=True)

    spent, calls = [0.0], [0]

    def before(mod, args):
        sync()
        mod._t0 = time.perf_counter()

    def after(mod, args, out):
        sync()
        spent[0] += time.perf_counter() - mod._t0
        calls[0] += 1

    hooks = [h for e in experts for h in (e.register_forward_pre_hook(before), e.register_forward_hook(after))]
    total = timed(a.steps)
    where = f"of which CPU experts {spent[0] / a.steps * 1e3:.2f}" if calls[0] else "CPU experts not called (fused into CPUDecoderLayer)"
    print(f"with synchronising hooks: {total:.2f} ms/step, {where}")
    for h in hooks:
        h.remove()

    if a.python:
        python_time(lambda: timed(a.steps), a.steps)

    if a.prefill:
        prefill_profile(m, a.prefill)

    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            timed(5)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def prefill_profile(m, n: int) -> None:
    """One prefill of n tokens (after one untimed), the time of each operator summed by its
    class and last name (`CPUExperts experts`, `CPULinear q_proj`, ...) over the layers; an
    operator's time includes its children's."""
    import collections

    cache = m.new_cache(1, n + 16)
    ids = torch.randint(0, m.config.vocab_size, (1, n))
    m.forward(ids, [0], [0], cache, keep=[n - 1])
    spent = collections.Counter()

    def before(mod, args):
        mod._t0 = time.perf_counter()

    def after(mod, args, out):
        spent[f"{type(mod).__name__} {mod._profile_name}"] += time.perf_counter() - mod._t0

    hooks = []
    for name, mod in m.module.named_modules():
        if name.count(".") >= 3 or name.endswith(("lm_head", "norm", "embed_tokens")):  # inside a layer, or the ends
            mod._profile_name = name.rsplit(".", 1)[-1]
            hooks += [mod.register_forward_pre_hook(before), mod.register_forward_hook(after)]
    t = time.perf_counter()
    m.forward(ids, [0], [0], cache, keep=[n - 1])
    wall = time.perf_counter() - t
    for h in hooks:
        h.remove()
    print(f"prefill of {n} tokens: {wall:.2f} s, {n / wall:.1f} tok/s; by operator (children counted in their parents):")
    for what, secs in spent.most_common(12):
        print(f"  {secs:7.2f} s {secs / wall:6.1%}  {what}")


def _kernel_sites() -> set[tuple[str, int]]:
    """(file, first line) of every numba-compiled function of the kernels, as cProfile names them."""
    import importlib
    import pkgutil

    import hybrid.operators.kernels as kernels

    sites = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        for obj in vars(importlib.import_module(f"{kernels.__name__}.{info.name}")).values():
            if isinstance(obj, numba.core.dispatcher.Dispatcher):
                code = obj.py_func.__code__
                sites.add((code.co_filename, code.co_firstlineno))
    return sites


def python_time(run, steps: int) -> None:
    """Per step: wall time, the time inside numba-compiled kernels (their own time, as cProfile
    sees a compiled call: one opaque C call) and what is left, the Python around them (module
    calls, argument packing, torch glue), with the largest Python items."""
    import cProfile
    import pstats

    sites = _kernel_sites()
    prof = cProfile.Profile()
    prof.enable()
    wall = run()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    own = {key: v[2] * 1e3 / steps for key, v in stats.items()}
    kernel = sum(t for (f, line, _), t in own.items() if (f, line) in sites)
    total = sum(own.values())
    print(f"python profile: {wall:.2f} ms/step under cProfile; numba kernels {kernel:.2f} ms, "
          f"Python and torch glue {total - kernel:.2f} ms ({(total - kernel) / total:.1%}; cProfile's own "
          f"cost inflates it)")
    top = sorted(((t, k) for k, t in own.items() if (k[0], k[1]) not in sites), reverse=True)[:8]
    for t, (f, line, name) in top:
        print(f"  {t:6.3f} ms  {name} ({f.rsplit('/', 2)[-1] if '/' in f else f}:{line})")


if __name__ == "__main__":
    main()
