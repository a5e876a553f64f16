"""`hybrid fit`: write a rule file fitted to a GPU's memory (no weights are read)."""

from __future__ import annotations

import sys

HELP = "write a rule file that fits the model to a GPU's memory (no weights are read)"


def add_parser(subparsers):
    from .defaults import _context_size, add_gpu_args, memory_size

    p = subparsers.add_parser(
        "fit",
        help=HELP,
        description=HELP + ": attention, norms, embeddings, lm_head, routers, shared experts and dense MLPs on the "
        "GPU with the KV cache, then routed experts a whole layer at a time, the layer at the edge split between GPU "
        "and CPU; the rest of the experts on the CPU kernels. Exit status 1 if the plan does not fit the GPU assumed, "
        "2 on bad input or a budget too small for the part that must be on the GPU.",
    )
    p.add_argument("--model", help="model file or directory (default: the built-in model)")
    p.add_argument("--gpu-memory", type=memory_size, metavar="SIZE",
                   help="GPU memory to fill, e.g. 8GiB (default: the --assume-gpu size, else the free memory of cuda:0)")
    p.add_argument("--ctx", type=_context_size, help="context per slot for the KV cache (default: the model's, at most 4096)")
    p.add_argument("--slots", type=int, default=4, help="KV-cache slots (default: serve's 4)")
    p.add_argument("--profile", choices=["decode", "prefill"], default="decode",
                   help="decode (default): spare memory goes to routed experts; prefill: as decode, and the CPU "
                        "experts compute long prompts on the GPU (prefill_device), with room kept for that")
    p.add_argument("--out", required=True, metavar="PATH", help="the rule file to write")
    add_gpu_args(p)
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    import torch

    from hybrid.cli.defaults import default_model_path
    from hybrid.inject.memory import GPU_RESERVE_BYTES
    from hybrid.inject.fit import fit
    from hybrid.inject.plan import available_bytes, format_devices, human

    if len(args.assume_gpu) > 1:
        raise ValueError("fit plans for one GPU: give --assume-gpu once")
    assume = dict(args.assume_gpu) or None
    gpu = next(iter(assume)) if assume else "cuda:0"
    budget = args.gpu_memory
    if budget is None and assume:
        budget = assume[gpu]
    if budget is None:
        if not torch.cuda.is_available():
            raise ValueError("this machine has no CUDA device: give the GPU's memory with --gpu-memory SIZE "
                             "or --assume-gpu SIZE")
        budget = available_bytes(gpu)
    model = args.model or default_model_path()
    result = fit(model, budget, gpu=gpu, ctx=args.ctx, slots=args.slots, profile=args.profile,
                 reserve=args.gpu_reserve, assume=assume)
    with open(args.out, "w") as f:
        f.write(result.rules_yaml)
    layers = len(result.whole_layers) + len(result.cpu_layers) + (result.split is not None)
    print(f"{gpu}: {human(budget)}; at least {human(result.minimum)} for the weights outside the routed experts "
          f"({human(result.base_bytes)}), the KV cache ({human(result.kv_bytes)}) and the reserve "
          f"({human(result.reserve_bytes)})")
    if layers:
        split = (f"; layer {result.split[0]} split: {result.split[1]} of {result.split[2]} experts on {gpu}"
                 if result.split else "")
        print(f"routed experts: {len(result.whole_layers)} of {layers} layers on {gpu}{_span(result.whole_layers)}"
              f"{split}; {len(result.cpu_layers)} layers on the CPU{_span(result.cpu_layers)}")
    print(format_devices(result.plan["devices"]))
    check = f"hybrid rules --model {model} --rules {args.out} --slots {args.slots}"
    check += f" --ctx {args.ctx}" if args.ctx else ""
    check += f" --assume-gpu {gpu}:{_size(assume[gpu] if assume else budget)}" if assume or not torch.cuda.is_available() else ""
    check += f" --gpu-reserve {_size(args.gpu_reserve)}" if args.gpu_reserve != GPU_RESERVE_BYTES else ""
    print(f"wrote {args.out}; see the whole plan with: {check}")
    if not result.plan["fits"]:
        print("the plan does not fit the memory available", file=sys.stderr)
        return 1
    return 0


def _size(n: int) -> str:
    """n bytes as a size option takes it, exactly."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _span(layers: list[int]) -> str:
    if not layers:
        return ""
    return f" ({layers[0]})" if len(layers) == 1 else f" ({layers[0]}-{layers[-1]})"
